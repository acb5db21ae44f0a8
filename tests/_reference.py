"""Independent references for the tests: a loss written plainly, and tree comparisons.

Nothing here calls jxent's gradient code: the reference loss is differentiated by ``jax.grad``
and by finite differences, and the hand-derived gradient must match both.
"""

import jax
import jax.numpy as jnp
import numpy as np


def reference_loss(
    logits,
    labels,
    *,
    reduction="mean",
    weights=None,
    where=None,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
):
    """Cross-entropy written the textbook way: log_softmax, an explicit target, PyTorch means."""
    num_classes = logits.shape[-1]
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    hard = jnp.issubdtype(labels.dtype, jnp.integer)
    mask = jnp.ones(logits.shape[:-1], bool) if where is None else where
    if hard:
        if ignore_index is not None:
            mask = mask & (labels != ignore_index)
        safe = jnp.where(mask, labels, 0)
        q = jax.nn.one_hot(safe, num_classes, dtype=logits.dtype)
    else:
        q = labels
    w = jnp.ones(num_classes, logits.dtype) if weights is None else weights
    t = ((1 - label_smoothing) * q + label_smoothing / num_classes) * w.reshape(
        (1,) * (q.ndim - 1) + w.shape
    )
    ce = jnp.where(mask, -jnp.sum(t * log_p, axis=-1), 0.0)
    z_term = jnp.where(mask, z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2, 0.0)
    if reduction == "none":
        return ce + z_term
    if reduction == "sum":
        return jnp.sum(ce) + jnp.sum(z_term)
    # Weighted mean of the cross-entropy (PyTorch) plus z times the mean of lse^2 over counted
    # examples (Liger Kernel's CrossEntropyWithZLoss).
    norm = w[safe] if (hard and weights is not None) else jnp.ones_like(ce)
    denominator = jnp.sum(jnp.where(mask, norm, 0.0))
    count = jnp.sum(mask)
    return jnp.sum(ce) / jnp.where(denominator == 0, 1.0, denominator) + jnp.sum(z_term) / (
        jnp.where(count == 0, 1, count)
    )


def scalar(loss_fn, reduction):
    """The scalar whose gradient jxent returns: the loss, or the sum of per-example losses."""
    if reduction == "none":
        return lambda *a, **k: jnp.sum(loss_fn(*a, reduction=reduction, **k))
    return lambda *a, **k: loss_fn(*a, reduction=reduction, **k)


def max_rel_error(actual, expected):
    """Max abs difference over all leaves divided by the max |expected| entry (norm-wise)."""
    a, e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(a) == len(e), "pytrees differ in number of leaves"
    diff = max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, e, strict=False)
    )
    scale = max(float(np.max(np.abs(np.asarray(v)))) for v in e)
    return diff / scale


def assert_tree_close(actual, expected, rtol):
    """Asserts matching structure and max|actual - expected| <= rtol * max|expected|."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for u, v in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=False):
        assert (u.shape, u.dtype) == (v.shape, v.dtype)
    err = max_rel_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


# float32 tolerance against jax.grad: both sides evaluate the same formula in float32 with
# different operation orders. Each logit-gradient entry p_l - 1{y=l} carries a few ulps
# (eps32 = 1.19e-7) of rounding, and the predictor's pullback sums O(B * width) such terms, so
# errors of ~1e-6 relative to the largest gradient entry are expected; 1e-5 leaves 10x headroom
# while a real bug (sign, scale, missing term) is off by O(1).
FLOAT32_RTOL = 1e-5
FLOAT64_RTOL = 1e-10
FD_RTOL = 1e-6
# bfloat16 inputs (gradients computed in float32, returned in bf16): bf16 keeps 8 significant
# bits, so rounding the inputs and the result each costs up to 2^-8 = 3.9e-3 relative to the
# largest entry; 2^-7 covers both. A wrong sign, scale or missing term is off by O(1).
BF16_RTOL = 2.0**-7
