r"""Softmax cross-entropy: the loss and its hand-derived logits gradient from one softmax.

Every entry point of jxent (the plain loss, the logits gradient, the predictor-level
``value_and_grad``, the training step) goes through :func:`loss_and_logits_grad`. It computes one
softmax per example and derives from it both the loss and

.. math::

    \frac{\partial \ell}{\partial s} = p \, \big(\textstyle\sum_c t_c + 2 z \,
    \operatorname{lse}(s)\big) - t,

where :math:`s` are the (optionally soft-capped) logits, :math:`p = \operatorname{softmax}(s)`,
:math:`t` the effective target (one-hot or probabilities, smoothed and class-weighted) and
:math:`z` the z-loss coefficient. ``docs/derivation.md`` derives it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jxent import _checked, _validate

Reduction = Literal["mean", "sum", "none"]


def loss_and_logits_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    reduction: Reduction = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Softmax cross-entropy and its hand-derived gradient with respect to the logits.

    For one example with logits :math:`x \in \mathbb{R}^L` the loss is

    .. math::

        s = c \tanh(x / c) \ \text{(only with a soft cap } c\text{)}, \qquad
        \ell = -\sum_l t_l \log \operatorname{softmax}(s)_l + z \operatorname{lse}(s)^2,

    with effective target :math:`t = w \odot \big((1-\varepsilon)\,q + \varepsilon / L\big)`,
    where :math:`q` is ``onehot(y)`` for integer labels or the given probabilities, :math:`w` the
    class weights (ones by default) and :math:`\varepsilon` the label smoothing. Its gradient is

    .. math::

        \frac{\partial \ell}{\partial x} = \Big(p \big(\textstyle\sum_l t_l
        + 2z\operatorname{lse}(s)\big)
        - t\Big) \odot \big(1 - (s/c)^2\big),

    which for plain integer labels is the familiar :math:`p - \operatorname{onehot}(y)`.

    Reductions: ``"none"`` returns each example's loss and, in row ``i``, the gradient of
    example ``i``'s own loss; ``"sum"`` sums them; ``"mean"`` divides the sum by the
    normaliser :math:`\sum_i m_i n_i`, where :math:`m_i` is 1 for counted examples (``where`` true,
    label not ``ignore_index``) and :math:`n_i = w_{y_i}` for integer labels with ``weights``, else
    1. This is PyTorch's ``F.cross_entropy`` convention, including for probability labels (which
    divide by the count). When the normaliser is 0 (every example masked) the mean is 0 and the
    gradient is zero, never NaN. The z-loss term is added per counted example before reducing.

    Dtypes: integer labels are class indices of shape ``logits.shape`` without ``axis``;
    floating labels are probabilities of the logits' shape. bfloat16/float16 logits are computed
    in float32; the loss is returned in that compute dtype and the gradient in the logits' dtype.

    Bad labels: outside ``jit`` an integer label outside ``[0, L)`` that is counted raises
    ``ValueError`` naming its position. Under ``jit`` that example's loss and its gradient row are
    NaN (so a ``"mean"``/``"sum"`` loss is NaN too) and every other row is unaffected; wrap the
    function in :func:`jxent.checked` to raise instead. A target whose logit is ``-inf`` gives a
    ``+inf`` loss with a finite gradient; ``-inf`` logits of non-target classes get exactly zero
    gradient.

    Args:
        logits: Scores, floating, of shape ``[..., L, ...]`` with classes along ``axis``.
        labels: Integer class indices (shape of ``logits`` without ``axis``) or probabilities
            (shape of ``logits``).
        axis: The class axis.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]`` (PyTorch ``weight=``).
        where: Boolean mask over examples; ``False`` examples contribute nothing.
        ignore_index: Integer label value whose examples contribute nothing (integer labels only).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch semantics.
        z_loss: Coefficient :math:`z \ge 0` of the :math:`\operatorname{lse}^2` penalty (PaLM).
        logit_softcap: Soft cap :math:`c > 0` (Gemma), or ``None``.

    Returns:
        ``(loss, logits_grad)``: the loss (a scalar, or per example for ``"none"``) and
        :math:`\partial\,\text{loss} / \partial\,\text{logits}` with the logits' shape and dtype.

    Raises:
        TypeError: Non-floating logits, labels of another dtype, non-boolean ``where``.
        ValueError: Shapes that do not match, options out of range, labels out of range.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> loss, g = jxent.loss_and_logits_grad(jnp.array([[0.0, 0.0]]), jnp.array([1]))
        >>> print(f"{loss:.4f}", g)
        0.6931 [[ 0.5 -0.5]]

    References:
        PyTorch ``torch.nn.functional.cross_entropy``; optax
        ``softmax_cross_entropy_with_integer_labels``; Chowdhery et al. 2022 (PaLM, z-loss);
        Gemma 2 (logit soft-capping).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    weights = None if weights is None else jnp.asarray(weights)
    where = None if where is None else jnp.asarray(where)
    axis = _validate.check_logits(logits, axis)
    soft = _validate.check_labels(logits, labels, axis)
    num_classes = logits.shape[axis]
    batch_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    _validate.check_options(
        batch_shape=batch_shape,
        num_classes=num_classes,
        soft=soft,
        reduction=reduction,
        weights=weights,
        where=where,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
    )
    if not soft:
        _validate.check_label_range(labels, num_classes, ignore_index, where)

    compute_dtype = jnp.promote_types(logits.dtype, jnp.float32)
    x = jnp.moveaxis(logits, axis, -1).astype(compute_dtype)
    if weights is not None:
        # Shaped [1, ..., 1, L] so it broadcasts against x without rank promotion.
        weights = weights.astype(compute_dtype).reshape((1,) * (x.ndim - 1) + (num_classes,))

    # Soft cap: s = c tanh(x / c); ds/dx = 1 - (s / c)^2 multiplies the gradient at the end.
    if logit_softcap is not None:
        tanh = jnp.tanh(x / logit_softcap)
        s = logit_softcap * tanh
    else:
        s = x

    # One softmax. The max shift is held constant for autodiff (it cancels mathematically).
    shift = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    shifted = s - shift
    exp = jnp.exp(shifted)
    sum_exp = jnp.sum(exp, axis=-1, keepdims=True)
    log_sum_exp = jnp.log(sum_exp)[..., 0]
    # exp is recomputed rather than kept: XLA then fuses each exp into its single consumer (the
    # sum, the gradient), which saves writing and re-reading an [.., L] buffer.
    probs = jnp.exp(shifted - log_sum_exp[..., None])
    lse = shift[..., 0] + log_sum_exp

    counted = jnp.ones(batch_shape, bool) if where is None else where
    eps = float(label_smoothing)
    if soft:
        target = jnp.moveaxis(labels, axis, -1).astype(compute_dtype)
        if eps:
            target = (1.0 - eps) * target + eps / num_classes
        if weights is not None:
            target = target * weights
        target_sum = jnp.sum(target, axis=-1)
        # t * s with the convention 0 * (-inf) = 0 for classes the target never visits.
        target_dot_s = jnp.sum(jnp.where(target != 0, target * shifted, 0.0), axis=-1)
        normaliser = jnp.ones(batch_shape, compute_dtype)
        bad = jnp.zeros(batch_shape, bool)
        target_grad = target
    else:
        if ignore_index is not None:
            counted = counted & (labels != ignore_index)
        in_range = (labels >= 0) & (labels < num_classes)
        bad = counted & ~in_range
        if _checked.enabled():
            _checked.check_labels(bad, labels, num_classes)
        y = jnp.where(in_range, labels, 0)
        s_y = jnp.take_along_axis(shifted, y[..., None], axis=-1)[..., 0]
        normaliser = jnp.ones(batch_shape, compute_dtype)
        if weights is not None:
            normaliser = normaliser * jnp.take(weights.ravel(), y)
        hard = (1.0 - eps) * normaliser  # weight of the target class in t
        target_sum = hard
        target_dot_s = hard * s_y
        is_target = lax.broadcasted_iota(labels.dtype, s.shape, s.ndim - 1) == y[..., None]
        target_grad = jnp.where(is_target, hard[..., None], 0.0)
        if eps:
            smooth = eps / num_classes * (1.0 if weights is None else weights)
            target_sum = target_sum + eps * (1.0 if weights is None else jnp.mean(weights))
            target_dot_s = target_dot_s + jnp.sum(
                jnp.where(smooth != 0, smooth * shifted, 0.0), axis=-1
            )
            target_grad = target_grad + smooth

    loss = target_sum * log_sum_exp - target_dot_s
    coef = target_sum
    if z_loss:
        loss = loss + z_loss * lse**2
        coef = coef + 2.0 * z_loss * lse
    grad = probs * coef[..., None] - target_grad
    if logit_softcap is not None:
        grad = grad * (1.0 - tanh**2)

    loss = jnp.where(counted, loss, 0.0)
    grad = jnp.where(counted[..., None], grad, 0.0)
    loss = jnp.where(bad, jnp.nan, loss)
    grad = jnp.where(bad[..., None], jnp.nan, grad)
    if reduction == "mean":
        scale = 1.0 / mean_denominator(counted, normaliser)
        loss, grad = jnp.sum(loss) * scale, grad * scale
    elif reduction == "sum":
        loss = jnp.sum(loss)
    return loss, jnp.moveaxis(grad, -1, axis).astype(logits.dtype)


def mean_denominator(counted: jax.Array, normaliser: jax.Array) -> jax.Array:
    r"""The divisor of ``reduction="mean"``: :math:`\sum_i m_i n_i`, or 1 when that is 0.

    Args:
        counted: Boolean mask :math:`m_i` of the examples that count.
        normaliser: :math:`n_i`: the target class's weight for integer labels with class
            weights, else 1.

    Returns:
        A positive scalar.
    """
    denominator = jnp.sum(jnp.where(counted, normaliser, 0.0))
    return jnp.where(denominator == 0, 1.0, denominator)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    reduction: Reduction = "mean",
    **options: object,
) -> jax.Array:
    r"""Softmax cross-entropy :math:`-\sum_l t_l \log \operatorname{softmax}(x)_l`, stably.

    The value part of :func:`loss_and_logits_grad`, which documents every option and the
    handling of bad input. Integer labels are class indices of shape ``logits.shape`` without
    ``axis``; floating labels are probabilities of ``logits.shape``. It is differentiable by
    ``jax.grad`` as well; under ``jit`` the unused gradient is never computed.

    Args:
        logits: Floating scores with classes along ``axis``.
        labels: Integer class indices or probabilities.
        axis: The class axis.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        **options: ``weights``, ``where``, ``ignore_index``, ``label_smoothing``, ``z_loss``,
            ``logit_softcap``; see :func:`loss_and_logits_grad`.

    Returns:
        The loss: a scalar, or one value per example for ``reduction="none"``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> print(f"{jxent.softmax_cross_entropy(jnp.array([[2.0, 0.0]]), jnp.array([0])):.4f}")
        0.1269
    """
    return loss_and_logits_grad(logits, labels, axis=axis, reduction=reduction, **options)[0]


def logits_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    reduction: Reduction = "mean",
    **options: object,
) -> jax.Array:
    r"""The hand-derived :math:`\partial J / \partial \text{logits} = p - \operatorname{onehot}(y)`.

    Scaled by the reduction (divided by the batch size, or weight sum, for ``"mean"``); with
    ``reduction="none"`` row ``i`` is the gradient of example ``i``'s own loss. For probability
    labels :math:`q` it is :math:`p \sum_l q_l - q`. See :func:`loss_and_logits_grad` for the
    options.

    Args:
        logits: Floating scores with classes along ``axis``.
        labels: Integer class indices or probabilities.
        axis: The class axis.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        **options: As for :func:`loss_and_logits_grad`.

    Returns:
        The gradient, with the logits' shape and dtype.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> print(jxent.logits_grad(jnp.array([[0.0, 0.0]]), jnp.array([0])))
        [[-0.5  0.5]]
    """
    return loss_and_logits_grad(logits, labels, axis=axis, reduction=reduction, **options)[1]
