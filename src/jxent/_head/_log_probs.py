r"""Per-token log-probabilities, entropy and statistics of the linear head, never forming logits.

For the head :math:`z = xW + b` at a sampling temperature :math:`T` (scores
:math:`s = \operatorname{cap}(z)/T`, :math:`p = \operatorname{softmax}(s)`) each token gets

.. math::

    \log p_y = s_y - \operatorname{lse}(s), \qquad
    H = -\textstyle\sum_l p_l \log p_l, \qquad \operatorname{lse}(s), \qquad
    \arg\max_l s_l,

from one pass over the vocabulary in blocks (the online softmax of ``_kernel``, with the
entropy's sum :math:`\sum_l e^{s_l - m}(s_l - m)` and the running argmax folded in). Their
derivative is a ``jax.custom_jvp`` whose tangent map is linear in :math:`\dot x, \dot W,
\dot b, \dot T`: each block's :math:`\dot s` is contracted with the row's
:math:`(\partial\log p_y, \partial H, \partial\operatorname{lse})/\partial s = (e_y - p,
-p\odot(\log p + H), p)` (``_kernel.log_prob_sums``); JAX transposes that map for reverse mode
(each block's logits recomputed under ``jax.checkpoint``, no ``[N, L]`` residual), exactly as
``reduction="none"`` of :func:`jxent.linear_cross_entropy`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jxent import _kernel, _options
from jxent._head import _chunked, _linear, _tokens
from jxent._head._linear import HEAD_ROLES, Head
from jxent._kernel import LogProbSums, OptionDots, Stats
from jxent._log_probs import LogProbs, check_temperature
from jxent._problem import Problem


class _Fields(NamedTuple):
    """What a scan returns per token (None: not asked for)."""

    log_prob: jax.Array
    entropy: jax.Array
    lse: jax.Array
    argmax: jax.Array
    tangents: tuple | None = None  # of (log_prob, entropy, lse), forward mode


class _Dots(NamedTuple):
    head: Head  # None where zero
    temperature: Any


def _scaled_block(ctx: _linear.Pass, c: _linear.Chunk, rows, t, start, size, dot=False):
    """A block's scores at the temperature, their derivative, target and logits' tangent."""
    part = _linear.block(ctx, c, rows, start, size, dot)
    s, ds = _kernel.scaled_scores(ctx.problem.config, part.blk.logits, t)
    return s, ds, part.target, part.logits_dot


def _stats_pass(ctx, c, t, scan_zero) -> Stats:
    """The chunk's online-softmax statistics with the entropy's sum and the argmax."""

    def fold(st: Stats, start: Any, size: int) -> Stats:
        s, _, target, _ = _scaled_block(ctx, c, c.rows, t, start, size)
        return _kernel.merge(
            st, _kernel.block_stats(s, target, extra=True, start=start + ctx.offset)
        )

    zeros = jnp.zeros(c.rows.counted.shape, _chunked.accumulation_dtype(c.x, ctx.head.w))
    init = Stats(zeros - jnp.inf, zeros, zeros, zeros, zeros, jnp.zeros(zeros.shape, jnp.int32))
    st = _chunked.over_blocks(fold, init, ctx.head.w.shape[1], ctx.sched.block, scan_zero)
    return st if ctx.sched.vocab_axis is None else _kernel.merge_shards(st, ctx.sched.vocab_axis)


def _tangent_pass(ctx, c, t, t_dot, st: Stats, scan_zero) -> LogProbSums:
    r"""The row sums of each block's :math:`\dot s` the tangents need (checkpointed blocks)."""

    def contract(c, st, start, size) -> LogProbSums:
        s, ds, target, logits_dot = _scaled_block(ctx, c, c.rows, t, start, size, dot=True)
        s_dot = _kernel.scores_dot(s, ds, logits_dot, t_dot, t)
        return _kernel.log_prob_sums(c.rows, s, s_dot, target, st)

    def fold(acc: LogProbSums, start: Any, size: int) -> LogProbSums:
        # Checkpointed: reverse mode recomputes the block instead of keeping [N, L] residuals.
        return _kernel.add_sums(acc, jax.checkpoint(contract, static_argnums=3)(c, st, start, size))

    zeros = jnp.zeros(c.rows.counted.shape, st.se.dtype)
    sums = _chunked.over_blocks(
        fold, LogProbSums(zeros, zeros, zeros), ctx.head.w.shape[1], ctx.sched.block, scan_zero
    )
    if ctx.sched.vocab_axis is not None:
        sums = LogProbSums(*(lax.psum(v, ctx.sched.vocab_axis) for v in sums))
    return sums


def _scan(sched, head: Head, t, problem: Problem, dots: _Dots | None) -> _Fields:
    """The fields (and their tangents) of one device's tokens and vocabulary shard."""
    offset = 0
    if sched.vocab_axis is not None:
        offset = lax.axis_index(sched.vocab_axis) * head.w.shape[1]
    head_dots = None if dots is None else _linear.Dots(dots.head, OptionDots())
    ctx = _linear.Pass(sched, head, problem, head_dots, offset)
    t_dot = None if dots is None else dots.temperature

    def body(carry: Any, c: _linear.Chunk, scan_zero: jax.Array) -> tuple[Any, _Fields]:
        st = _stats_pass(ctx, c, t, scan_zero)
        fields = _kernel.log_prob_fields(c.rows, st)
        tangents = None
        if dots is not None:
            sums = _tangent_pass(ctx, c, t, t_dot, st, scan_zero)
            tangents = _kernel.log_prob_tangents(c.rows, st, sums)
        return carry, _Fields(*fields, tangents)

    ones = jnp.ones(problem.rows.counted.shape, _chunked.accumulation_dtype(head.x, head.w))
    chunks = _linear.chunks_of(head, problem, (ones, ones), head_dots)
    _, out = _chunked.scan_tokens(body, (), chunks, sched.chunk)
    return out


def _run(sched, head: Head, t, problem: Problem, dots: _Dots | None = None) -> _Fields:
    """:func:`_scan` on each device's tokens (and vocabulary shard, vocab-parallel)."""
    fn = functools.partial(_scan, sched)
    dot_roles = None
    if dots is not None:
        dot_roles = _Dots(
            _linear.roles_of(dots.head, HEAD_ROLES), None if dots.temperature is None else ""
        )
    out_roles = _Fields("T", "T", "T", "T", None if dots is None else ("T", "T", "T"))
    operands = (head, t, problem, dots)
    in_roles = (HEAD_ROLES, "", problem.roles(), dot_roles)
    if sched.vocab_axis is not None:
        return _tokens.vocab_parallel(fn, operands, in_roles, out_roles, sched)
    return _tokens.over_tokens(fn, operands, in_roles, out_roles, transposable=dots is not None)


def _nonzero(t: Any) -> Any:
    return None if t is None or isinstance(t, jax.custom_derivatives.SymbolicZero) else t


@functools.lru_cache(maxsize=64)
def _fields_fn(sched: _chunked.Schedule) -> Any:
    """The fields for one schedule, a custom_jvp of ``(head, temperature, problem)``."""

    @jax.custom_jvp
    def fields(head: Head, t: jax.Array, problem: Problem) -> tuple:
        return tuple(_run(sched, head, t, problem)[:4])

    def fields_jvp(primals: tuple, tangents: tuple) -> tuple:
        (head, t, problem), (head_dot, t_dot, _) = primals, tangents
        dots = _Dots(Head(*(_nonzero(d) for d in head_dot)), _nonzero(t_dot))
        zero_arg = np.zeros(problem.rows.counted.shape, jax.dtypes.float0)
        if all(d is None for d in dots.head) and dots.temperature is None:
            out = fields(head, t, problem)
            return out, (*(jnp.zeros_like(v) for v in out[:3]), zero_arg)
        out = _run(sched, head, t, problem, dots)
        return tuple(out[:4]), (*out.tangents, zero_arg)

    fields.defjvp(fields_jvp, symbolic_zeros=True)
    return jax.jit(fields)


def _prepare(
    function, x, w, labels, bias, where, ignore_index, logit_softcap, temperature, shards=1
):
    options = {"reduction": "none", "weights": None, "ignore_index": ignore_index}
    options |= {"label_smoothing": 0.0, "z_loss": 0.0, "logit_softcap": logit_softcap}
    head, problem = _linear.prepare(function, x, w, labels, bias, where, options, shards)
    if problem.config.soft:
        raise TypeError(
            f"{function}: labels must be integer class indices [N] (the sampled tokens), found "
            f"probabilities of dtype {jnp.asarray(labels).dtype}"
        )
    t = check_temperature(temperature, function).astype(problem.options.weights.dtype)
    # A temperature <= 0 under jit: every counted token NaN, as a bad label.
    rows = problem.rows._replace(bad=problem.rows.bad | (problem.rows.counted & ~(t > 0)))
    return head, t, Problem(problem.config, rows, problem.options)


@_options.suggests_misspellings
def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
) -> LogProbs:
    r"""Per-token log-probability, entropy, log-sum-exp and argmax of the head ``x @ w + bias``.

    For each token :math:`i` with scores :math:`s_i = \operatorname{cap}(x_i W + b)/T`
    (``logit_softcap`` first, then the sampling ``temperature``) and
    :math:`p_i = \operatorname{softmax}(s_i)`:

    .. math::

        \log p_{i y_i} = s_{i y_i} - \operatorname{lse}(s_i), \qquad
        H_i = -\sum_l p_{il}\log p_{il}, \qquad \operatorname{lse}(s_i), \qquad
        \arg\max_l s_{il},

    computed from one chunked pass over the vocabulary (the schedule of
    :func:`linear_cross_entropy`): the ``[N, L]`` logits are never formed. ``log_prob``,
    ``entropy`` and ``lse`` are differentiable in ``x``, ``w``, ``bias`` and ``temperature``,
    in every autodiff mode, by a hand-derived rule:

    .. math::

        \frac{\partial \log p_y}{\partial s} = e_y - p, \qquad
        \frac{\partial H}{\partial s} = -p\odot(\log p + H), \qquad
        \frac{\partial\operatorname{lse}}{\partial s} = p,

    with :math:`\partial s/\partial z = \operatorname{cap}'(z)/T` and
    :math:`\partial s/\partial T = -s/T` (``docs/derivation.md``). Reverse mode recomputes each
    block's logits (:math:`8NDL` FLOPs for value and gradient, as ``linear_cross_entropy``).
    ``argmax`` has no derivative.

    This is what RL post-training (PPO, GRPO) needs per sampled token: the log-probability at
    the sampling temperature, its gradient, and the entropy (see ``docs/rl.md``).

    Args:
        x: Hidden states ``[N, D]`` (float32, bfloat16, float16 or float64).
        w: Output projection ``[D, L]``.
        labels: Integer class indices ``[N]`` (the sampled tokens).
        bias: Optional ``[L]``.
        temperature: :math:`T > 0`, a scalar (traced or not).
        logit_softcap: :math:`c`: scores :math:`c\tanh(z/c)` before the temperature.
        where: Boolean ``[N]``: tokens to compute (others give 0 and no gradient).
        ignore_index: Label value of tokens that do not count (0 fields, no gradient).
        chunk_size: Tokens per chunk (as :func:`linear_cross_entropy`).
        vocab_block_size: Classes per block (as :func:`linear_cross_entropy`).

    Returns:
        :class:`LogProbs` of ``[N]`` arrays: float32 (float64 for float64 inputs), ``argmax``
        int32.

    Raises:
        TypeError: Non-floating ``x``/``w``, probability labels, a non-real temperature.
        ValueError: Shapes that do not match, labels out of range or a temperature <= 0
            (eagerly; under ``jit`` the token's fields become NaN).

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> x, w = jnp.ones((2, 3)), jnp.zeros((3, 4))
        >>> out = jxent.linear_log_probs(x, w, jnp.array([0, 3]))
        >>> print(out.log_prob, out.entropy)
        [-1.3862944 -1.3862944] [1.3862944 1.3862944]

    References:
        Schulman et al. 2017 (PPO), Shao et al. 2024 (GRPO); Liger Kernel's fused linear
        GRPO loss and entropy; levanter's fused loss ``(loss, lse)``.
    """
    head, t, problem = _prepare(
        "linear_log_probs", x, w, labels, bias, where, ignore_index, logit_softcap, temperature
    )
    sched = _chunked.schedule(
        head.x.shape[0], problem.config.num_classes, chunk_size, vocab_block_size
    )
    return LogProbs(*_fields_fn(sched)(head, t, problem))


@_options.suggests_misspellings
def vocab_parallel_linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str = "vocab",
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
) -> LogProbs:
    r""":func:`linear_log_probs` with ``w`` sharded along the vocabulary over ``mesh``.

    Each device scans its shard :math:`W_k`; each chunk's statistics (max, sum of exponentials,
    the entropy's sum, the label's score, the argmax) are merged across shards with
    ``pmax``/``psum``/``pmin``, and the tangents' row sums with ``psum``, as
    :func:`vocab_parallel_linear_cross_entropy` does; ``jax.grad`` gives ``dw`` sharded like
    ``w``. Tokens are sharded over the mesh's other axes as there.

    Args:
        x: Hidden states ``[N, D]``, sharded over the token axes (or to be).
        w: ``[D, L]``, sharded (or to be sharded) as ``P(None, axis_name)``.
        labels: Integer class indices ``[N]``.
        mesh: The device mesh.
        axis_name: The mesh axis that shards the vocabulary.
        bias: Optional ``[L]``, sharded like ``w``'s columns.
        temperature: As :func:`linear_log_probs`.
        logit_softcap: As :func:`linear_log_probs`.
        where: As :func:`linear_log_probs`.
        ignore_index: As :func:`linear_log_probs`.
        chunk_size: Tokens per chunk (as :func:`linear_log_probs`, for ``L/P`` classes).
        vocab_block_size: Classes per block within a shard.

    Returns:
        :class:`LogProbs` of ``[N]`` arrays.

    Raises:
        ValueError: ``axis_name`` not in ``mesh``, ``L`` not divisible by its size, a call
            inside ``jax.shard_map``, and everything :func:`linear_log_probs` raises.
    """
    function = "vocab_parallel_linear_log_probs"
    shards = _linear.check_vocab_mesh(function, mesh, axis_name)
    head, t, problem = _prepare(
        function, x, w, labels, bias, where, ignore_index, logit_softcap, temperature, shards
    )
    sched = _linear.vocab_schedule(
        function, head, problem, mesh, axis_name, chunk_size, vocab_block_size
    )
    return LogProbs(*_fields_fn(sched)(head, t, problem))
