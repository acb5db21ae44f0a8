r"""Softmax cross-entropy on materialised logits: one block of the row kernel, one derivative.

:func:`loss_and_logits_grad` returns the loss and the hand-derived logits gradient
:math:`G = \partial J/\partial\,\text{logits}` from one softmax (``_kernel``). The public loss
:func:`softmax_cross_entropy` is a ``jax.custom_jvp`` whose tangent is that same :math:`G`
contracted with the logits' tangent, plus the hand-derived terms for probability labels, class
weights, :math:`\varepsilon` and :math:`z` (``_kernel.label_coefficients``) -- the pattern of
``jax.nn.softmax``. So ``jax.grad`` of the loss *is* :func:`logits_grad` (by transposition),
and ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, ``jax.linearize`` and ``jax.vmap`` all use it.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent import _kernel, _options, _validate
from jxent._kernel import Rows, Target
from jxent._options import Arrays, Config

Reduction = Literal["mean", "sum", "none"]


class LossArgs(NamedTuple):
    """The loss's custom_jvp arguments, as :func:`prepare` makes them (rows = examples).

    Attributes:
        x: Logits as rows ``[R, L]`` (class axes last, flattened) in the compute dtype.
        labels: Class indices ``int32 [R]`` (clipped) or probabilities ``[R, L]``.
        counted: ``bool [R]``: ``where`` and not ``ignore_index``.
        bad: ``bool [R]``: counted with an out-of-range label or option (NaN loss).
        class_mask: ``bool [R, L]`` per-logit ``where``, or None.
        weights: Class weights ``[L]`` (ones without them).
        eps: Label smoothing (scalar).
        z: z-loss coefficient (scalar).
    """

    x: jax.Array
    labels: jax.Array
    counted: jax.Array
    bad: jax.Array
    class_mask: jax.Array | None
    weights: jax.Array
    eps: jax.Array
    z: jax.Array

    def rows(self) -> Rows:
        """The per-row facts the kernel takes."""
        return Rows(self.labels, self.counted, self.bad)

    def arrays(self) -> Arrays:
        """The traced options the kernel takes."""
        return Arrays(self.weights, self.eps, self.z)


class Problem(NamedTuple):
    """A validated call: the static config, the class-axis layout, the custom_jvp's arguments."""

    config: Config
    layout: _validate.Layout
    args: LossArgs


def prepare(
    function: str,
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
    **unknown: Any,
) -> Problem:
    """Validates every argument once; returns the static config and the kernel's arrays."""
    _options.check_option_names(unknown, function)
    if isinstance(logits, (tuple, list, dict)):
        raise TypeError(
            f"logits must be one array, found a {type(logits).__name__}; a predictor that returns "
            "(logits, aux) needs has_aux=True where it is given to jxent"
        )
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    layout = _validate.check_logits(logits, axis)
    soft = _validate.check_labels(logits.shape, labels, layout)
    row_mask, class_mask = _validate.check_where(where, logits.shape, layout)
    compute = jnp.promote_types(logits.dtype, jnp.float32)
    config, arrays = _options.prepare(
        batch_shape=layout.batch_shape,
        num_classes=layout.num_classes,
        soft=soft,
        compute_dtype=compute,
        reduction=reduction,
        weights=weights,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        class_mask=class_mask is not None,
    )
    if row_mask is None:
        row_mask = jnp.ones((layout.num_rows,), bool)
    x = layout.to_rows(logits).astype(compute)
    if soft:
        rows = Rows(layout.to_rows(labels), row_mask, jnp.zeros(row_mask.shape, bool))
    else:
        _validate.check_label_range(labels, layout.num_classes, ignore_index, row_mask)
        rows = _kernel.integer_rows(config, labels.reshape(-1), row_mask)
    rows = rows._replace(bad=rows.bad | _options.bad_option(config, arrays))
    return Problem(config, layout, LossArgs(x, *rows, class_mask, *arrays))


def counted_rows(problem: Problem) -> jax.Array:
    """``bool [rows]``: the examples the loss counts (``where``, ``ignore_index``, a class left)."""
    counted, class_mask = problem.args.counted, problem.args.class_mask
    if class_mask is not None:
        counted = counted & jnp.any(class_mask, axis=-1)
    return counted


def mean_denominators(problem: Problem) -> tuple[jax.Array, jax.Array]:
    r"""The ``"mean"`` reduction's two denominators: :math:`\sum_i m_i n_i` and :math:`\sum_i m_i`.

    The cross-entropy's (counted examples, weighted by their target class's weight with class
    weights and integer labels) and the z-term's (counted examples), as :func:`_kernel.row_scales`
    forms them: what a sum over micro-batches must be divided by to equal the batch's mean.
    """
    args = problem.args
    rows = Rows(args.labels, counted_rows(problem), args.bad)
    n = _kernel.mean_normaliser(problem.config, rows, args.weights)
    return _kernel.denominator(rows.counted, n), _kernel.denominator(rows.counted, n * 0 + 1)


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
        a: Each row's weight of its cross-entropy in the reduction (``_kernel.row_scales``).
        b: Each row's weight of its z-term.
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
    a: jax.Array
    b: jax.Array
    mean_ce: jax.Array
    normaliser_sum: jax.Array


def _forward(
    config: Config,
    x: jax.Array,
    labels: jax.Array,
    counted: jax.Array,
    bad: jax.Array,
    class_mask: jax.Array | None,
    weights: jax.Array,
    eps: jax.Array,
    z: jax.Array,
    *,
    with_grad: bool,
) -> _Forward:
    """The loss (reduced) and, ``with_grad``, :math:`G`, from one softmax over all classes."""
    arrays = Arrays(weights, eps, z)
    rows = Rows(labels, counted, bad)
    s, ds = _kernel.cap(config, x)
    if class_mask is not None:
        s = jnp.where(class_mask, s, _kernel.NEG_INF)
        if ds is not None:  # a masked logit does not enter the loss (and may be NaN padding)
            ds = jnp.where(class_mask, ds, 0.0)
    class_weights = weights if config.has_weights else None
    target = _kernel.target_block(config, labels, class_weights, eps, s, 0)
    stats = _kernel.block_stats(s, target)
    lse, ce, empty = _kernel.finish(stats)
    if class_mask is not None:  # every class masked: the example takes no part (optax)
        rows = rows._replace(counted=rows.counted & ~empty)
    rows = rows._replace(bad=rows.bad | (rows.counted & empty))  # no softmax over nothing
    a, b, n = _kernel.row_scales(config, rows, arrays.weights)
    per_row = _kernel.row_losses(config, rows, arrays, ce, lse, a, b)
    loss = per_row if config.reduction == "none" else jnp.sum(per_row)
    grad = None
    if with_grad:
        grad = _kernel.grad_block(config, rows, arrays, s, ds, target, stats, a, b)
        if class_mask is not None:  # the loss does not depend on a masked logit
            grad = jnp.where(class_mask, grad, 0.0)
    mean_ce = jnp.sum(jnp.where(rows.counted, a * ce, 0.0))
    normaliser_sum = _kernel.denominator(rows.counted, n)
    return _Forward(loss, grad, rows, s, ds, target, stats, lse, a, b, mean_ce, normaliser_sum)


def _is_zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, SymbolicZero)


def _tangent(config: Config, fwd: _Forward, arrays: Arrays, tangents: tuple) -> jax.Array:
    r""":math:`\langle G, \dot x\rangle` plus the label, weight, smoothing and z terms."""
    x_dot, q_dot, _, _, _, w_dot, eps_dot, z_dot = tangents
    per_row = jnp.zeros(fwd.rows.counted.shape, fwd.s.dtype)
    if not _is_zero(x_dot):
        per_row = per_row + jnp.sum(fwd.grad * x_dot, axis=-1)
    label_dots = (q_dot if config.soft else None, w_dot, eps_dot)
    if not all(_is_zero(t) for t in label_dots):
        coef = _kernel.label_coefficients(
            config, fwd.rows, arrays, fwd.s, fwd.target, fwd.stats, fwd.a
        )
        if config.soft and not _is_zero(q_dot):
            per_row = per_row + jnp.sum(coef.labels * q_dot, axis=-1)
        if not _is_zero(w_dot):
            per_row = per_row + jnp.sum(coef.weights * w_dot[None, :], axis=-1)
        if not _is_zero(eps_dot):
            per_row = per_row + jnp.sum(coef.smoothing, axis=-1) * eps_dot
    if not _is_zero(z_dot):
        lse = _kernel.safe_lse(fwd.rows, fwd.lse)
        per_row = per_row + jnp.where(fwd.rows.counted, fwd.b * lse**2, 0.0) * z_dot
    per_row = jnp.where(fwd.rows.bad, jnp.nan, per_row)
    if config.reduction == "none":
        return per_row
    total = jnp.sum(per_row)
    if not _is_zero(w_dot):
        d_w = _kernel.weights_denominator_grad(config, fwd.rows, fwd.mean_ce, fwd.normaliser_sum)
        if d_w is not None:
            total = total + jnp.sum(d_w * w_dot)
    return total


@functools.lru_cache(maxsize=256)
def _loss_fn(config: Config) -> Any:
    """The loss for one static config, as a custom_jvp built on the hand-derived gradient."""

    @jax.custom_jvp
    def loss_fn(x, labels, counted, bad, class_mask, weights, eps, z):
        args = (x, labels, counted, bad, class_mask, weights, eps, z)
        return _forward(config, *args, with_grad=False).loss

    def loss_jvp(primals, tangents):
        fwd = _forward(config, *primals, with_grad=False)
        if not _is_zero(tangents[0]):
            # G through its own custom_jvp: a second derivative uses the hand-derived Hessian.
            fwd = fwd._replace(grad=_grad_fn(config)(*primals))
        return fwd.loss, _tangent(config, fwd, LossArgs(*primals).arrays(), tangents)

    loss_fn.defjvp(loss_jvp, symbolic_zeros=True)
    # jit: an eager call runs one compiled program instead of dispatching op by op (faster first
    # calls); inside a caller's jit or transformation it is one more nested call.
    return jax.jit(loss_fn)


@functools.lru_cache(maxsize=256)
def _loss_and_grad_fn(config: Config) -> Any:
    """The loss and :math:`G` for one static config, jitted like :func:`_loss_fn`."""

    def loss_and_grad(*args: Any) -> tuple[jax.Array, jax.Array]:
        return _forward(config, *args, with_grad=False).loss, _grad_fn(config)(*args)

    return jax.jit(loss_and_grad)


# The arguments of the loss's custom_jvp that may carry tangents besides the logits: probability
# labels, class weights, label smoothing and the z-loss coefficient (positions in LossArgs).
_OTHER_FLOATS = tuple(LossArgs._fields.index(f) for f in ("labels", "weights", "eps", "z"))


@functools.lru_cache(maxsize=256)
def _grad_fn(config: Config) -> Any:
    r""":math:`G` as a custom_jvp whose tangent along the logits is the hand-derived :math:`Hv`.

    So ``jax.hessian``, ``jax.jvp(jax.grad(...))`` and the forward-over-reverse
    :func:`jxent.hessian_vector_product` use :func:`_kernel.curvature_block`. Tangents along the
    labels, class weights, :math:`\varepsilon` and :math:`z` (mixed second derivatives)
    differentiate the same row formula with JAX.
    """

    def plain(*args: Any) -> jax.Array:
        return _forward(config, *args, with_grad=True).grad

    @jax.custom_jvp
    def grad_fn(*args: Any) -> jax.Array:
        return plain(*args)

    def grad_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        grad = plain(*primals)
        if _is_zero(tangents[0]):
            dot = jnp.zeros_like(grad)
        else:
            dot = _logits_curvature_product(config, False, *primals, tangents[0])
        moving = [i for i in _OTHER_FLOATS if not _is_zero(tangents[i])]
        moving = [i for i in moving if i != _OTHER_FLOATS[0] or config.soft]  # int labels: none
        if moving:

            def along(*values: jax.Array) -> jax.Array:
                args = list(primals)
                for i, value in zip(moving, values, strict=True):
                    args[i] = value
                return plain(*args)

            primal_in = [primals[i] for i in moving]
            dot = dot + jax.jvp(along, primal_in, [tangents[i] for i in moving])[1]
        return grad, dot

    grad_fn.defjvp(grad_jvp, symbolic_zeros=True)
    return grad_fn


def _logits_curvature_product(config: Config, ggn: bool, *args: Any) -> jax.Array:
    """The hand-derived Hessian (or GGN) of the reduced loss with respect to ``x``, times ``v``."""
    *primals, v = args
    fwd = _forward(config, *primals, with_grad=False)
    se = jnp.where(fwd.rows.counted, fwd.stats.se, 1.0)
    p_dot_v = _kernel.tangent_sum(fwd.s, fwd.ds, fwd.stats.m, v) / se
    arrays = LossArgs(*primals).arrays()
    return _kernel.curvature_block(
        config,
        fwd.rows,
        arrays,
        fwd.s,
        fwd.ds,
        fwd.target,
        fwd.stats,
        fwd.a,
        fwd.b,
        v,
        p_dot_v,
        ggn=ggn,
    )


@functools.lru_cache(maxsize=256)
def _curvature_fn(config: Config, ggn: bool) -> Any:
    return jax.jit(functools.partial(_logits_curvature_product, config, ggn))


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
    problem = prepare(
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
    loss, grad = _loss_and_grad_fn(problem.config)(*problem.args)
    grad = problem.layout.from_rows(grad).astype(jnp.asarray(logits).dtype)
    return _batch_shaped(problem, loss), grad


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    reduction: Reduction = "mean",
    **options: Any,
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
    problem = prepare(
        "softmax_cross_entropy", logits, labels, axis=axis, reduction=reduction, **options
    )
    return _batch_shaped(problem, _loss_fn(problem.config)(*problem.args))


def _batch_shaped(problem: Problem, loss: jax.Array) -> jax.Array:
    """Per-example losses (``"none"``) in the examples' shape; a scalar stays a scalar."""
    return loss.reshape(problem.layout.batch_shape) if loss.ndim else loss


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
    problem = prepare("logits_grad", logits, labels, axis=axis, reduction=reduction, **options)
    grad = _loss_and_grad_fn(problem.config)(*problem.args)[1]
    return problem.layout.from_rows(grad).astype(jnp.asarray(logits).dtype)


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
    problem = prepare("logits_hvp", logits, labels, axis=axis, reduction=reduction, **options)
    v = jnp.asarray(tangents)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"tangents must have a floating dtype, found {v.dtype}")
    if v.shape != jnp.shape(logits):
        raise ValueError(
            f"tangents must have the logits' shape {jnp.shape(logits)}, found {v.shape}"
        )
    x = problem.args[0]
    v = problem.layout.to_rows(v).astype(x.dtype)
    out = _curvature_fn(problem.config, curvature == "ggn")(*problem.args, v)
    return problem.layout.from_rows(out).astype(jnp.asarray(logits).dtype)


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
    problem = prepare("ggn_diagonal", logits, labels, axis=axis, reduction=reduction, **options)
    return _factor_fn(problem.config)(*problem.args), problem.layout


@functools.lru_cache(maxsize=256)
def _factor_fn(config: Config) -> Any:
    def factor(*args: Any) -> jax.Array:
        fwd = _forward(config, *args, with_grad=False)
        rows = fwd.rows
        p = _kernel.probabilities(rows, fwd.s, fwd.stats)
        a = jnp.where(rows.bad, jnp.nan, fwd.a)
        eye = jnp.eye(config.num_classes, dtype=p.dtype)
        root_p = jnp.sqrt(p)
        s_cols = root_p[:, None, :] * (eye[None] - p[:, :, None])  # [R, l, k]
        cols = jnp.sqrt(a * fwd.stats.tsum)[:, None, None] * s_cols
        if config.has_z_loss:
            z_col = jnp.sqrt(2.0 * LossArgs(*args).z * fwd.b)[:, None] * p
            cols = jnp.concatenate([cols, z_col[:, :, None]], axis=2)
        if fwd.ds is not None:
            cols = cols * fwd.ds[:, :, None]
        return jnp.where(rows.counted[:, None, None], cols, 0.0)

    return jax.jit(factor)
