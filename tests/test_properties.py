"""Property-based tests: random shapes, label kinds, option values and extreme logits.

Hypothesis draws plain Python values only (sizes, a seed, option choices); the arrays are built
with numpy from the seed inside the test. Drawing is then instant whatever the machine's load,
so the ``too_slow`` health check cannot trip; ``deadline=None`` because the first example of a
shape compiles.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent
from _reference import reference_loss

OPTION_NAMES = ["weights", "where", "ignore_index", "label_smoothing", "z_loss", "logit_softcap"]


@st.composite
def problems(draw, max_batch=5, max_classes=7):
    """Sizes, a seed and the options: at most two of them set, both label kinds, reductions."""
    spec = {
        "batch": draw(st.integers(1, max_batch)),
        "classes": draw(st.integers(2, max_classes)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "magnitude": draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4])),
        "soft": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "options": draw(st.lists(st.sampled_from(OPTION_NAMES), max_size=2, unique=True)),
        "smoothing": draw(st.sampled_from([0.05, 0.5, 1.0])),
        "z_loss": draw(st.sampled_from([1e-4, 0.5])),
        "cap": draw(st.sampled_from([0.5, 30.0])),
    }
    if spec["soft"] and "ignore_index" in spec["options"]:
        spec["options"].remove("ignore_index")
    return spec


def build(spec):
    """Float64 logits, labels and options from a drawn spec, with numpy (nothing compiled)."""
    rng = np.random.default_rng(spec["seed"])
    b, n = spec["batch"], spec["classes"]
    logits = spec["magnitude"] * rng.standard_normal((b, n))
    labels = rng.dirichlet(np.ones(n), b) if spec["soft"] else rng.integers(0, n, b)
    opts = {"reduction": spec["reduction"]}
    for name in spec["options"]:
        if name == "weights":
            opts["weights"] = rng.uniform(0.1, 3.0, n)
        elif name == "where":
            opts["where"] = rng.random(b) < 0.7
        elif name == "ignore_index":
            labels[rng.random(b) < 0.3] = -100
            opts["ignore_index"] = -100
        elif name == "label_smoothing":
            opts["label_smoothing"] = spec["smoothing"]
        elif name == "z_loss":
            opts["z_loss"] = spec["z_loss"]
        else:
            opts["logit_softcap"] = spec["cap"]
    arrays = {k: jnp.asarray(v) for k, v in opts.items() if isinstance(v, np.ndarray)}
    return jnp.asarray(logits), jnp.asarray(labels), {**opts, **arrays}


@settings(max_examples=8, deadline=None)  # 24 more in the slow tier (the time budget)
@given(problems())
def test_hand_gradient_matches_autodiff_everywhere(spec):
    _check_hand_gradient(spec)


@pytest.mark.slow
@settings(max_examples=24, deadline=None)
@given(problems())
def test_hand_gradient_matches_autodiff_everywhere_more_examples(spec):
    _check_hand_gradient(spec)


def _check_hand_gradient(spec):
    with jax.enable_x64(True):
        logits, labels, opts = build(spec)
        # Jitted as a whole: eager op-by-op dispatch compiles every op for every new shape.
        loss, g = jax.jit(functools.partial(jxent.loss_and_logits_grad, **opts))(logits, labels)
        ref_loss = functools.partial(reference_loss, labels=labels, **opts)
        expected = jax.jit(jax.grad(lambda z: jnp.sum(ref_loss(z))))(logits)
        ref = jax.jit(ref_loss)(logits)
    assert np.all(np.isfinite(loss))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(loss, ref, rtol=1e-9, atol=1e-9)
    # Relative to the largest entry, with a floor at the O(1) scale of a softmax gradient:
    # entries like 1e-40 (deep in a soft cap's flat tail) are zero for every practical purpose.
    scale = max(float(np.max(np.abs(expected))), 1.0)
    assert float(np.max(np.abs(g - expected))) <= 1e-9 * scale


@settings(max_examples=15, deadline=None)
@given(problems())
def test_rows_sum_to_zero_and_loss_is_nonnegative(spec):
    """For normalised targets without z-loss: sum_l (p_l - t_l) = 0 and -sum t log p >= 0."""
    spec = {**spec, "reduction": "none"}
    spec["options"] = [o for o in spec["options"] if o not in ("z_loss", "weights")]
    with jax.enable_x64(True):
        logits, labels, opts = build(spec)
        run = jax.jit(functools.partial(jxent.loss_and_logits_grad, **opts))
        loss, g = (np.asarray(a) for a in run(logits, labels))
    assert np.all(loss >= -1e-12)
    if "logit_softcap" not in opts:  # the cap's chain factor reweights the entries
        np.testing.assert_allclose(np.sum(g, axis=-1), 0.0, atol=1e-12)


LINEAR_PROBLEMS = (
    problems(max_batch=13, max_classes=11),
    st.integers(1, 8),
    st.integers(1, 12),
    st.integers(1, 4),
)


@settings(max_examples=5, deadline=None)
@given(*LINEAR_PROBLEMS)
def test_linear_cross_entropy_equals_the_materialised_reference(spec, chunk, block, dim):
    """Random N, L, chunk and block sizes (ragged or larger than N, L), options and pairs."""
    _check_linear(spec, chunk, block, dim)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(*LINEAR_PROBLEMS)
def test_linear_cross_entropy_equals_the_materialised_reference_more_examples(
    spec, chunk, block, dim
):
    """The same property on 40 drawn problems (each compiles two programs: the slow tier)."""
    _check_linear(spec, chunk, block, dim)


def _check_linear(spec, chunk, block, dim):
    spec = {**spec, "magnitude": min(spec["magnitude"], 30.0)}
    with jax.enable_x64(True):
        logits, labels, opts = build(spec)
        rng = np.random.default_rng(spec["seed"] + 1)
        x = jnp.asarray(rng.standard_normal((spec["batch"], dim)))
        w = jnp.asarray(rng.standard_normal((dim, spec["classes"])))
        b = logits[0]  # a bias of the drawn magnitude
        ct = jnp.asarray(rng.uniform(0.5, 2.0, spec["batch"]))
        weights = opts.pop("weights", None)
        argnums = (0, 1, 2, 3) + ((4,) if weights is not None else ())

        def chunked(x, w, b, labels, weights):
            out = jxent.linear_cross_entropy(
                x,
                w,
                labels,
                bias=b,
                weights=weights,
                chunk_size=chunk,
                vocab_block_size=block,
                **opts,
            )
            return jnp.sum(out * ct) if out.ndim else out

        def plain(x, w, b, labels, weights):
            out = reference_loss(x @ w + b[None], labels, weights=weights, **opts)
            return jnp.sum(out * ct) if out.ndim else out

        if not spec["soft"]:
            argnums = tuple(a for a in argnums if a != 3)
        args = (x, w, b, labels, weights)
        got = jax.jit(jax.value_and_grad(chunked, argnums))(*args)
        want = jax.jit(jax.value_and_grad(plain, argnums))(*args)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = max(float(np.max(np.abs(r))), 1.0)
        assert float(np.max(np.abs(g - r))) <= 1e-9 * scale
