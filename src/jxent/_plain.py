r"""The plain loss: softmax cross-entropy written the textbook way, with no jxent derivative.

:func:`plain_loss` is the independent side of jxent's checks (``check_grads``, ``jxent check``,
the demo): ``jax.grad`` of it is JAX's autodiff of ``log_softmax`` and an explicit target, not
the hand-derived rule that ``jax.grad(jxent.softmax_cross_entropy)`` runs. Nothing under it
calls jxent: it is written from the conventions docs/loss-options.md states, option by option,

.. math::

    s = c\tanh(x/c), \quad t_l = w_l\big((1-\varepsilon) q_l + \tfrac{\varepsilon}{L}[s_l>-\infty]
    \big), \quad ce_i = -\sum_l t_l \log p_l, \quad
    J = \frac{\sum_i m_i ce_i}{\sum_i m_i n_i} + z\,\frac{\sum_i m_i \operatorname{lse}_i^2}
    {\sum_i m_i},

(``"sum"``: both sums undivided; ``"none"``: per example) with ``where`` per example or per
logit (a masked logit leaves the softmax; an example with no class left does not count),
``ignore_index``, class weights :math:`w` (:math:`n_i = w_{y_i}`, PyTorch's weighted mean) and
probability labels. It is slower than the row kernel and takes no shortcuts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def plain_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: str = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Softmax cross-entropy with jxent's options, written plainly (see the module notes).

    Arguments as :func:`jxent.softmax_cross_entropy`, assumed valid (the caller validated them
    with jxent's loss). Differentiate it with ``jax.grad``: it has no custom rule.

    Returns:
        The loss: a scalar, or per example for ``reduction="none"`` (the batch shape).
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # as the loss computes
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    x, classes = _classes_last(logits, axis)
    num_classes = x.shape[-1]
    q = _classes_last(labels, axis)[0].astype(x.dtype) if soft else None
    counted, logit_mask = _masks(where, logits, axis, x.shape)
    if not soft:
        labels = labels.astype(jnp.int32)
        if ignore_index is not None:
            counted = counted & (labels != ignore_index)
        safe = jnp.where(counted & (labels >= 0) & (labels < num_classes), labels, 0)
        q = jax.nn.one_hot(safe, num_classes, dtype=x.dtype)
    s = (
        x
        if logit_softcap is None
        else jnp.where(x == -jnp.inf, -jnp.inf, logit_softcap * jnp.tanh(x / logit_softcap))
    )
    if logit_mask is not None:
        s = jnp.where(logit_mask, s, -jnp.inf)
        counted = counted & jnp.any(logit_mask, axis=-1)
    w = jnp.ones(num_classes, x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
    w = w.reshape((1,) * (s.ndim - 1) + classes)  # explicit: strict rank promotion passes
    inside = s > -jnp.inf
    t = w * ((1 - label_smoothing) * q + label_smoothing / num_classes * inside)
    log_p = jax.nn.log_softmax(s, axis=-1)
    ce = -jnp.sum(jnp.where(t == 0, 0.0, t * log_p), axis=-1)
    lse = jax.nn.logsumexp(s, axis=-1)
    z_term = z_loss * jnp.where(counted, lse, 0.0) ** 2
    per_example = jnp.where(counted, ce, 0.0) + jnp.where(counted, z_term, 0.0)
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return jnp.sum(per_example)
    n = jnp.sum(w * q, axis=-1) if (weights is not None and not soft) else jnp.ones_like(ce)
    return jnp.sum(jnp.where(counted, ce, 0.0)) / _denominator(counted, n) + jnp.sum(
        jnp.where(counted, z_term, 0.0)
    ) / _denominator(counted, jnp.ones_like(ce))


def _denominator(counted: jax.Array, n: jax.Array) -> jax.Array:
    """``sum(n)`` over counted examples; 1 when none counts, NaN when they count and sum to 0."""
    total = jnp.sum(jnp.where(counted, n, 0.0))
    return jnp.where(total == 0, jnp.where(jnp.any(counted), jnp.nan, 1.0), total)


def _classes_last(a: jax.Array, axis: int | tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """``a`` with its class axes moved last, in the order given, and flattened (as optax)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(ax % a.ndim for ax in axes)
    moved = jnp.moveaxis(a, axes, tuple(range(a.ndim - len(axes), a.ndim)))
    batch = moved.shape[: a.ndim - len(axes)]
    flat = moved.reshape(*batch, -1)
    return flat, (flat.shape[-1],)


def _masks(
    where: Any, logits: jax.Array, axis: int | tuple[int, ...], rows_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array | None]:
    """``(counted per example, mask per logit or None)`` from ``where``."""
    batch = rows_shape[:-1]
    if where is None:
        return jnp.ones(batch, bool), None
    where = jnp.asarray(where, bool)
    if where.ndim == logits.ndim:  # per logit (it may broadcast, e.g. [1, L])
        return jnp.ones(batch, bool), _classes_last(jnp.broadcast_to(where, logits.shape), axis)[0]
    return jnp.broadcast_to(where, batch), None
