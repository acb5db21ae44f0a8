"""Loss options: each one's hand-derived gradient, alone and in pairs, against autodiff and FD."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from _reference import FD_RTOL, FLOAT64_RTOL, assert_tree_close, reference_loss, scalar
from jxent.predictors import embedding, mlp

B, D, L = 7, 4, 5
IGNORE = -100


def option_values(name, key, dtype):
    """One non-trivial value of each option (large enough that a missing term shows)."""
    if name == "weights":
        return {"weights": jax.random.uniform(key, (L,), dtype, 0.2, 2.0)}
    if name == "where":
        return {"where": jnp.array([True, False, True, True, False, True, True])}
    if name == "ignore_index":
        return {"ignore_index": IGNORE}
    if name == "label_smoothing":
        return {"label_smoothing": 0.2}
    if name == "z_loss":
        return {"z_loss": 0.3}
    return {"logit_softcap": 1.5}


OPTIONS = ["weights", "where", "ignore_index", "label_smoothing", "z_loss", "logit_softcap"]
COMBINATIONS = [(o,) for o in OPTIONS] + list(itertools.combinations(OPTIONS, 2))


def make_problem(predictor, label_kind, key, dtype=jnp.float64):
    k_p, k_x, k_y = jax.random.split(key, 3)
    x = 2.0 * jax.random.normal(k_x, (B, D), dtype)
    if predictor == "mlp":
        apply = functools.partial(mlp.apply, activation=jnp.tanh)
        params = mlp.init(k_p, [D, 6, L], dtype)
    else:
        apply, params = embedding.apply, embedding.init(k_p, D, L, 3, dtype)
    if label_kind == "int":
        labels = jax.random.randint(k_y, (B,), 0, L).at[3].set(IGNORE)
    else:
        labels = jax.random.dirichlet(k_y, jnp.ones(L, dtype), (B,))
    return apply, params, x, labels


# Every option and pair on the MLP; each option alone on the shared-parameter predictor.
# ignore_index is for integer labels only (its error for probability labels is tested elsewhere).
CASES = [
    (predictor, kind, combo)
    for predictor, combos in (("mlp", COMBINATIONS), ("embedding", [(o,) for o in OPTIONS]))
    for kind in ("int", "soft")
    for combo in combos
    if not (kind == "soft" and "ignore_index" in combo)
]


@pytest.mark.parametrize(
    ("predictor", "label_kind", "combo"),
    CASES,
    ids=lambda v: v if isinstance(v, str) else "+".join(v),
)
def test_option_gradients_match_autodiff_and_fd(x64, key, predictor, label_kind, combo):
    apply, params, x, labels = make_problem(predictor, label_kind, key)
    if label_kind == "int" and "ignore_index" not in combo:
        labels = labels.at[3].set(0)
    opts = {}
    for i, name in enumerate(combo):
        opts.update(option_values(name, jax.random.fold_in(key, i), jnp.float64))

    loss, hand = jax.jit(jxent.value_and_grad(apply, **opts))(params, x, labels)

    def ref(p):
        return reference_loss(apply(p, x), labels, **opts)

    np.testing.assert_allclose(loss, jax.jit(ref)(params), rtol=1e-12)
    assert_tree_close(hand, jax.jit(jax.grad(ref))(params), FLOAT64_RTOL)
    if len(combo) == 1 and predictor == "mlp":  # finite differences once per option
        assert_tree_close(hand, jxent.finite_difference_grad(ref, params), FD_RTOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_kind", ["int", "soft"])
def test_all_options_at_once_every_reduction(x64, key, reduction, label_kind):
    logits = 3.0 * jax.random.normal(key, (B, L), jnp.float64)
    _, _, _, labels = make_problem("mlp", label_kind, jax.random.fold_in(key, 1))
    opts = {}
    for name in OPTIONS:
        if not (name == "ignore_index" and label_kind == "soft"):
            opts.update(option_values(name, jax.random.fold_in(key, 2), jnp.float64))
    loss, g = jxent.loss_and_logits_grad(logits, labels, reduction=reduction, **opts)
    np.testing.assert_allclose(
        loss, reference_loss(logits, labels, reduction=reduction, **opts), rtol=1e-12
    )
    expected = jax.grad(scalar(reference_loss, reduction))(logits, labels, **opts)
    np.testing.assert_allclose(g, expected, rtol=1e-10, atol=1e-14)


def test_softcap_gradient_has_the_tanh_chain_factor(x64, key):
    """Dropping (1 - tanh^2) -- a bug a fused kernel once shipped -- would be off by O(1)."""
    logits = 4.0 * jax.random.normal(key, (B, L), jnp.float64)
    y = jax.random.randint(jax.random.fold_in(key, 1), (B,), 0, L)
    g = jxent.logits_grad(logits, y, logit_softcap=2.0)
    capped = 2.0 * jnp.tanh(logits / 2.0)
    without_factor = jxent.logits_grad(capped, y)
    fd = jxent.finite_difference_grad(lambda z: reference_loss(z, y, logit_softcap=2.0), logits)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-10)
    assert np.max(np.abs(without_factor - fd)) > 0.01


def test_everything_masked_gives_zero_not_nan():
    logits = jax.random.normal(jax.random.key(0), (3, L))
    y = jnp.array([IGNORE, IGNORE, IGNORE])
    for reduction in ("mean", "sum", "none"):
        loss, g = jxent.loss_and_logits_grad(logits, y, ignore_index=IGNORE, reduction=reduction)
        np.testing.assert_array_equal(loss, 0.0)
        np.testing.assert_array_equal(g, 0.0)
    loss, g = jxent.loss_and_logits_grad(
        logits, jnp.array([0, 1, 2]), where=jnp.zeros(3, bool), weights=jnp.ones(L)
    )
    assert float(loss) == 0.0
    np.testing.assert_array_equal(g, 0.0)


def test_mean_divides_by_target_weight_sum_of_counted_examples():
    logits = jnp.zeros((3, 2))  # every example's unweighted loss is log 2
    y = jnp.array([0, 1, IGNORE])
    w = jnp.array([1.0, 3.0])
    loss = jxent.softmax_cross_entropy(logits, y, weights=w, ignore_index=IGNORE)
    np.testing.assert_allclose(loss, (1.0 + 3.0) * np.log(2) / (1.0 + 3.0), rtol=1e-6)
    loss_sum = jxent.softmax_cross_entropy(
        logits, y, weights=w, ignore_index=IGNORE, reduction="sum"
    )
    np.testing.assert_allclose(loss_sum, 4.0 * np.log(2), rtol=1e-6)


# --- numerical robustness ------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_logits_stay_finite(magnitude, dtype):
    logits = jnp.array([[magnitude, 0.0, -magnitude], [0.0, magnitude, 1.0]], dtype)
    y = jnp.array([2, 1])
    loss, g = jxent.loss_and_logits_grad(logits, y, reduction="none", z_loss=1e-4)
    assert np.all(np.isfinite(loss))
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    if magnitude > 0:  # example 0 puts all mass on class 0 but its label is 2
        v = float(logits[0, 0])  # 1e4 as stored (bf16 rounds it to 9984)
        np.testing.assert_allclose(loss[0], 2 * v + 1e-4 * v**2, rtol=1e-6)


def test_minus_inf_masked_classes_get_exactly_zero_gradient():
    logits = jnp.array([[1.0, -jnp.inf, 0.5, -jnp.inf], [-jnp.inf, 2.0, 0.0, 1.0]])
    y = jnp.array([2, 3])
    for labels in (y, jnp.array([[0.5, 0.0, 0.5, 0.0], [0.0, 0.2, 0.3, 0.5]])):
        loss, g = jxent.loss_and_logits_grad(labels=labels, logits=logits, reduction="none")
        assert np.all(np.isfinite(loss))
        assert np.all(np.isfinite(g))
        assert g[0, 1] == 0.0
        assert g[0, 3] == 0.0
        assert g[1, 0] == 0.0
        finite = jnp.where(jnp.isinf(logits), -1e30, logits)
        np.testing.assert_allclose(loss, reference_loss(finite, labels, reduction="none"), 1e-6)


def test_minus_inf_target_gives_inf_loss_without_nan_leaking():
    logits = jnp.array([[1.0, -jnp.inf, 0.5], [0.3, 2.0, 0.0]])
    y = jnp.array([1, 0])
    loss, g = jxent.loss_and_logits_grad(logits, y, reduction="none")
    assert loss[0] == jnp.inf
    assert np.isfinite(loss[1])
    assert not np.any(np.isnan(g))
    np.testing.assert_allclose(g[1], jax.nn.softmax(logits[1]) - jnp.array([1.0, 0, 0]), 1e-6)
    mean_loss, mean_g = jxent.loss_and_logits_grad(logits, y)
    assert mean_loss == jnp.inf
    assert not np.any(np.isnan(mean_g))


def test_nan_in_one_example_stays_in_that_example():
    logits = jax.random.normal(jax.random.key(1), (4, L)).at[2, 1].set(jnp.nan)
    y = jnp.array([0, 1, 2, 3])
    loss, g = jxent.loss_and_logits_grad(logits, y, reduction="none", z_loss=0.1)
    assert np.isnan(loss[2])
    assert np.all(np.isnan(g[2]))
    keep = np.array([0, 1, 3])
    assert np.all(np.isfinite(loss[keep]))
    assert np.all(np.isfinite(g[keep]))
    clean = logits.at[2].set(0.0)
    np.testing.assert_array_equal(
        loss[keep], jxent.softmax_cross_entropy(clean, y, reduction="none", z_loss=0.1)[keep]
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_compute_in_float32(key, dtype):
    logits32 = 3.0 * jax.random.normal(key, (B, L))
    y = jax.random.randint(jax.random.fold_in(key, 1), (B,), 0, L)
    logits = logits32.astype(dtype)
    loss, g = jxent.loss_and_logits_grad(logits, y, label_smoothing=0.1, z_loss=1e-3)
    assert loss.dtype == jnp.float32
    assert g.dtype == dtype
    # Same computation on the rounded logits in float32: only the output rounding differs,
    # at most half an ulp of the low-precision type (2^-8 for bf16, 2^-11 for fp16) relative.
    loss_ref, g_ref = jxent.loss_and_logits_grad(
        logits.astype(jnp.float32), y, label_smoothing=0.1, z_loss=1e-3
    )
    assert loss == loss_ref
    ulp = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
    np.testing.assert_allclose(np.asarray(g, np.float32), g_ref, rtol=ulp, atol=1e-7)


# --- agreement with optax ------------------------------------------------------------------


# float32 losses from two implementations differ by a few ulps of the log-sum-exp (~1e-7 for
# O(1) values), which is a large *relative* difference on near-zero losses: compare with atol.
F32_LOSS_TOL = {"rtol": 1e-6, "atol": 1e-6}


def test_matches_optax_where_optax_has_the_option(key):
    logits = 3.0 * jax.random.normal(key, (B, L))
    y = jax.random.randint(jax.random.fold_in(key, 1), (B,), 0, L)
    q = jax.random.dirichlet(jax.random.fold_in(key, 2), jnp.ones(L), (B,))
    np.testing.assert_allclose(
        jxent.softmax_cross_entropy(logits, y, reduction="none"),
        optax.softmax_cross_entropy_with_integer_labels(logits, y),
        **F32_LOSS_TOL,
    )
    np.testing.assert_allclose(
        jxent.softmax_cross_entropy(logits, q, reduction="none"),
        optax.softmax_cross_entropy(logits, q),
        **F32_LOSS_TOL,
    )
    np.testing.assert_allclose(
        jxent.softmax_cross_entropy(logits, q, reduction="none", label_smoothing=0.1),
        optax.softmax_cross_entropy(logits, optax.smooth_labels(q, 0.1)),
        **F32_LOSS_TOL,
    )
    where = jnp.arange(B) % 3 != 0
    np.testing.assert_allclose(
        jxent.softmax_cross_entropy(logits, y, where=where),
        jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * where) / where.sum(),
        **F32_LOSS_TOL,
    )


# --- agreement with PyTorch (runs when torch is installed) -----------------------------------


TORCH_OPTIONS = {
    "plain": {},
    "weights": {"weights": True},
    "ignore": {"ignore_index": IGNORE},
    "smoothing": {"label_smoothing": 0.15},
    "weights+ignore+smoothing": {"weights": True, "ignore_index": IGNORE, "label_smoothing": 0.15},
}
# PyTorch has no ignore_index for probability targets; "kdim" is its [N, C, d] layout (axis=1).
TORCH_CASES = [
    (name, reduction, kind)
    for name in TORCH_OPTIONS
    for reduction in ("mean", "sum", "none")
    for kind in ("int", "soft", "kdim")
    if not (kind == "soft" and "ignore" in name)
]


@pytest.mark.parametrize(("opts_name", "reduction", "label_kind"), TORCH_CASES)
def test_matches_pytorch_cross_entropy_value_and_gradient(key, opts_name, reduction, label_kind):
    torch = pytest.importorskip("torch")  # in the test extra: this never skips in CI
    opts = TORCH_OPTIONS[opts_name]
    shape, axis = ((B, L, 3), 1) if label_kind == "kdim" else ((B, L), -1)
    logits = 3.0 * jax.random.normal(key, shape)
    if label_kind == "soft":
        labels = jax.random.dirichlet(jax.random.fold_in(key, 1), jnp.ones(L), (B,))
        t_labels = torch.tensor(np.asarray(labels))
    else:
        batch = (B,) if label_kind == "int" else (B, 3)
        labels = jax.random.randint(jax.random.fold_in(key, 1), batch, 0, L)
        if "ignore_index" in opts:
            labels = labels.at[jnp.array([1, 4])].set(IGNORE)
        t_labels = torch.tensor(np.asarray(labels), dtype=torch.long)
    kwargs = dict(opts)
    t_kwargs = {"reduction": reduction}
    if kwargs.pop("weights", False):
        w = jax.random.uniform(jax.random.fold_in(key, 2), (L,), minval=0.2, maxval=2.0)
        kwargs["weights"] = w
        t_kwargs["weight"] = torch.tensor(np.asarray(w))
    if "ignore_index" in kwargs:
        t_kwargs["ignore_index"] = kwargs["ignore_index"]
    if "label_smoothing" in kwargs:
        t_kwargs["label_smoothing"] = kwargs["label_smoothing"]
    t_logits = torch.tensor(np.asarray(logits), requires_grad=True)
    expected = torch.nn.functional.cross_entropy(t_logits, t_labels, **t_kwargs)
    expected.sum().backward()
    actual, grad = jxent.loss_and_logits_grad(
        logits, labels, axis=axis, reduction=reduction, **kwargs
    )
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-5, atol=1e-6)
