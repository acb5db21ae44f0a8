r"""Distillation between two linear heads, neither's ``[N, L]`` logits ever formed.

The student :math:`z_s = xW + b` and the teacher :math:`z_t = x_t W_t + b_t` are formed block by
block for each chunk of tokens, both at the temperature (:math:`s = z_s/T`, :math:`u = z_t/T`),
and folded into the rows' :class:`~jxent._divergence.PairStats` (the online softmax of each,
and the KL's cross sum); the JSD takes a second pass for :math:`\sum M\log M`. The derivative is
a ``jax.custom_jvp`` of ``(student, teacher, problem)`` whose tangent contracts each block's
:math:`\dot s, \dot u` with the hand-derived row derivatives of ``_divergence`` (and the hard
cross-entropy's :math:`p - e_y`): JAX transposes it for reverse mode, each block recomputed
under ``jax.checkpoint``, so no ``[chunk, L]`` buffer is kept past the scratch budget.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jxent import _divergence, _kernel, _options
from jxent._divergence import Divergence, PairStats
from jxent._head import _chunked, _linear, _tokens
from jxent._head._linear import HEAD_ROLES, Head
from jxent._kernel import OptionDots, Rows
from jxent._loss import Reduction
from jxent._problem import Problem


class _Chunk(NamedTuple):
    x: jax.Array
    teacher_x: jax.Array
    rows: Rows
    x_dot: jax.Array | None = None
    teacher_x_dot: jax.Array | None = None


class _Dots(NamedTuple):
    student: Head  # None where zero
    teacher: Head


class _Ctx(NamedTuple):
    sched: _chunked.Schedule
    div: Divergence
    student: _linear.Pass  # the student's pass (its blocks, target and logits' tangent)
    teacher: Head
    dots: _Dots | None


def _nonzero(t: Any) -> Any:
    return None if t is None or isinstance(t, SymbolicZero) else t


def _blocks(ctx: _Ctx, c: _Chunk, start: Any, size: int, dot: bool = False):
    """A block's student logits, scores, target, teacher scores, and their tangents."""
    student = _linear.Chunk(c.x, c.rows, None, None, c.x_dot)
    student_dot = dot and any(d is not None for d in ctx.dots.student)
    part = _linear.block(ctx.student, student, c.rows, start, size, student_dot)
    t = ctx.div.temperature
    teacher = _chunked.block_logits(None, c.teacher_x, ctx.teacher.w, ctx.teacher.bias, start, size)
    u_dot = None
    if dot and any(d is not None for d in ctx.dots.teacher):
        teacher_x = _linear.counted_only(c.teacher_x, c.rows)  # NaN padding must not reach dW
        u_dot = _logits_dot(teacher_x, c.teacher_x_dot, ctx.dots.teacher, start, size, teacher)
        u_dot = u_dot / t
    s_dot = None if part.logits_dot is None else part.logits_dot / t
    return part, part.blk.logits / t, teacher.logits / t, s_dot, u_dot


def _logits_dot(x, x_dot, head_dot: Head, start, size, blk: _chunked.Block) -> jax.Array:
    r""":math:`\dot x W_b + x\dot W_b + \dot b_b` of the teacher's block."""
    acc = blk.logits.dtype
    out = jnp.zeros(blk.logits.shape, acc)
    if head_dot.x is not None:
        out = out + jnp.dot(x_dot, blk.w, preferred_element_type=acc)
    if head_dot.w is not None:
        w_dot = lax.dynamic_slice_in_dim(head_dot.w, start, size, axis=1)
        out = out + jnp.dot(x, w_dot, preferred_element_type=acc)
    if head_dot.bias is not None:
        out = out + lax.dynamic_slice_in_dim(head_dot.bias, start, size).astype(acc)[None, :]
    return out


def _stats_pass(ctx: _Ctx, c: _Chunk, scan_zero) -> PairStats:
    div, hard = ctx.div, ctx.div.hard_weight > 0

    def fold(acc: PairStats, start: Any, size: int) -> PairStats:
        part, s, u, _, _ = _blocks(ctx, c, start, size)
        hard_stats = _kernel.block_stats(part.blk.logits, part.target) if hard else None
        return _divergence.merge(div, acc, _divergence.block_pair_stats(div, s, u, hard_stats))

    dtype = _chunked.accumulation_dtype(c.x, ctx.student.head.w)
    init = _divergence.init(div, c.rows.counted.shape, dtype, hard)
    pair = _chunked.over_blocks(fold, init, ctx.teacher.w.shape[1], ctx.sched.block, scan_zero)
    axis = ctx.sched.vocab_axis
    return pair if axis is None else _divergence.merge_shards(div, pair, axis)


def _terms(ctx: _Ctx, c: _Chunk, pair: PairStats, scan_zero) -> _divergence.RowTerms:
    """The rows' divergence and derivative constants (the JSD's second pass)."""
    div = ctx.div
    if div.effective != "jsd":
        return _divergence.kl_terms(div, pair)

    def fold(acc: jax.Array, start: Any, size: int) -> jax.Array:
        _, s, u, _, _ = _blocks(ctx, c, start, size)
        return acc + _divergence.jsd_sums(div, s, u, pair)

    zeros = jnp.zeros((2, *c.rows.counted.shape), pair.s.se.dtype)
    sums = _chunked.over_blocks(fold, zeros, ctx.teacher.w.shape[1], ctx.sched.block, scan_zero)
    if ctx.sched.vocab_axis is not None:
        sums = lax.psum(sums, ctx.sched.vocab_axis)
    return _divergence.jsd_terms(div, sums)


def _tangent_pass(ctx: _Ctx, c: _Chunk, pair, terms, scan_zero) -> jax.Array:
    """Each token's tangent: the blocks' derivatives contracted with their score tangents."""
    div, config = ctx.div, ctx.student.problem.config
    teacher_dot = any(d is not None for d in ctx.dots.teacher)
    soft = (1.0 - div.hard_weight) * div.scale

    def contract(c: _Chunk, pair: PairStats, terms, start: Any, size: int) -> jax.Array:
        part, s, u, s_dot, u_dot = _blocks(ctx, c, start, size, dot=True)
        d_s, d_u = _divergence.score_grads(div, s, u, pair, terms, teacher_dot)
        # Zeroed first in rows that do not count: the transposed map then sends them exact
        # zeros even where the derivatives are NaN (padding in either head).
        counted = c.rows.counted[:, None]
        s_dot = None if s_dot is None else jnp.where(counted, s_dot, 0.0)
        u_dot = None if u_dot is None else jnp.where(counted, u_dot, 0.0)
        out = jnp.zeros(c.rows.counted.shape, s.dtype)
        if s_dot is not None:
            out = out + soft * jnp.sum(d_s * s_dot, axis=-1)
            if div.hard_weight > 0:
                ones = jnp.ones_like(out)
                g = _kernel.score_grad(
                    config, c.rows, ctx.student.problem.options, part.blk.logits, part.target,
                    pair.hard, ones, jnp.zeros_like(out),
                )  # fmt: skip
                z_dot = jnp.where(counted, part.logits_dot, 0.0)
                out = out + div.hard_weight * jnp.sum(g * z_dot, axis=-1)
        if u_dot is not None:
            out = out + soft * jnp.sum(d_u * u_dot, axis=-1)
        return out

    def fold(acc: jax.Array, start: Any, size: int) -> jax.Array:
        # Checkpointed: reverse mode recomputes both blocks instead of keeping them.
        step = jax.checkpoint(contract, static_argnums=4)
        return acc + step(c, pair, terms, start, size)

    zeros = jnp.zeros(c.rows.counted.shape, pair.s.se.dtype)
    out = _chunked.over_blocks(fold, zeros, ctx.teacher.w.shape[1], ctx.sched.block, scan_zero)
    if ctx.sched.vocab_axis is not None:
        out = lax.psum(out, ctx.sched.vocab_axis)
    return out


def _per_token(div: Divergence, rows: Rows, pair: PairStats, terms, value_of_ce) -> jax.Array:
    r"""Each token's loss :math:`(1-h)\,\text{scale}\,D + h\,\text{CE}`; 0 or NaN (bad)."""
    loss = (1.0 - div.hard_weight) * div.scale * terms.value
    empty = (pair.s.m == _kernel.NEG_INF) | (pair.t.m == _kernel.NEG_INF)
    if div.hard_weight > 0:
        loss = loss + div.hard_weight * value_of_ce
    bad = rows.bad | (rows.counted & empty)
    return jnp.where(bad, jnp.nan, jnp.where(rows.counted, loss, 0.0))


def _scan(sched, div, student: Head, teacher: Head, problem: Problem, dots: _Dots | None):
    """Per-token losses (and tangents) of one device's tokens and vocabulary shard."""
    offset = 0
    if sched.vocab_axis is not None:
        offset = lax.axis_index(sched.vocab_axis) * student.w.shape[1]
    student_dots = None if dots is None else _linear.Dots(dots.student, OptionDots())
    ctx = _Ctx(
        sched, div, _linear.Pass(sched, student, problem, student_dots, offset), teacher, dots
    )

    def body(carry: Any, c: _Chunk, scan_zero: jax.Array) -> tuple[Any, dict]:
        pair = _stats_pass(ctx, c, scan_zero)
        terms = _terms(ctx, c, pair, scan_zero)
        ce = _kernel.finish(pair.hard)[1] if div.hard_weight > 0 else None
        out = {"loss": _per_token(div, c.rows, pair, terms, ce)}
        if dots is not None:
            tangent = _tangent_pass(ctx, c, pair, terms, scan_zero)
            out["tangent"] = jnp.where(c.rows.counted, tangent, 0.0)
        return carry, out

    x_dot = None if dots is None else dots.student.x
    tx_dot = None if dots is None else dots.teacher.x
    chunks = _Chunk(student.x, teacher.x, problem.rows, x_dot, tx_dot)
    _, out = _chunked.scan_tokens(body, (), chunks, sched.chunk)
    return out


def _run(sched, div, student, teacher, problem, dots=None) -> dict:
    fn = functools.partial(_scan, sched, div)
    dot_roles = None
    if dots is not None:
        dot_roles = _Dots(*(_linear.roles_of(d, HEAD_ROLES) for d in dots))
    out_roles = {"loss": "T"} | ({} if dots is None else {"tangent": "T"})
    operands = (student, teacher, problem, dots)
    in_roles = (HEAD_ROLES, HEAD_ROLES, problem.roles(), dot_roles)
    if sched.vocab_axis is not None:
        return _tokens.vocab_parallel(fn, operands, in_roles, out_roles, sched)
    return _tokens.over_tokens(fn, operands, in_roles, out_roles, transposable=dots is not None)


@functools.lru_cache(maxsize=64)
def _loss_fn(sched: _chunked.Schedule, div: Divergence) -> Any:
    """The reduced loss for one schedule, a custom_jvp of ``(student, teacher, problem)``."""

    def reduce(problem: Problem, per_token: jax.Array) -> jax.Array:
        if problem.config.reduction == "none":
            return per_token
        weight = problem.row_scales()[1]  # 1/count for "mean" (unweighted), 1 for "sum"
        return jnp.sum(weight * per_token)

    @jax.custom_jvp
    def loss_fn(student: Head, teacher: Head, problem: Problem) -> jax.Array:
        return reduce(problem, _run(sched, div, student, teacher, problem)["loss"])

    def loss_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        (student, teacher, problem), (student_dot, teacher_dot, _) = primals, tangents
        dots = _Dots(*(Head(*(_nonzero(d) for d in h)) for h in (student_dot, teacher_dot)))
        if all(d is None for h in dots for d in h):
            loss = loss_fn(student, teacher, problem)
            return loss, jnp.zeros_like(loss)
        out = _run(sched, div, student, teacher, problem, dots)
        tangent = jnp.where(problem.rows.bad, jnp.nan, out["tangent"])
        return reduce(problem, out["loss"]), reduce(problem, tangent)

    loss_fn.defjvp(loss_jvp, symbolic_zeros=True)
    return jax.jit(loss_fn)


def check_divergence(
    divergence: str, beta: Any, temperature: Any, hard_weight: Any, scale: Any, labels: Any
) -> Divergence:
    """The static choices, validated (raises naming the argument)."""
    if divergence not in _divergence.DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, _divergence.DIVERGENCES))}, "
            f"found {divergence!r}"
        )
    for name, v, low, high in (
        ("beta", beta, 0.0, 1.0),
        ("hard_weight", hard_weight, 0.0, 1.0),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise ValueError(f"{name} must be a number in [{low}, {high}], found {v!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (temperature > 0)
    ):
        raise ValueError(f"temperature must be a positive number, found {temperature!r}")
    if not isinstance(scale, bool):
        raise TypeError(f"temperature_scaling must be a bool, found {scale!r}")
    if hard_weight > 0 and labels is None:
        raise ValueError(f"hard_weight={hard_weight} needs labels (the hard targets)")
    t = float(temperature)
    return Divergence(divergence, float(beta), t, t * t if scale else 1.0, float(hard_weight))


def _prepare(
    function: str,
    *,
    x: ArrayLike,
    w: ArrayLike,
    teacher_x: ArrayLike,
    teacher_w: ArrayLike,
    bias: ArrayLike | None,
    teacher_bias: ArrayLike | None,
    divergence: str,
    beta: float,
    temperature: float,
    temperature_scaling: bool,
    labels: ArrayLike | None,
    hard_weight: float,
    where: ArrayLike | None,
    ignore_index: int | None,
    reduction: Reduction,
    teacher_gradient: bool,
) -> tuple[Divergence, Head, Head, Problem]:
    """Validates a call once: the divergence, both heads and the problem.

    The teacher's gradient is stopped unless asked for; the problem holds the labels, the
    tokens that count and the reduction.
    """
    div = check_divergence(divergence, beta, temperature, hard_weight, temperature_scaling, labels)
    options = {"reduction": reduction, "weights": None, "ignore_index": ignore_index}
    options |= {"label_smoothing": 0.0, "z_loss": 0.0, "logit_softcap": None}
    teacher_x, teacher_w = jnp.asarray(teacher_x), jnp.asarray(teacher_w)
    x, w = jnp.asarray(x), jnp.asarray(w)
    _linear.check_shapes(x, w, bias)
    num_teacher, teacher_classes = _linear.check_shapes(
        teacher_x, teacher_w, teacher_bias, "teacher_"
    )
    if labels is None and ignore_index is not None:
        raise ValueError(
            f"{function}: ignore_index={ignore_index} needs labels (it is a label value); "
            "without labels use where= to leave tokens out"
        )
    if labels is None:
        labels = jnp.zeros((x.shape[0] if x.ndim else 0,), jnp.int32)
    student, problem = _linear.prepare(function, x, w, labels, bias, where, options)
    if problem.config.soft:
        raise TypeError(f"{function}: labels must be integer class indices [N] (hard targets)")
    if teacher_classes != problem.config.num_classes:
        raise ValueError(
            f"{function}: the teacher has {teacher_classes} classes (teacher_w {teacher_w.shape}) "
            f"but the student {problem.config.num_classes} (w {w.shape}): the two heads must "
            "share the vocabulary"
        )
    if num_teacher != student.x.shape[0]:
        raise ValueError(
            f"{function}: teacher_x has {num_teacher} tokens but x has {student.x.shape[0]}"
        )
    if teacher_bias is None:
        teacher_bias = jnp.zeros((teacher_classes,), teacher_w.dtype)
    teacher = Head(teacher_x, teacher_w, jnp.asarray(teacher_bias))
    if not teacher_gradient:
        teacher = lax.stop_gradient(teacher)
    return div, student, teacher, problem


@_options.suggests_misspellings
def linear_distillation_loss(
    x: ArrayLike,
    w: ArrayLike,
    teacher_x: ArrayLike,
    teacher_w: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    labels: ArrayLike | None = None,
    hard_weight: float = 0.0,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Reduction = "mean",
    teacher_gradient: bool = False,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
) -> jax.Array:
    r"""Distillation loss between a student head ``x @ w + bias`` and a teacher head, fused.

    With both heads' scores at the temperature, :math:`s = (xW + b)/T` (student, softmax
    :math:`Q`) and :math:`u = (x_t W_t + b_t)/T` (teacher, softmax :math:`P`), each token's loss is

    .. math::

        \ell = (1 - h)\,c\,D(P, Q) + h\,\mathrm{CE}\big(\operatorname{softmax}(xW + b), y\big),

    :math:`c = T^2` with ``temperature_scaling`` (Hinton et al. 2015: keeps the soft gradients'
    scale as :math:`T` grows) else 1, and :math:`D` one of

    - ``"forward_kl"``: :math:`\mathrm{KL}(P\,\|\,Q) = \sum_l P_l(\log P_l - \log Q_l)`
      (the usual distillation; mass-covering);
    - ``"reverse_kl"``: :math:`\mathrm{KL}(Q\,\|\,P)` (mode-seeking, as in MiniLLM);
    - ``"jsd"``: the generalised Jensen-Shannon divergence :math:`\beta\mathrm{KL}(P\|M) +
      (1-\beta)\mathrm{KL}(Q\|M)`, :math:`M = \beta P + (1-\beta)Q`, as Liger Kernel's
      ``LigerFusedLinearJSDLoss`` defines it: ``beta=0`` is the forward KL and ``beta=1`` the
      reverse KL (their limits after dividing by :math:`\beta`, :math:`1-\beta`), as there.

    Neither head's ``[N, L]`` logits exist: both are formed block by block for each chunk of
    tokens (the schedule of :func:`linear_cross_entropy`, with two heads' blocks) and folded
    into online statistics; the JSD takes one more pass for :math:`\sum M\log M`. The gradient
    is hand-derived (:math:`\partial\,\mathrm{KL}(P\|Q)/\partial s = Q - P`, ...; see
    ``docs/derivation.md``), a ``jax.custom_jvp`` transposed for reverse mode with each block
    recomputed, so ``jax.grad``, ``jax.jvp`` and ``jax.vmap`` all work. The teacher is under
    ``lax.stop_gradient`` unless ``teacher_gradient=True``. ``"mean"`` divides by the number of
    counted tokens (``where``, ``ignore_index``), KL summed over classes ("batchmean" of
    ``torch.nn.KLDivLoss``); for micro-batches use ``"sum"`` and divide by the whole batch's
    count.

    Args:
        x: Student hidden states ``[N, D]``.
        w: Student projection ``[D, L]``.
        teacher_x: Teacher hidden states ``[N, D_t]`` (any width).
        teacher_w: Teacher projection ``[D_t, L]``: the same vocabulary ``L``.
        bias: Student bias ``[L]``.
        teacher_bias: Teacher bias ``[L]``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: The JSD's :math:`\beta \in [0, 1]`.
        temperature: :math:`T > 0` for both heads (a Python number: it is static).
        temperature_scaling: Multiply the divergence by :math:`T^2`.
        labels: Integer hard labels ``[N]`` (needed when ``hard_weight > 0``).
        hard_weight: :math:`h \in [0, 1]`, the weight of the hard-label cross-entropy (at
            temperature 1).
        where: Boolean ``[N]``: tokens that count.
        ignore_index: Label value of tokens that do not count.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        teacher_gradient: Differentiate through the teacher too.
        chunk_size: Tokens per chunk (as :func:`linear_cross_entropy`).
        vocab_block_size: Classes per block (as :func:`linear_cross_entropy`).

    Returns:
        The loss: a float32 scalar (float64 for float64 inputs), or ``[N]`` for ``"none"``.

    Raises:
        ValueError: The heads' vocabularies or token counts differ, an unknown divergence,
            ``beta``/``hard_weight`` outside ``[0, 1]``, a temperature <= 0, ``hard_weight > 0``
            without labels, and what :func:`linear_cross_entropy` raises for shapes and labels.
        TypeError: Non-floating inputs, probability labels.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> x, w = jnp.ones((2, 3)), jnp.zeros((3, 4))
        >>> loss = jxent.linear_distillation_loss(x, w, x, w, divergence="jsd")
        >>> print(f"{loss:.4f}")
        0.0000

    References:
        Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; Gu et al. 2024
        (MiniLLM, reverse KL); Agarwal et al. 2024 (GKD, generalised JSD); Liger Kernel's
        ``LigerFusedLinearJSDLoss``.
    """
    call = {k: v for k, v in locals().items() if k not in ("chunk_size", "vocab_block_size")}
    div, student, teacher, problem = _prepare("linear_distillation_loss", **call)
    sched = _chunked.schedule(
        student.x.shape[0], problem.config.num_classes, chunk_size, vocab_block_size
    )
    return _loss_fn(sched, div)(student, teacher, problem)


@_options.suggests_misspellings
def vocab_parallel_linear_distillation_loss(
    x: ArrayLike,
    w: ArrayLike,
    teacher_x: ArrayLike,
    teacher_w: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str = "vocab",
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    labels: ArrayLike | None = None,
    hard_weight: float = 0.0,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Reduction = "mean",
    teacher_gradient: bool = False,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
) -> jax.Array:
    r""":func:`linear_distillation_loss` with both heads sharded along the vocabulary.

    ``w`` and ``teacher_w`` (and the biases) are sharded ``P(None, axis_name)``; each device
    folds its shard's blocks of both heads, the rows' statistics (both softmaxes and the KL's
    cross sum) are merged across shards with ``pmax``/``psum``, and the JSD's second-pass sums
    with ``psum``; ``jax.grad`` gives ``dw`` sharded like ``w``. Tokens are sharded over the
    mesh's other axes as in :func:`vocab_parallel_linear_cross_entropy`.

    Args:
        x: Student hidden states ``[N, D]``.
        w: Student projection ``[D, L]``, sharded (or to be) ``P(None, axis_name)``.
        teacher_x: Teacher hidden states ``[N, D_t]``.
        teacher_w: Teacher projection ``[D_t, L]``, sharded like ``w``.
        mesh: The device mesh.
        axis_name: The mesh axis that shards the vocabulary.
        bias: As :func:`linear_distillation_loss`.
        teacher_bias: As :func:`linear_distillation_loss`.
        divergence: As :func:`linear_distillation_loss`.
        beta: As :func:`linear_distillation_loss`.
        temperature: As :func:`linear_distillation_loss`.
        temperature_scaling: As :func:`linear_distillation_loss`.
        labels: As :func:`linear_distillation_loss`.
        hard_weight: As :func:`linear_distillation_loss`.
        where: As :func:`linear_distillation_loss`.
        ignore_index: As :func:`linear_distillation_loss`.
        reduction: As :func:`linear_distillation_loss`.
        teacher_gradient: As :func:`linear_distillation_loss`.
        chunk_size: Tokens per chunk (for ``L/P`` classes).
        vocab_block_size: Classes per block within a shard.

    Returns:
        The loss, scalar or ``[N]``.

    Raises:
        ValueError: ``axis_name`` not in ``mesh``, ``L`` not divisible by its size, a call
            inside ``jax.shard_map``, and what :func:`linear_distillation_loss` raises.
    """
    function = "vocab_parallel_linear_distillation_loss"
    if _linear.check_vocab_mesh(function, mesh, axis_name) > 1:
        raise ValueError(
            f"{function} cannot run inside jax.shard_map: call it outside (it shards both heads "
            "over the mesh itself), or inside use linear_distillation_loss on each device's tokens"
        )
    skip = ("function", "mesh", "axis_name", "chunk_size", "vocab_block_size", "skip")
    call = {k: v for k, v in locals().items() if k not in skip}
    div, student, teacher, problem = _prepare(function, **call)
    sched = _linear.vocab_schedule(
        function, student, problem, mesh, axis_name, chunk_size, vocab_block_size
    )
    return _loss_fn(sched, div)(student, teacher, problem)
