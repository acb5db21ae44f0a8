r"""Linear + softmax cross-entropy that never materialises the ``[tokens, vocab]`` logits.

For a language-model head :math:`z = x W + b` (:math:`x \in \mathbb{R}^{N\times D}`,
:math:`W \in \mathbb{R}^{D\times L}`) the hand-derived logits gradient :math:`G` gives

.. math::

    \frac{\partial J}{\partial x} = G W^\top, \qquad \frac{\partial J}{\partial W} = x^\top G,
    \qquad \frac{\partial J}{\partial b} = \textstyle\sum_i G_i,

and each row of :math:`G` needs only its own logits and log-sum-exp. This module is a schedule
over the row kernel (``_kernel``): tokens go in chunks (a ``lax.scan``) and, within a chunk,
the vocabulary in blocks, twice. Pass A folds each block's :func:`_kernel.block_stats` into the
running statistics with :func:`_kernel.merge` (the online softmax): the log-sum-exp and the loss.
Pass B forms each block's logits again and its rows of :math:`G` (:func:`_kernel.grad_block`),
then :math:`dx \mathrel{+}= G_b W_b^\top`, :math:`dW_b \mathrel{+}= x^\top G_b` in place. That is
:math:`8NDL` FLOPs against the materialised :math:`6NDL`, but every matmul has a long inner
dimension and every buffer is ``[chunk, block]``; with one block over the whole vocabulary
(``vocab_block_size=L``) both passes share the logits (:math:`6NDL`). The vocab-parallel loss
runs the same scan on each vocabulary shard and merges the shards' statistics with
``pmax``/``psum``.

The derivative is a ``jax.custom_jvp`` of ``(head, problem)``: the differentiable
:class:`Head` ``(x, w, bias)`` and the validated :class:`~jxent._problem.Problem`, whose
tangents (probability labels, class weights, :math:`\varepsilon`, :math:`z`) arrive as a
``Problem`` of tangents. For ``"mean"``/``"sum"`` its rule runs pass B in the forward
computation and the tangent is :math:`\langle dx, \dot x\rangle + \langle dW, \dot W\rangle +
\langle db, \dot b\rangle` (plus the option terms), which transposes to exactly the gradients.
For ``"none"`` the rule contracts each block's :math:`G_b` with :math:`\dot z_b = \dot x W_b +
x \dot W_b + \dot b_b` row by row; that map is linear, JAX transposes it for reverse mode, and
``jax.checkpoint`` makes the transpose recompute :math:`G_b` instead of storing it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jxent import _kernel, _options, _problem, _validate
from jxent._head import _chunked, _tokens
from jxent._kernel import CrossEntropyStats, OptionDots, Rows
from jxent._loss import Reduction
from jxent._options import Arrays
from jxent._problem import Problem


class Head(NamedTuple):
    """The head's differentiable inputs.

    Attributes:
        x: Hidden states ``[N, D]``.
        w: Output projection ``[D, L]``.
        bias: ``[L]`` (zeros without one).
    """

    x: jax.Array
    w: jax.Array
    bias: jax.Array


# Each input's dimensions for _tokens: T tokens, V classes (the vocab-parallel shard), . neither.
HEAD_ROLES = Head("T.", ".V", "V")
_OPTION_ROLES = OptionDots("TV", "V", "")


def prepare(
    function: str,
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    bias: ArrayLike | None,
    where: ArrayLike | None,
    options: dict[str, Any],
    vocab_shards: int = 1,
) -> tuple[Head, Problem]:
    """Validates the arguments once; returns the head and the problem.

    ``vocab_shards > 1``: inside the user's ``shard_map`` over the vocabulary, ``w`` and
    ``bias`` are this device's shard of ``L = w.shape[1] * vocab_shards`` classes; labels are
    global class indices (integer only, no class weights: both would need the whole ``[L]``).
    """
    _options.check_option_names(options, function)
    if "axis" in options:
        raise TypeError(f"{function}() has no axis option: classes are w's columns")
    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    num_tokens, local_classes = check_shapes(x, w, bias)
    num_classes = local_classes * vocab_shards
    if vocab_shards > 1 and (
        options.get("weights") is not None or jnp.issubdtype(labels.dtype, jnp.floating)
    ):
        raise ValueError(
            f"{function} inside jax.shard_map over the vocabulary takes integer labels and no "
            "class weights (both need every class on each device); call it outside shard_map "
            "for those"
        )
    layout = _validate.Layout((0, 1), (num_tokens,), (num_classes,))
    soft = _validate.check_labels((num_tokens, num_classes), labels, layout)
    row_mask, class_mask = _validate.check_where(where, (num_tokens, num_classes), layout)
    if class_mask is not None:
        raise ValueError(
            f"{function}: where must be a token mask of shape ({num_tokens},); a per-logit mask "
            f"needs the logits, which this loss never forms (use softmax_cross_entropy)"
        )
    problem = _problem.build(
        labels=labels,
        row_mask=row_mask,
        class_mask=None,
        num_rows=num_tokens,
        num_classes=num_classes,
        soft=soft,
        compute_dtype=_chunked.accumulation_dtype(x, w),
        options=options,
    )
    bias = jnp.zeros((local_classes,), w.dtype) if bias is None else jnp.asarray(bias)
    return Head(x, w, bias), problem


def check_shapes(
    x: jax.Array, w: jax.Array, bias: ArrayLike | None, prefix: str = ""
) -> tuple[int, int]:
    """``(N, L)`` of a head ``x [N, D]``, ``w [D, L]``, ``bias [L]``; raises on anything else.

    ``prefix`` names the arguments in the messages (``"teacher_"``: ``teacher_x``, ...).
    """
    nx, nw, nb = (prefix + n for n in ("x", "w", "bias"))
    for name, a in ((nx, x), (nw, w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, found {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, found shape {a.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"{nx} is [N, D] = {x.shape} but {nw} is [D, L] = {w.shape}: D differs")
    if w.shape[1] == 0:
        raise ValueError(f"{nw} must have at least one class (column), found shape {w.shape}")
    if bias is not None and jnp.shape(bias) != (w.shape[1],):
        raise ValueError(f"{nb} must have shape ({w.shape[1]},), found {jnp.shape(bias)}")
    return x.shape[0], w.shape[1]


def _zero(t: Any) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _nonzero(t: Any) -> Any:
    return None if _zero(t) else t


class _Derivatives(NamedTuple):
    """Which derivatives the gradient pass must produce (static)."""

    x: bool = False
    w: bool = False
    bias: bool = False
    labels: bool = False
    weights: bool = False
    label_smoothing: bool = False


class _Outputs(NamedTuple):
    """What a scan returns (None: not asked for). Per token ``[N, ...]`` first, then sums."""

    loss: jax.Array | None = None  # each token's share of the loss
    ce: jax.Array | None = None  # its cross-entropy (0 where it does not count)
    lse: jax.Array | None = None  # its log-sum-exp
    entropy: jax.Array | None = None  # its softmax's entropy (return_stats)
    argmax: jax.Array | None = None  # its most probable class (return_stats)
    tangent: jax.Array | None = None  # the per-token tangent (forward mode, reduction "none")
    dx: jax.Array | None = None
    dlabels: jax.Array | None = None  # d/d(probability labels)
    dw: jax.Array | None = None
    dbias: jax.Array | None = None
    dweights: jax.Array | None = None
    dlabel_smoothing: jax.Array | None = None


_OUTPUT_ROLES = _Outputs("T", "T", "T", "T", "T", "T", "T.", "TV", ".V", "V", "V", "")
_SUMS = ("dw", "dbias", "dweights", "dlabel_smoothing")  # the scan's carry: sums over chunks


class Chunk(NamedTuple):
    """One chunk of the per-token inputs."""

    x: jax.Array
    rows: Rows
    ce_weight: jax.Array  # the token's weight of its cross-entropy in the reduction
    z_weight: jax.Array  # the token's weight of its z-term
    x_dot: jax.Array | None = None
    labels_dot: jax.Array | None = None


class Dots(NamedTuple):
    """The tangents a pass contracts with (None where zero)."""

    head: Head
    options: OptionDots


class Pass(NamedTuple):
    """What every pass body reads: the schedule, the head, the problem, the tangents."""

    sched: _chunked.Schedule
    head: Head
    problem: Problem
    dots: Dots | None
    offset: Any  # global column of this shard's first class
    extra: bool = False  # the statistics' entropy sum and argmax too (return_stats)


class _BlockParts(NamedTuple):
    """Block ``[start, start + size)`` of one chunk, as every pass needs it."""

    blk: _chunked.Block
    target: _kernel.Target
    options: Arrays  # the problem's options with this block's class weights
    logits_dot: jax.Array | None  # the block's logits' tangent, when asked for


def block(ctx: Pass, c: Chunk, rows: Rows, start: Any, size: int, dot: bool = False):
    """Block ``[start, start + size)``: its logits, target, local options, logits' tangent."""
    head, problem, config = ctx.head, ctx.problem, ctx.problem.config
    blk = _chunked.block_logits(config, c.x, head.w, head.bias, start, size)
    options = problem.options
    weights = lax.dynamic_slice_in_dim(options.weights, start, size)
    if config.soft:  # probabilities sliced locally, class indices compared with global columns
        labels, first = lax.dynamic_slice_in_dim(rows.labels, start, size, axis=1), 0
    else:
        labels, first = rows.labels, start + ctx.offset
    class_weights = weights if config.has_weights else None
    target = _kernel.target_block(
        config, labels, class_weights, options.label_smoothing, blk.s, first
    )
    logits_dot = None
    if dot:
        head_dot, acc = ctx.dots.head, blk.logits.dtype
        logits_dot = jnp.zeros(blk.logits.shape, acc)
        if head_dot.x is not None:
            logits_dot = logits_dot + jnp.dot(c.x_dot, blk.w, preferred_element_type=acc)
        if head_dot.w is not None:
            w_dot = lax.dynamic_slice_in_dim(head_dot.w, start, size, axis=1)
            x = counted_only(c.x, rows)  # its transpose is x^T G: NaN padding must not reach dW
            logits_dot = logits_dot + jnp.dot(x, w_dot, preferred_element_type=acc)
        if head_dot.bias is not None:
            bias_dot = lax.dynamic_slice_in_dim(head_dot.bias, start, size)
            logits_dot = logits_dot + bias_dot.astype(acc)[None, :]
    return _BlockParts(blk, target, options._replace(weights=weights), logits_dot)


def counted_only(x: jax.Array, rows: Rows) -> jax.Array:
    """``x`` with the rows that do not count zeroed (padding may hold NaN; ``0 * NaN`` is NaN)."""
    return jnp.where(rows.counted[:, None], x, jnp.zeros((), x.dtype))


def stats_pass(ctx: Pass, c: Chunk, rows: Rows, scan_zero: jax.Array) -> _kernel.Stats:
    """Pass A: the chunk's online-softmax statistics over every block (and vocab shard)."""

    def fold(st: _kernel.Stats, start: Any, size: int) -> _kernel.Stats:
        part = block(ctx, c, rows, start, size)
        first = start + ctx.offset
        return _kernel.merge(
            st, _kernel.block_stats(part.blk.s, part.target, extra=ctx.extra, start=first)
        )

    zeros = jnp.zeros(c.rows.counted.shape, _chunked.accumulation_dtype(c.x, ctx.head.w))
    init = _kernel.Stats(zeros - jnp.inf, zeros, zeros, zeros)
    if ctx.extra:
        init = init._replace(es=zeros, arg=jnp.zeros(zeros.shape, jnp.int32))
    st = _chunked.over_blocks(fold, init, ctx.head.w.shape[1], ctx.sched.block, scan_zero)
    return st if ctx.sched.vocab_axis is None else _kernel.merge_shards(st, ctx.sched.vocab_axis)


def _grads_pass(
    ctx: Pass, c: Chunk, rows: Rows, st: _kernel.Stats, want: _Derivatives, sums: dict, scan_zero
) -> tuple[dict, dict]:
    """Pass B: each block's rows of G, into dx, dlabels (per token) and the sums dW, db, ..."""
    config, x = ctx.problem.config, counted_only(c.x, rows)  # x^T G: no NaN padding in dW
    acc = st.se.dtype

    def fold(g: dict, start: Any, size: int) -> dict:
        blk, target, options, _ = block(ctx, c, rows, start, size)
        grad = _kernel.grad_block(
            config, rows, options, blk.s, blk.ds, target, st, c.ce_weight, c.z_weight
        )
        g = dict(g)  # G stays in the accumulation dtype (float32 for bf16/float16 inputs)
        if want.x:
            g["dx"] = g["dx"] + _chunked.matmul(grad, blk.w.T, acc)
        if want.w:
            g["dw"] = _chunked.add_columns(g["dw"], _chunked.matmul(x.T, grad, acc), start, 1)
        if want.bias:
            g["dbias"] = _chunked.add_columns(g["dbias"], jnp.sum(grad, axis=0), start, 0)
        if want.labels or want.weights or want.label_smoothing:
            # The transpose of _kernel.option_tangent: the same coefficients, summed.
            coef = _kernel.label_coefficients(config, rows, options, blk.s, target, st, c.ce_weight)
            if want.labels:
                g["dlabels"] = lax.dynamic_update_slice_in_dim(g["dlabels"], coef.labels, start, 1)
            if want.weights:
                g["dweights"] = _chunked.add_columns(
                    g["dweights"], jnp.sum(coef.weights, axis=0), start, 0
                )
            if want.label_smoothing:
                g["dlabel_smoothing"] = g["dlabel_smoothing"] + jnp.sum(coef.smoothing)
        return g

    num_classes = ctx.head.w.shape[1]
    per_token = {"dx": jnp.zeros(x.shape, acc) if want.x else None}
    per_token["dlabels"] = jnp.zeros((x.shape[0], num_classes), acc) if want.labels else None
    g = _chunked.over_blocks(fold, per_token | sums, num_classes, ctx.sched.block, scan_zero)
    return {k: g[k] for k in sums}, {k: g[k] for k in per_token if g[k] is not None}


def _tangent_pass(ctx: Pass, c: Chunk, rows: Rows, st: _kernel.Stats, scan_zero) -> jax.Array:
    """The per-token tangent ``<G_i, z_dot_i>`` plus the option terms, block by block."""
    config, option_dots = ctx.problem.config, ctx.dots.options

    def contract(c: Chunk, st: _kernel.Stats, start: Any, size: int) -> jax.Array:
        blk, target, options, logits_dot = block(ctx, c, rows, start, size, dot=True)
        grad = _kernel.grad_block(
            config, rows, options, blk.s, blk.ds, target, st, c.ce_weight, c.z_weight
        )
        labels_dot = None
        if c.labels_dot is not None:
            labels_dot = lax.dynamic_slice_in_dim(c.labels_dot, start, size, axis=1)
        weights_dot = None
        if option_dots.weights is not None:
            weights_dot = lax.dynamic_slice_in_dim(option_dots.weights, start, size)
        dots = OptionDots(labels_dot, weights_dot, option_dots.label_smoothing)
        out = _kernel.option_tangent(config, rows, options, blk.s, target, st, c.ce_weight, dots)
        return out + jnp.sum(grad * logits_dot, axis=1)

    def fold(t: jax.Array, start: Any, size: int) -> jax.Array:
        # Checkpointed: reverse mode recomputes G_b instead of keeping an [N, L] residual.
        return t + jax.checkpoint(contract, static_argnums=3)(c, st, start, size)

    zeros = jnp.zeros(c.rows.counted.shape, st.se.dtype)
    return _chunked.over_blocks(fold, zeros, ctx.head.w.shape[1], ctx.sched.block, scan_zero)


def chunks_of(head: Head, problem: Problem, scales: tuple, dots: Dots | None = None) -> Chunk:
    """The per-token inputs that the scan splits into chunks."""
    x_dot = None if dots is None else dots.head.x
    labels_dot = None if dots is None else dots.options.labels
    return Chunk(head.x, problem.rows, *scales, x_dot, labels_dot)


def _scan(
    sched: _chunked.Schedule,
    want: _Derivatives,
    extra: bool,
    head: Head,
    problem: Problem,
    scales: tuple[jax.Array, jax.Array],
    dots: Dots | None = None,
) -> _Outputs:
    """Per-token losses and what ``want`` asks for, or (``dots``) the per-token tangent.

    Runs on the tokens and vocabulary of one device: inside ``shard_map`` over a vocabulary
    axis (``sched.vocab_axis``), ``w``, ``bias``, the class weights and probability labels are
    the local shard, each chunk's statistics are merged across shards before pass B, and the
    partial sums over classes (``dx``, the tangent, ``dlabel_smoothing``) are ``psum``-ed at the
    end. ``scales``: each token's weight of its cross-entropy and of its z-term. ``extra``:
    each token's entropy and argmax too, from the same statistics.
    """
    config, w = problem.config, head.w
    acc = _chunked.accumulation_dtype(head.x, w)
    offset = 0
    if sched.vocab_axis is not None:
        offset = lax.axis_index(sched.vocab_axis) * w.shape[1]
    ctx = Pass(sched, head, problem, dots, offset, extra)
    shapes = {"dw": w.shape, "dbias": w.shape[1:], "dweights": w.shape[1:]}
    shapes["dlabel_smoothing"] = ()
    sums = {k: jnp.zeros(shapes[k], acc) for k in _SUMS if getattr(want, k[1:])}

    def body(sums: dict, c: Chunk, scan_zero: jax.Array) -> tuple[dict, dict]:
        rows = c.rows
        st = stats_pass(ctx, c, rows, scan_zero)
        lse, ce, empty = _kernel.finish(st)
        rows = rows._replace(bad=rows.bad | (rows.counted & empty))
        loss = _kernel.row_losses(config, rows, problem.options, ce, lse, c.ce_weight, c.z_weight)
        out = {"loss": loss, "ce": jnp.where(rows.counted, ce, 0.0), "lse": lse}
        if extra:
            out |= {"entropy": _kernel.entropy(st), "argmax": st.arg}
        if dots is not None:
            return sums, out | {"tangent": _tangent_pass(ctx, c, rows, st, scan_zero)}
        if not any(want):
            return sums, out
        sums, per_token = _grads_pass(ctx, c, rows, st, want, sums, scan_zero)
        return sums, out | per_token

    chunks = chunks_of(head, problem, scales, dots)
    sums, per_token = _chunked.scan_tokens(body, sums, chunks, sched.chunk)
    out = _Outputs(**per_token, **sums)
    if sched.vocab_axis is not None:  # partial sums over this shard's classes
        out = out._replace(
            **{
                k: lax.psum(getattr(out, k), sched.vocab_axis)
                for k in ("tangent", "dx", "dlabel_smoothing")
                if getattr(out, k) is not None
            }
        )
    return out


def _dots_of(problem: Problem, head_dot: Head, problem_dot: Problem) -> tuple[Dots, Any]:
    """The nonzero tangents of the head and of the target's inputs, and the z-loss's."""
    labels_dot = _nonzero(problem_dot.rows.labels) if problem.config.soft else None
    options = OptionDots(
        labels_dot,
        _nonzero(problem_dot.options.weights),
        _nonzero(problem_dot.options.label_smoothing),
    )
    head = Head(*(_nonzero(d) for d in head_dot))
    return Dots(head, options), _nonzero(problem_dot.options.z_loss)


@functools.lru_cache(maxsize=64)
def _loss_fn(sched: _chunked.Schedule, extra: bool = False) -> Any:
    """The loss for one schedule, as a custom_jvp of ``(head, problem)`` over the scan.

    ``extra``: it returns ``(loss, lse, entropy, argmax)``, the last three per token from the
    same pass and not differentiated (zero tangents).
    """

    def result(problem: Problem, out: _Outputs) -> Any:
        loss = _reduce(problem, out.loss)
        return (loss, out.lse, out.entropy, out.argmax) if extra else loss

    @jax.custom_jvp
    def loss_fn(head: Head, problem: Problem) -> Any:
        scales = problem.row_scales()[:2]
        return result(problem, _run(sched, _Derivatives(), extra, head, problem, scales))

    def loss_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        (head, problem), (head_dot, problem_dot) = primals, tangents
        config, rows = problem.config, problem.rows
        dots, z_dot = _dots_of(problem, head_dot, problem_dot)
        ce_weight, z_weight, n = problem.row_scales()
        scales = (ce_weight, z_weight)
        if config.reduction == "none":
            out = _run(sched, _Derivatives(), extra, head, problem, scales, dots)
            tangent = out.tangent
        else:
            pairs = (*zip(dots.head, ("dx", "dw", "dbias"), strict=True),)
            pairs += ((dots.options.labels, "dlabels"), (dots.options.weights, "dweights"))
            pairs += ((dots.options.label_smoothing, "dlabel_smoothing"),)
            want = _Derivatives(*(d is not None for d, _ in pairs))
            out = _run(sched, want, extra, head, problem, scales)
            tangent = jnp.zeros((), out.loss.dtype)
            for dot, name in pairs:
                if dot is not None:
                    grad = getattr(out, name)
                    term = jnp.sum(grad * dot.astype(grad.dtype))
                    if sched.inside and name in ("dw", "dbias"):  # this shard's classes only
                        term = lax.psum(term, sched.vocab_axis)
                    tangent = tangent + term
            if dots.options.weights is not None:
                mean_ce = jnp.sum(ce_weight * out.ce)
                d_w = _kernel.weights_denominator_grad(
                    config, rows, mean_ce, _kernel.denominator(rows.counted, n)
                )
                if d_w is not None:
                    tangent = tangent + jnp.sum(d_w * dots.options.weights)
        if z_dot is not None:
            z_term = _kernel.z_tangent(rows, out.lse, z_weight, z_dot)
            tangent = tangent + _reduce(problem, z_term)
        bad = rows.bad if config.reduction == "none" else jnp.any(rows.bad)
        tangent = jnp.where(bad, jnp.nan, tangent)
        tangent = tangent.astype(out.loss.dtype)
        if not extra:
            return result(problem, out), tangent
        zero_arg = np.zeros(out.argmax.shape, jax.dtypes.float0)
        zeros = (jnp.zeros_like(out.lse), jnp.zeros_like(out.entropy), zero_arg)
        return result(problem, out), (tangent, *zeros)

    loss_fn.defjvp(loss_jvp, symbolic_zeros=True)
    return jax.jit(loss_fn)  # one compiled program for eager calls, as _loss._loss


def _reduce(problem: Problem, per_token: jax.Array) -> jax.Array:
    return per_token if problem.config.reduction == "none" else jnp.sum(per_token)


def roles_of(tree: Any, roles: Any) -> Any:
    """``roles`` with None where ``tree`` has None (a zero tangent)."""
    return jax.tree.map(lambda r, v: None if v is None else r, roles, tree)


def _run(
    sched: _chunked.Schedule,
    want: _Derivatives,
    extra: bool,
    head: Head,
    problem: Problem,
    scales: tuple[jax.Array, jax.Array],
    dots: Dots | None = None,
) -> _Outputs:
    """:func:`_scan` on each device's tokens (and vocabulary shard, for the vocab-parallel loss)."""
    dot_roles = None
    if dots is not None:
        dot_roles = Dots(roles_of(dots.head, HEAD_ROLES), roles_of(dots.options, _OPTION_ROLES))
    names = ("dx", "dw", "dbias", "dlabels", "dweights", "dlabel_smoothing")
    present = {"loss", "ce", "lse"} | {k for k, on in zip(names, want, strict=True) if on}
    if dots is not None:
        present.add("tangent")
    if extra:
        present |= {"entropy", "argmax"}
    out_roles = _OUTPUT_ROLES._replace(**{k: None for k in _Outputs._fields if k not in present})
    fn = functools.partial(_scan, sched, want, extra)
    operands = (head, problem, scales, dots)
    in_roles = (HEAD_ROLES, problem.roles(), ("T", "T"), dot_roles)
    if sched.vocab_axis is not None:
        return _tokens.vocab_parallel(fn, operands, in_roles, out_roles, sched)
    # The tangent map is transposed for reverse mode (on Auto axes too: see over_tokens).
    return _tokens.over_tokens(fn, operands, in_roles, out_roles, transposable=dots is not None)


@_options.suggests_misspellings
def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    reduction: Reduction = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    return_stats: bool = False,
) -> jax.Array | tuple[jax.Array, CrossEntropyStats]:
    r"""Cross-entropy of :math:`\operatorname{softmax}(x W + b)`, chunked over tokens.

    Equal to ``jxent.softmax_cross_entropy(x @ w + bias, labels, ...)`` with every option, but
    the ``[N, L]`` logits exist only as ``[chunk_size, vocab_block_size]`` blocks: one block of
    the whole vocabulary per chunk where it fits the scratch budget (formed once), else blocks
    formed twice, once for the log-sum-exp and once for the gradient (see the module notes).
    Its derivative is a ``jax.custom_jvp`` built on the hand-derived gradient of the row kernel,

    .. math::

        dx = G W^\top, \quad dW = x^\top G, \quad db = \textstyle\sum_i G_i, \qquad
        G_i = \partial \ell / \partial z_i \text{ (see } \texttt{loss\_and\_logits\_grad}),

    so ``jax.grad``, ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` (forward over reverse),
    ``jax.linearize`` and ``jax.vmap`` all work, none of them with an ``[N, L]`` buffer.
    Probability ``labels``, class ``weights``, ``label_smoothing`` and ``z_loss`` get their true
    derivatives too (:math:`\partial\ell/\partial q_l = (1-\varepsilon) w_l
    (\operatorname{lse} - s_l)`, ...; see ``docs/derivation.md``).

    The matmuls run in the inputs' dtype with float32 accumulation; the log-sum-exp, the loss
    and :math:`G` are float32, :math:`dW` and :math:`db` accumulate in float32 across chunks and
    are returned in the parameters' dtypes. Padded tokens (when ``chunk_size`` does not divide
    ``N``) are masked and contribute nothing.

    Args:
        x: Hidden states ``[N, D]``.
        w: Output projection ``[D, L]``.
        labels: Integer class indices ``[N]`` or probabilities ``[N, L]``.
        bias: Optional ``[L]``.
        chunk_size: Tokens per chunk. By default one pass per chunk over the whole vocabulary
            where a chunk of at least 256 tokens fits the scratch budget (``[chunk, L]``
            float32 logits of 8 MiB; the chunk a power of two up to 4096), else a power of two
            with ``chunk * 1024`` near 4M elements, at most 4096; at most ``N`` rounded up
            to 8. Each chunk reads and writes dW once.
        vocab_block_size: Classes per block: by default ``L`` (one pass) within the budget,
            else 1024; the last block may be smaller.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]``.
        where: Boolean mask ``[N]`` of tokens that count.
        ignore_index: Label value of tokens that do not count.
        label_smoothing: As in :func:`jxent.loss_and_logits_grad`.
        z_loss: As in :func:`jxent.loss_and_logits_grad`.
        logit_softcap: As in :func:`jxent.loss_and_logits_grad`.
        return_stats: Also return each token's :class:`jxent.CrossEntropyStats` (log-sum-exp,
            entropy, argmax, correct, z-term) from the same pass over the vocabulary (no second
            pass; not differentiated): what a training step logs.

    Returns:
        The loss: scalar, or ``[N]`` for ``reduction="none"`` (whose gradients are exact for
        any per-token cotangent); with ``return_stats``, ``(loss, stats)``.

    Raises:
        TypeError: Non-floating ``x``/``w``, bad label or mask dtypes.
        ValueError: Shapes that do not match, options out of range, labels out of range
            (eagerly; under ``jit`` the loss and gradients become NaN as in
            :func:`jxent.loss_and_logits_grad`).

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> x, w = jnp.ones((3, 4)), jnp.zeros((4, 5))
        >>> print(f"{jxent.linear_cross_entropy(x, w, jnp.array([0, 1, 2])):.4f}")
        1.6094
        >>> grad_fn = jax.grad(jxent.linear_cross_entropy, argnums=(0, 1))
        >>> dx, dw = grad_fn(x, w, jnp.array([0, 1, 2]))
        >>> dw.shape
        (4, 5)

    References:
        Liger Kernel fused linear cross-entropy; Wijmans et al. 2024, "Cut Your Losses in
        Large-Vocabulary Language Models"; PyTorch ``F.linear_cross_entropy``.
    """
    options = {"reduction": reduction, "weights": weights, "ignore_index": ignore_index}
    options |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    options |= {"logit_softcap": logit_softcap}
    head, problem = prepare("linear_cross_entropy", x, w, labels, bias, where, options)
    num_classes = problem.config.num_classes
    sched = _chunked.schedule(head.x.shape[0], num_classes, chunk_size, vocab_block_size)
    return _with_stats(problem, _loss_fn(sched, _check_flag(return_stats))(head, problem))


def _check_flag(return_stats: Any) -> bool:
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, found {return_stats!r}")
    return return_stats


def _with_stats(problem: Problem, out: Any) -> Any:
    """The loss, or ``(loss, stats)`` from the scan's per-token log-sum-exp, entropy, argmax."""
    if not isinstance(out, tuple):
        return out
    loss, lse, entropy, argmax = out
    rows, options = problem.rows, problem.options
    return loss, _kernel.cross_entropy_stats(problem.config, rows, options, lse, entropy, argmax)


@_options.suggests_misspellings
def vocab_parallel_linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str = "vocab",
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    reduction: Reduction = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    return_stats: bool = False,
) -> jax.Array | tuple[jax.Array, CrossEntropyStats]:
    r""":func:`linear_cross_entropy` with ``w`` sharded along the vocabulary over ``mesh``.

    Megatron-LM's vocab-parallel scheme under ``jax.shard_map``: device :math:`k` holds
    :math:`W_k \in \mathbb{R}^{D \times L/P}` and runs the same chunked scan as
    :func:`linear_cross_entropy` on its shard (no ``[N, L/P]`` buffer: blocks of
    ``[chunk, block]``). After pass A of each chunk the shards' online-softmax statistics are
    merged with the row kernel's associative merge -- ``pmax`` of the row maxima, ``psum`` of
    the rebased sums of exponentials and target terms -- and pass B forms the local rows of
    :math:`G` from the global log-sum-exp: :math:`dW_k = x^\top G_k` stays sharded,
    :math:`dx = \operatorname{psum}_k G_k W_k^\top`. Every option of
    :func:`linear_cross_entropy` works, and so do forward mode and second derivatives.

    On a mesh with more axes (``("data", "vocab")``) the tokens are sharded over the others too:
    over the Explicit axes that already shard ``x``, else over every other axis whose sizes
    divide ``N`` (else replicated), so each device works on ``N/d_data x L/d_vocab``. Any mesh
    works: ``jax.make_mesh`` (Explicit axes), ``Mesh(...)`` (Auto), inside ``jax.set_mesh``;
    inputs not laid out as described are resharded, inputs already laid out are not moved.
    Eager ``jax.grad`` (outside ``jit``) on an Explicit mesh needs ``jax.set_mesh(mesh)``, as
    any JAX function whose result lives on such a mesh. Inside the user's ``shard_map`` over
    ``axis_name``, ``w`` and ``bias`` are this device's shard and the loss runs on them with its
    collectives over that axis (integer labels, no class weights).

    Args:
        x: Hidden states ``[N, D]``, sharded over the token axes (or to be).
        w: ``[D, L]``, sharded (or to be sharded) as ``P(None, axis_name)``.
        labels: Integer labels ``[N]`` (sharded like the tokens) or probabilities ``[N, L]``
            (tokens and ``w``'s columns).
        mesh: The device mesh.
        axis_name: The mesh axis that shards the vocabulary.
        bias: Optional ``[L]``, sharded like ``w``'s columns.
        chunk_size: Tokens per chunk (default as :func:`linear_cross_entropy` for ``L/P``).
        vocab_block_size: Classes per block within a shard (default as
            :func:`linear_cross_entropy` for ``L/P``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]``, sharded like ``w``'s columns.
        where: Boolean token mask ``[N]``.
        ignore_index: Label value of tokens that do not count.
        label_smoothing: As in :func:`jxent.loss_and_logits_grad`.
        z_loss: As in :func:`jxent.loss_and_logits_grad`.
        logit_softcap: As in :func:`jxent.loss_and_logits_grad`.
        return_stats: As in :func:`linear_cross_entropy` (the argmax is merged across shards).

    Returns:
        The loss, scalar or ``[N]`` (with ``return_stats``, ``(loss, stats)``); ``jax.grad``
        gives ``dw`` sharded like ``w``.

    Raises:
        ValueError: ``axis_name`` not in ``mesh``, ``L`` not divisible by its size, a call
            inside a ``jax.shard_map`` not over ``axis_name`` (or over it with class weights or
            probability labels), and everything :func:`linear_cross_entropy` raises.
    """
    function = "vocab_parallel_linear_cross_entropy"
    shards = check_vocab_mesh(function, mesh, axis_name)
    options = {"reduction": reduction, "weights": weights, "ignore_index": ignore_index}
    options |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    options |= {"logit_softcap": logit_softcap}
    head, problem = prepare(function, x, w, labels, bias, where, options, shards)
    sched = vocab_schedule(function, head, problem, mesh, axis_name, chunk_size, vocab_block_size)
    return _with_stats(problem, _loss_fn(sched, _check_flag(return_stats))(head, problem))


def check_vocab_mesh(function: str, mesh: Mesh, axis_name: str) -> int:
    """Raises unless ``axis_name`` is an axis of ``mesh``; its size inside a ``shard_map``, else 1.

    Inside the user's ``shard_map`` the vocabulary axis must be one of its manual axes: then
    ``w`` is already this device's shard and the loss runs on it with the collectives over
    that axis (no ``shard_map`` of its own).
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if manual and axis_name not in manual:
        raise ValueError(
            f"{function} inside jax.shard_map needs the vocabulary axis {axis_name!r} among its "
            f"manual axes (found {tuple(manual)}): map over it too (w sharded P(None, "
            f"{axis_name!r})), call it outside, or inside use the one-device function"
        )
    return mesh.shape[axis_name] if manual else 1


def vocab_schedule(
    function: str,
    head: Head,
    problem: Problem,
    mesh: Mesh,
    axis_name: str,
    chunk_size: int | None,
    vocab_block_size: int | None,
) -> _chunked.Schedule:
    """The schedule of one device's tokens and vocabulary shard; raises if ``L`` does not divide."""
    shards, num_classes = mesh.shape[axis_name], problem.config.num_classes
    if axis_name in jax.sharding.get_abstract_mesh().manual_axes:  # w is already the shard
        local = head.w.shape[1]
        return _chunked.schedule(
            head.x.shape[0], local, chunk_size, vocab_block_size, vocab_axis=axis_name
        )
    if num_classes % shards:
        raise ValueError(
            f"{function}: w has L = {num_classes} classes, which do not divide over the {shards} "
            f"devices of mesh axis {axis_name!r}"
        )
    token_axes = _tokens.vocab_parallel_token_axes(head.x, mesh, axis_name)
    num_tokens = head.x.shape[0] // math.prod(mesh.shape[a] for a in token_axes)
    return _chunked.schedule(
        num_tokens,
        num_classes // shards,
        chunk_size,
        vocab_block_size,
        vocab_axis=axis_name,
        mesh=mesh,
        token_axes=token_axes,
    )
