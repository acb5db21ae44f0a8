"""Nothing checked against itself: the checker's autodiff side shares no code with jxent's rules.

- The package's plain loss (``jxent._plain.plain_loss``) equals the tests' own plainly written
  reference (``tests/_reference.py``) in value and ``jax.grad`` for every option, and PyTorch's
  ``F.cross_entropy`` where PyTorch has the option: three implementations, one convention.
- Sabotage: with every derivative rule jxent defines scaled by 1.5 (a subprocess patches
  ``jax.custom_jvp.defjvp`` before importing jxent), the checker still passes a correct
  candidate and fails ``jax.grad`` of jxent's loss as "1.5 x the gradient".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _reference import reference_loss
from jxent._plain import plain_loss

B, C = 6, 5
CASES = {
    "plain": {},
    "weights": {"weights": np.array([1.0, 2.0, 0.5, 3.0, 1.5])},
    "ignore_index": {"ignore_index": 2},
    "where": {"where": np.array([1, 1, 0, 1, 0, 1], bool)},
    "smoothing_z": {"label_smoothing": 0.2, "z_loss": 1e-2},
    "softcap": {"logit_softcap": 2.0},
    "all": {
        "weights": np.array([1.0, 2.0, 0.5, 3.0, 1.5]),
        "ignore_index": 2,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 3.0,
    },
}


# Every case with the mean in the default tier; "sum" and "none" for the all-options case there,
# for the others in the slow tier (the README command's time budget).
GRID = [
    pytest.param(
        name, reduction, marks=[] if reduction == "mean" or name == "all" else [pytest.mark.slow]
    )
    for name in sorted(CASES)
    for reduction in ("mean", "sum", "none")
]


@pytest.mark.parametrize(("name", "reduction"), GRID)
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_plain_loss_equals_the_tests_reference_in_value_and_gradient(
    x64, key, name, reduction, soft
):
    options = dict(CASES[name])
    if soft:  # ignore_index is for class indices: with probabilities it counts nothing out
        options.pop("ignore_index", None)
    k1, k2 = jax.random.split(key)
    logits = 3 * jax.random.normal(k1, (B, C), jnp.float64)
    labels = (
        jax.nn.softmax(jax.random.normal(k2, (B, C), jnp.float64))
        if soft
        else jax.random.randint(k2, (B,), 0, C)
    )

    def scalar(fn):
        return lambda s: jnp.sum(fn(s, labels, reduction=reduction, **options))

    np.testing.assert_allclose(
        plain_loss(logits, labels, reduction=reduction, **options),
        reference_loss(logits, labels, reduction=reduction, **options),
        rtol=1e-13,
    )
    np.testing.assert_allclose(
        jax.grad(scalar(plain_loss))(logits),
        jax.grad(scalar(reference_loss))(logits),
        rtol=1e-12,
        atol=1e-15,
    )


def test_plain_loss_per_logit_where_and_class_axes_match_optax_and_torch(x64, key):
    import optax
    import torch

    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (4, 3, 2), jnp.float64)  # classes on axis 1, like [B, C, H]
    labels = jax.random.randint(k2, (4, 2), 0, 3)
    torch_loss = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(labels)), label_smoothing=0.1
    )
    np.testing.assert_allclose(
        plain_loss(logits, labels, axis=1, label_smoothing=0.1), torch_loss.numpy(), rtol=1e-13
    )
    where = jax.random.bernoulli(k3, 0.7, (4, 3)).at[:, 0].set(True)
    flat = jax.random.normal(k1, (4, 3), jnp.float64)
    q = jax.nn.softmax(jax.random.normal(k2, (4, 3), jnp.float64) + jnp.where(where, 0, -30))
    q = jnp.where(where, q, 0.0)
    want = jnp.mean(optax.softmax_cross_entropy(flat, q, where=where))
    np.testing.assert_allclose(plain_loss(flat, q, where=where), want, rtol=1e-12)


def test_checker_is_independent_of_jxents_own_derivative_rules():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = Path(__file__).parent / "scripts" / "sabotage.py"
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["sabotage_ratio"] == pytest.approx(1.5)  # the rules really are wrong now
    assert res["correct_ok"], res["correct_report"]  # a correct candidate still passes
    assert "jax.grad of the plain loss" in res["correct_report"]
    assert not res["jxent_ok"], res["jxent_report"]  # jax.grad of jxent's loss fails ...
    assert res["jxent_kind"] == "SCALED"  # ... as 1.5 x the gradient
    assert res["jxent_scales"] == pytest.approx([1.5, 1.5], rel=1e-6)
    assert res["hand_ok"]  # jxent.grad's cotangent is written by hand, not the custom rule


def test_plain_loss_flattens_tuple_axes_in_the_order_given_and_broadcasts_masks(x64, key):
    """As optax (and jxent) do: axis=(2, 1) flattens axis 2 first; a [1, L] mask broadcasts."""
    import optax

    import jxent

    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (2, 3, 4, 5), jnp.float64)
    labels = jax.random.randint(k2, (2, 5), 0, 12)
    moved = jnp.moveaxis(logits, (2, 1), (2, 3)).reshape(2, 5, 12)
    want = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(moved, labels))
    np.testing.assert_allclose(plain_loss(logits, labels, axis=(2, 1)), want, rtol=1e-13)
    flat = jax.random.normal(k1, (6, 4), jnp.float64)
    mask = jnp.array([[True, True, False, True]])  # [1, L]
    y = jnp.array([0, 1, 3, 0, 1, 3])
    np.testing.assert_allclose(
        plain_loss(flat, y, where=mask),
        jxent.softmax_cross_entropy(flat, y, where=mask),
        rtol=1e-13,
    )
