r"""Softmax cross-entropy on materialised logits: one block of the row kernel, one derivative.

:func:`loss_and_logits_grad` returns the loss and the hand-derived logits gradient
:math:`G = \partial J/\partial\,\text{logits}` from one softmax (``_kernel``). The public loss
:func:`softmax_cross_entropy` is a ``jax.custom_jvp`` of ``(logits, problem)`` -- the logits as
rows and the validated :class:`~jxent._problem.Problem` -- whose tangent is that same :math:`G`
contracted with the logits' tangent, plus the hand-derived terms for probability labels, class
weights, :math:`\varepsilon` and :math:`z` (``_kernel.option_tangent``, ``_kernel.z_tangent``)
-- the pattern of ``jax.nn.softmax``. So ``jax.grad`` of the loss *is* :func:`logits_grad` (by
transposition), and ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, ``jax.linearize`` and
``jax.vmap`` all use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent import _kernel, _options, _problem, _validate
from jxent._kernel import Rows, Target
from jxent._problem import Problem

Reduction = Literal["mean", "sum", "none"]


class Prepared(NamedTuple):
    """A validated call on materialised logits.

    Attributes:
        problem: Everything but the scores (:class:`~jxent._problem.Problem`).
        logits: The logits as rows ``[R, L]`` (class axes last, flattened), compute dtype.
        layout: Where the class axes were (to give gradients back in the logits' shape).
    """

    problem: Problem
    logits: jax.Array
    layout: _validate.Layout


def prepare_problem(
    function: str,
    logits: Any,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    **unknown: Any,
) -> tuple[Problem, _validate.Layout]:
    """Validates every argument once; needs only the logits' shape and dtype.

    ``logits`` may be an array or a ``jax.ShapeDtypeStruct`` (the micro-batched step and the
    checker know the logits' shape before they exist).
    """
    _options.check_option_names(unknown, function)
    if isinstance(logits, (tuple, list, dict)):
        raise TypeError(
            f"logits must be one array, found a {type(logits).__name__}; a predictor that returns "
            "(logits, aux) needs has_aux=True where it is given to jxent"
        )
    if not isinstance(logits, jax.ShapeDtypeStruct):
        logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    layout = _validate.check_logits(logits, axis)
    soft = _validate.check_labels(logits.shape, labels, layout)
    row_mask, class_mask = _validate.check_where(where, logits.shape, layout)
    options = {"reduction": reduction, "weights": weights, "ignore_index": ignore_index}
    options |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    problem = _problem.build(
        labels=layout.to_rows(labels) if soft else labels,
        row_mask=row_mask,
        class_mask=class_mask,
        num_rows=layout.num_rows,
        num_classes=layout.num_classes,
        soft=soft,
        compute_dtype=jnp.promote_types(logits.dtype, jnp.float32),
        options=options | {"logit_softcap": logit_softcap},
    )
    return problem, layout


def prepare(function: str, logits: ArrayLike, labels: ArrayLike, **options: Any) -> Prepared:
    """:func:`prepare_problem` and the logits as rows in the compute dtype."""
    problem, layout = prepare_problem(function, logits, labels, **options)
    dtype = problem.options.weights.dtype
    return Prepared(problem, layout.to_rows(jnp.asarray(logits)).astype(dtype), layout)


class _Forward(NamedTuple):
    r"""Everything one softmax over all classes gives, for the loss and its derivatives.

    Attributes:
        loss: The reduced loss (per row for ``"none"``).
        grad: :math:`G = \partial J / \partial x` ``[R, L]``, or None when not asked for.
        rows: The rows, with examples that have no class left uncounted or bad.
        s: Scores ``[R, L]``: the capped logits, ``-inf`` where masked.
        ds: ``ds/dx`` of the cap, or None without one.
        target: The effective target and its pieces (``_kernel.Target``).
        stats: The rows' softmax statistics (``_kernel.Stats``).
        lse: Log-sum-exp per row.
        ce_weight: Each row's weight of its cross-entropy in the reduction.
        z_weight: Each row's weight of its z-term (``_kernel.row_scales``).
        mean_ce: :math:`\sum_i a_i ce_i`, the reduction's cross-entropy part.
        normaliser_sum: The mean's denominator :math:`\sum_i m_i n_i`.
    """

    loss: jax.Array
    grad: jax.Array | None
    rows: Rows
    s: jax.Array
    ds: jax.Array | None
    target: Target
    stats: _kernel.Stats
    lse: jax.Array
    ce_weight: jax.Array
    z_weight: jax.Array
    mean_ce: jax.Array
    normaliser_sum: jax.Array


def _forward(problem: Problem, x: jax.Array, *, with_grad: bool, extra: bool = False) -> _Forward:
    """The loss (reduced) and, ``with_grad``, :math:`G`, from one softmax over all classes.

    ``extra``: the statistics carry the entropy's sum and the argmax too.
    """
    config, options, class_mask = problem.config, problem.options, problem.class_mask
    rows = problem.rows
    s, ds = _kernel.cap(config, x)
    if class_mask is not None:
        s = jnp.where(class_mask, s, _kernel.NEG_INF)
        if ds is not None:  # a masked logit does not enter the loss (and may be NaN padding)
            ds = jnp.where(class_mask, ds, 0.0)
    class_weights = options.weights if config.has_weights else None
    target = _kernel.target_block(config, rows.labels, class_weights, options.label_smoothing, s, 0)
    stats = _kernel.block_stats(s, target, extra=extra)
    lse, ce, empty = _kernel.finish(stats)
    if class_mask is not None:  # every class masked: the example takes no part (optax)
        rows = rows._replace(counted=rows.counted & ~empty)
    rows = rows._replace(bad=rows.bad | (rows.counted & empty))  # no softmax over nothing
    ce_weight, z_weight, n = _kernel.row_scales(config, rows, options.weights)
    per_row = _kernel.row_losses(config, rows, options, ce, lse, ce_weight, z_weight)
    loss = per_row if config.reduction == "none" else jnp.sum(per_row)
    grad = None
    if with_grad:
        grad = _kernel.grad_block(config, rows, options, s, ds, target, stats, ce_weight, z_weight)
        if class_mask is not None:  # the loss does not depend on a masked logit
            grad = jnp.where(class_mask, grad, 0.0)
    mean_ce = jnp.sum(jnp.where(rows.counted, ce_weight * ce, 0.0))
    normaliser_sum = _kernel.denominator(rows.counted, n)
    return _Forward(
        loss, grad, rows, s, ds, target, stats, lse, ce_weight, z_weight, mean_ce, normaliser_sum
    )


def _is_zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, SymbolicZero)


def _nonzero(tangent: Any) -> Any:
    """The tangent, or None for a (symbolic) zero."""
    return None if _is_zero(tangent) else tangent


def _option_dots(problem: Problem, dot: Problem) -> _kernel.OptionDots:
    """The tangents of the target's inputs (None where zero; integer labels have none)."""
    labels = _nonzero(dot.rows.labels) if problem.config.soft else None
    return _kernel.OptionDots(
        labels, _nonzero(dot.options.weights), _nonzero(dot.options.label_smoothing)
    )


def _tangent(problem: Problem, fwd: _Forward, x_dot: Any, dot: Problem) -> jax.Array:
    r""":math:`\langle G, \dot x\rangle` plus the label, weight, smoothing and z terms."""
    config, rows = problem.config, fwd.rows
    per_row = jnp.zeros(rows.counted.shape, fwd.s.dtype)
    if not _is_zero(x_dot):
        per_row = per_row + jnp.sum(fwd.grad * x_dot, axis=-1)
    option_dots = _option_dots(problem, dot)
    per_row = per_row + _kernel.option_tangent(
        config, rows, problem.options, fwd.s, fwd.target, fwd.stats, fwd.ce_weight, option_dots
    )
    z_dot = _nonzero(dot.options.z_loss)
    if z_dot is not None:
        per_row = per_row + _kernel.z_tangent(rows, fwd.lse, fwd.z_weight, z_dot)
    per_row = jnp.where(rows.bad, jnp.nan, per_row)
    if config.reduction == "none":
        return per_row
    total = jnp.sum(per_row)
    if option_dots.weights is not None:
        d_w = _kernel.weights_denominator_grad(config, rows, fwd.mean_ce, fwd.normaliser_sum)
        if d_w is not None:
            total = total + jnp.sum(d_w * option_dots.weights)
    return total


@jax.custom_jvp
def _loss(x: jax.Array, problem: Problem) -> jax.Array:
    """The loss of rows ``x`` ``[R, L]``, a custom_jvp built on the hand-derived gradient."""
    return _forward(problem, x, with_grad=False).loss


def _loss_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x, problem), (x_dot, dot) = primals, tangents
    fwd = _forward(problem, x, with_grad=False)
    if not _is_zero(x_dot):
        # G through its own custom_jvp: a second derivative uses the hand-derived Hessian.
        fwd = fwd._replace(grad=_grad(x, problem))
    return fwd.loss, _tangent(problem, fwd, x_dot, dot)


_loss.defjvp(_loss_jvp, symbolic_zeros=True)
# jit: an eager call runs one compiled program instead of dispatching op by op (faster first
# calls); inside a caller's jit or transformation it is one more nested call. The problem's
# static config keys the cache.
_loss_jit = jax.jit(_loss)


@jax.jit
def _loss_and_grad(x: jax.Array, problem: Problem) -> tuple[jax.Array, jax.Array]:
    """The loss and :math:`G`, jitted like :func:`_loss`."""
    return _forward(problem, x, with_grad=False).loss, _grad(x, problem)


@jax.custom_jvp
def _grad(x: jax.Array, problem: Problem) -> jax.Array:
    r""":math:`G` as a custom_jvp whose tangent along the logits is the hand-derived :math:`Hv`.

    So ``jax.hessian``, ``jax.jvp(jax.grad(...))`` and the forward-over-reverse
    :func:`jxent.hessian_vector_product` use :func:`_kernel.curvature_block`. Tangents along the
    labels, class weights, :math:`\varepsilon` and :math:`z` (mixed second derivatives)
    differentiate the same row formula with JAX.
    """
    return _forward(problem, x, with_grad=True).grad


def _grad_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x, problem), (x_dot, dot) = primals, tangents
    grad = _forward(problem, x, with_grad=True).grad
    if _is_zero(x_dot):
        out = jnp.zeros_like(grad)
    else:
        out = _curvature_product(x, problem, x_dot, ggn=False)
    option_dots = _option_dots(problem, dot)
    options_dot = _options.Arrays(
        option_dots.weights, option_dots.label_smoothing, _nonzero(dot.options.z_loss)
    )
    if option_dots.labels is not None or any(d is not None for d in options_dot):

        def along(labels: jax.Array, options: _options.Arrays) -> jax.Array:
            rows = problem.rows._replace(labels=labels)
            moved = dataclasses.replace(problem, rows=rows, options=options)
            return _forward(moved, x, with_grad=True).grad

        def or_zero(d: Any, primal: jax.Array) -> jax.Array:
            return jnp.zeros_like(primal) if d is None else d

        labels_dot = option_dots.labels
        if labels_dot is None:  # integer labels take a float0 tangent
            labels_dot = jax.tree.map(_zero_tangent, problem.rows.labels)
        options_dot = jax.tree.map(or_zero, options_dot, problem.options, is_leaf=_is_none)
        primal_in = (problem.rows.labels, problem.options)
        out = out + jax.jvp(along, primal_in, (labels_dot, options_dot))[1]
    return grad, out


def _is_none(v: Any) -> bool:
    return v is None


def _zero_tangent(primal: jax.Array) -> jax.Array:
    """A zero tangent of the primal's kind (``float0`` for integers)."""
    if jnp.issubdtype(primal.dtype, jnp.inexact):
        return jnp.zeros_like(primal)
    return np.zeros(primal.shape, jax.dtypes.float0)


_grad.defjvp(_grad_jvp, symbolic_zeros=True)


def _curvature_product(x: jax.Array, problem: Problem, v: jax.Array, *, ggn: bool) -> jax.Array:
    """The hand-derived Hessian (or GGN) of the reduced loss with respect to ``x``, times ``v``."""
    fwd = _forward(problem, x, with_grad=False)
    se = jnp.where(fwd.rows.counted, fwd.stats.se, 1.0)
    p_dot_v = _kernel.tangent_sum(fwd.s, fwd.ds, fwd.stats.m, v) / se
    return _kernel.curvature_block(
        problem.config,
        fwd.rows,
        problem.options,
        fwd.s,
        fwd.ds,
        fwd.target,
        fwd.stats,
        fwd.ce_weight,
        fwd.z_weight,
        v,
        p_dot_v,
        ggn=ggn,
    )


_curvature_jit = jax.jit(_curvature_product, static_argnames="ggn")


def loss_and_logits_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
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
    divide by the count). The z-loss term of the mean is averaged over counted examples without
    class weights (Liger Kernel's ``CrossEntropyWithZLoss``). When no example counts (every
    example masked) the mean is 0 and the gradient is zero, never NaN; when examples count but
    the class weights of their targets sum to 0, the weighted mean is undefined and is NaN, as
    PyTorch's (not the sum).

    Derivative: :func:`softmax_cross_entropy` is a ``jax.custom_jvp`` whose tangent is this
    gradient (plus the hand-derived terms for probability labels, class weights,
    ``label_smoothing`` and ``z_loss``), so every autodiff mode uses it; ``docs/derivation.md``.

    Dtypes: integer labels are class indices of shape ``logits.shape`` without ``axis``;
    floating labels are probabilities of the logits' shape. bfloat16/float16 logits are computed
    in float32; the loss is returned in that compute dtype and the gradient in the logits' dtype.

    Bad labels: outside ``jit`` an integer label outside ``[0, L)`` that is counted raises
    ``ValueError`` naming its position. Under ``jit`` that example's loss and its gradient row are
    NaN (so a ``"mean"``/``"sum"`` loss is NaN too) and every other row is unaffected; wrap the
    function in :func:`jxent.checked` to raise instead. A target whose logit is ``-inf`` gives a
    ``+inf`` loss with a finite gradient; ``-inf`` logits of non-target classes get exactly zero
    probability and gradient (also with a soft cap), and label smoothing puts no mass on them.

    Args:
        logits: Scores, floating, of shape ``[..., L, ...]`` with classes along ``axis``.
        labels: Integer class indices (shape of ``logits`` without ``axis``) or probabilities
            (shape of ``logits``).
        axis: The class axis, or a tuple of axes flattened in that order (optax).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]`` (PyTorch ``weight=``).
        where: Boolean mask: with the examples' shape, ``False`` examples contribute nothing;
            broadcastable to the logits' shape (optax), ``False`` classes leave the softmax (a
            label on such a class gives ``+inf``), and an example with none left does not count.
        ignore_index: Integer label value whose examples contribute nothing (integer labels only;
            a value the labels' dtype cannot hold ignores nothing).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, PyTorch semantics; may be traced (out of
            range under ``jit``: NaN).
        z_loss: Coefficient :math:`z \ge 0` of the :math:`\operatorname{lse}^2` penalty (PaLM);
            may be traced.
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
    prepared = prepare(
        "loss_and_logits_grad",
        logits,
        labels,
        axis=axis,
        reduction=reduction,
        weights=weights,
        where=where,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
    )
    loss, grad = loss_and_grad(prepared)
    return loss, grad.astype(jnp.asarray(logits).dtype)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    return_stats: bool = False,
    **options: Any,
) -> jax.Array | tuple[jax.Array, _kernel.CrossEntropyStats]:
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
        return_stats: Also return each example's :class:`jxent.CrossEntropyStats`
            (log-sum-exp, entropy, argmax, correct, z-term; in the examples' shape; not
            differentiated), from the same softmax (under ``jit`` XLA shares its max and
            exponentials with the loss's).
        **options: ``weights``, ``where``, ``ignore_index``, ``label_smoothing``, ``z_loss``,
            ``logit_softcap``; see :func:`loss_and_logits_grad`.

    Returns:
        The loss: a scalar, or one value per example for ``reduction="none"``; with
        ``return_stats``, ``(loss, stats)``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> print(f"{jxent.softmax_cross_entropy(jnp.array([[2.0, 0.0]]), jnp.array([0])):.4f}")
        0.1269
    """
    prepared = prepare(
        "softmax_cross_entropy", logits, labels, axis=axis, reduction=reduction, **options
    )
    loss = _batch_shaped(prepared, _loss_jit(prepared.logits, prepared.problem))
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, found {return_stats!r}")
    if not return_stats:
        return loss
    stats = _row_stats(lax.stop_gradient(prepared.logits), prepared.problem)
    return loss, _kernel.CrossEntropyStats(*(_batch_shaped(prepared, v) for v in stats))


@jax.jit
def _row_stats(x: jax.Array, problem: Problem) -> _kernel.CrossEntropyStats:
    """Each row's :class:`~jxent._kernel.CrossEntropyStats` from the loss's own expressions."""
    fwd = _forward(problem, x, with_grad=False, extra=True)
    entropy = _kernel.entropy(fwd.stats)
    config, options = problem.config, problem.options
    return _kernel.cross_entropy_stats(config, fwd.rows, options, fwd.lse, entropy, fwd.stats.arg)


def loss_and_grad(prepared: Prepared) -> tuple[jax.Array, jax.Array]:
    """The loss (in the examples' shape for ``"none"``) and :math:`G` in the logits' shape.

    :math:`G` is in the compute dtype; the public functions cast it to the logits' dtype.
    """
    loss, grad = _loss_and_grad(prepared.logits, prepared.problem)
    return _batch_shaped(prepared, loss), prepared.layout.from_rows(grad)


def _batch_shaped(prepared: Prepared, loss: jax.Array) -> jax.Array:
    """Per-example losses (``"none"``) in the examples' shape; a scalar stays a scalar."""
    return loss.reshape(prepared.layout.batch_shape) if loss.ndim else loss


def logits_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    **options: Any,
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
    prepared = prepare("logits_grad", logits, labels, axis=axis, reduction=reduction, **options)
    return loss_and_grad(prepared)[1].astype(jnp.asarray(logits).dtype)


Curvature = Literal["hessian", "ggn"]


def logits_hvp(
    logits: ArrayLike,
    labels: ArrayLike,
    tangents: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    curvature: Curvature = "hessian",
    **options: Any,
) -> jax.Array:
    r"""The hand-derived Hessian of the loss with respect to the logits, times ``tangents``.

    For one example with scores :math:`s` (the logits, soft-capped if ``logit_softcap``),
    :math:`p = \operatorname{softmax}(s)`, effective target :math:`t`, :math:`T = \sum_l t_l`
    and z-loss coefficient :math:`z` (see :func:`loss_and_logits_grad`), the loss
    :math:`\ell = T\operatorname{lse}(s) - t\cdot s + z\operatorname{lse}(s)^2` has

    .. math::

        \nabla^2_s \ell = (T + 2z\operatorname{lse})\,\big(\operatorname{diag}(p) - pp^\top\big)
        + 2z\,pp^\top, \qquad
        \nabla^2_s \ell\; v = (T + 2z\operatorname{lse})\,\big(p\odot v - p\,(p\cdot v)\big)
        + 2z\,p\,(p\cdot v),

    :math:`O(L)` per example, never an :math:`L\times L` matrix. With a soft cap
    :math:`s = c\tanh(x/c)`, :math:`s' = 1 - (s/c)^2`, :math:`s'' = -(2/c)(s/c)s'`:
    :math:`\nabla^2_x\ell\,v = s'\odot\nabla^2_s\ell\,(s'\odot v)
    + (\nabla_s\ell)\odot s''\odot v`. Masks, ignored labels, class weights and the reduction's
    scaling enter as in the gradient; with ``reduction="none"`` row ``i`` is the product with
    example ``i``'s own Hessian (the Hessian of the sum is block-diagonal).

    ``curvature="ggn"`` gives the generalised Gauss-Newton part, positive semi-definite for
    non-negative targets and weights: :math:`T(\operatorname{diag}(p) - pp^\top) + 2z\,pp^\top`
    in :math:`s`, and :math:`s'\odot(\cdot)\odot s'` for the cap, which counts as part of the
    model (no :math:`s''` term). The z-loss enters as the Gauss-Newton term of the square of the
    residual :math:`\operatorname{lse}` (the :math:`2z\operatorname{lse}\,(\operatorname{diag}(p)
    - pp^\top)` term, indefinite for :math:`\operatorname{lse} < 0`, is left out). Without a
    z-loss, for plain labels (:math:`T = 1`), it is the Fisher information of the categorical
    distribution :math:`p` in :math:`s`. ``docs/derivation.md`` derives both.

    Args:
        logits: Floating scores with classes along ``axis``.
        labels: Integer class indices or probabilities.
        tangents: The direction :math:`v`, shaped like ``logits``, floating.
        axis: The class axis, or a tuple of axes.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        curvature: ``"hessian"`` (exact) or ``"ggn"``.
        **options: As for :func:`loss_and_logits_grad`.

    Returns:
        :math:`\nabla^2_{\text{logits}} J\,v` with the logits' shape and dtype (computed in
        float32 for bf16/float16 logits). Zero in examples that do not count; NaN in examples
        with a bad label under ``jit``, as the gradient.

    Raises:
        TypeError: As :func:`loss_and_logits_grad`; non-floating ``tangents``.
        ValueError: As :func:`loss_and_logits_grad`; ``tangents`` not shaped like the logits;
            an unknown ``curvature``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> logits, v = jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]])
        >>> print(jxent.logits_hvp(logits, jnp.array([0]), v))  # (diag(p) - pp^T) v, p = 1/2
        [[ 0.25 -0.25]]

    References:
        Martens 2020, "New insights and perspectives on the natural gradient method"
        (GGN and Fisher); Schraudolph 2002 (Gauss-Newton products); BackPACK and curvlinops
        (softmax Hessian factorisations); PaLM (z-loss), Gemma 2 (soft cap).
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', found {curvature!r}")
    prepared = prepare("logits_hvp", logits, labels, axis=axis, reduction=reduction, **options)
    v = jnp.asarray(tangents)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"tangents must have a floating dtype, found {v.dtype}")
    if v.shape != jnp.shape(logits):
        raise ValueError(
            f"tangents must have the logits' shape {jnp.shape(logits)}, found {v.shape}"
        )
    x, layout = prepared.logits, prepared.layout
    v = layout.to_rows(v).astype(x.dtype)
    out = _curvature_jit(x, prepared.problem, v, ggn=curvature == "ggn")
    return layout.from_rows(out).astype(jnp.asarray(logits).dtype)


def ggn_factor(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    **options: Any,
) -> tuple[jax.Array, _validate.Layout]:
    r"""``F`` ``[rows, L, K]`` with :math:`F_r F_r^\top` each row's GGN logits curvature.

    :math:`\operatorname{diag}(p) - pp^\top = SS^\top` with columns
    :math:`S_{:,k} = \sqrt{p_k}\,(e_k - p)` (BackPACK's symmetric factorisation), so
    :math:`aT(\operatorname{diag}(p) - pp^\top) + 2bz\,pp^\top = FF^\top` with
    :math:`F = [\sqrt{aT}\,S,\ \sqrt{2bz}\,p]` (the last column only with a z-loss), each row
    scaled by the cap's :math:`s'`. Needs :math:`aT \ge 0` (non-negative targets and class
    weights; otherwise NaN). Zero for rows that do not count, NaN for bad rows.
    """
    prepared = prepare("ggn_diagonal", logits, labels, axis=axis, reduction=reduction, **options)
    return _factor(prepared.logits, prepared.problem), prepared.layout


@jax.jit
def _factor(x: jax.Array, problem: Problem) -> jax.Array:
    config = problem.config
    fwd = _forward(problem, x, with_grad=False)
    rows = fwd.rows
    p = _kernel.probabilities(rows, fwd.s, fwd.stats)
    ce_weight = jnp.where(rows.bad, jnp.nan, fwd.ce_weight)
    eye = jnp.eye(config.num_classes, dtype=p.dtype)
    root_p = jnp.sqrt(p)
    s_cols = root_p[:, None, :] * (eye[None] - p[:, :, None])  # [R, l, k]
    cols = jnp.sqrt(ce_weight * fwd.stats.tsum)[:, None, None] * s_cols
    if config.has_z_loss:
        z_col = jnp.sqrt(2.0 * problem.options.z_loss * fwd.z_weight)[:, None] * p
        cols = jnp.concatenate([cols, z_col[:, :, None]], axis=2)
    if fwd.ds is not None:
        cols = cols * fwd.ds[:, :, None]
    return jnp.where(rows.counted[:, None, None], cols, 0.0)
