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
dimension and every buffer is ``[chunk, block]``. The vocab-parallel loss runs the same scan on
each vocabulary shard and merges the shards' statistics with ``pmax``/``psum``.

The derivative is a ``jax.custom_jvp`` (so forward mode, ``jax.hessian`` and ``jax.linearize``
work). For ``"mean"``/``"sum"`` its rule runs pass B in the forward computation and the tangent
is :math:`\langle dx, \dot x\rangle + \langle dW, \dot W\rangle + \langle db, \dot b\rangle`
(plus the label terms), which transposes to exactly today's gradients. For ``"none"`` the rule
contracts each block's :math:`G_b` with :math:`\dot z_b = \dot x W_b + x \dot W_b + \dot b_b`
row by row; that map is linear, JAX transposes it for reverse mode, and ``jax.checkpoint``
makes the transpose recompute :math:`G_b` instead of storing it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh, PartitionSpec
from jax.typing import ArrayLike

from jxent import _kernel, _options, _validate
from jxent._kernel import Rows
from jxent._loss import Reduction
from jxent._options import Arrays, Config

# A [chunk, vocab_block] float32 buffer is kept near this many elements (16 MiB).
_CHUNK_ELEMENTS = 2**22
_VOCAB_BLOCK = 2048
_MAX_CHUNK = 4096


def default_chunk_size(num_tokens: int, num_classes: int) -> int:
    """Tokens per chunk: ``chunk * min(L, vocab block)`` near 4M elements, at most 4096.

    Each chunk updates the whole dW once, so larger chunks mean fewer passes over it; the
    chunk's ``[chunk, block]`` logits stay 16 MiB (2048 tokens for blocks of 2048 classes).
    At most ``N`` rounded up to a multiple of 8 (8 when there are no tokens).
    """
    chunk = 8
    while chunk < _MAX_CHUNK and 2 * chunk * min(num_classes, _VOCAB_BLOCK) <= _CHUNK_ELEMENTS:
        chunk *= 2
    return min(chunk, max(8, -(-num_tokens // 8) * 8))  # 8 for no tokens: an empty scan


@dataclasses.dataclass(frozen=True)
class _Schedule:
    chunk: int
    block: int
    axis_name: str | None = None  # the mesh axis that shards the vocabulary, if any
    mesh: Mesh | None = None


class _Args(NamedTuple):
    """The custom_jvp's arguments, in order."""

    x: jax.Array
    w: jax.Array
    b: jax.Array
    labels: jax.Array
    counted: jax.Array
    bad: jax.Array
    weights: jax.Array
    eps: jax.Array
    z: jax.Array


def accumulation_dtype(x: jax.Array, w: jax.Array) -> Any:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 ones."""
    return jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)


def _prepare(
    function: str,
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    bias: ArrayLike | None,
    where: ArrayLike | None,
    options: dict[str, Any],
) -> tuple[Config, _Args]:
    """Validates the arguments; returns the static config and the custom_jvp's arguments."""
    _options.check_option_names(options, function)
    if "axis" in options:
        raise TypeError(f"{function}() has no axis option: classes are w's columns")
    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    num_tokens, num_classes = _check_shapes(x, w, bias)
    layout = _validate.Layout((0, 1), (num_tokens,), (num_classes,))
    soft = _validate.check_labels((num_tokens, num_classes), labels, layout)
    row_mask, class_mask = _validate.check_where(where, (num_tokens, num_classes), layout)
    if class_mask is not None:
        raise ValueError(
            f"{function}: where must be a token mask of shape ({num_tokens},); a per-logit mask "
            f"needs the logits, which this loss never forms (use softmax_cross_entropy)"
        )
    acc = accumulation_dtype(x, w)
    config, arrays = _options.prepare(
        batch_shape=(num_tokens,),
        num_classes=num_classes,
        soft=soft,
        compute_dtype=acc,
        **options,
    )
    if row_mask is None:
        row_mask = jnp.ones((num_tokens,), bool)
    if soft:
        rows = Rows(labels, row_mask, jnp.zeros((num_tokens,), bool))
    else:
        _validate.check_label_range(labels, num_classes, config.ignore_index, row_mask)
        rows = _kernel.integer_rows(config, labels, row_mask)
    rows = rows._replace(bad=rows.bad | _options.bad_option(config, arrays))
    b = jnp.zeros((num_classes,), w.dtype) if bias is None else jnp.asarray(bias)
    return config, _Args(x, w, b, *rows, *arrays)


def _check_shapes(x: jax.Array, w: jax.Array, bias: ArrayLike | None) -> tuple[int, int]:
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, found {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, found shape {a.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x is [N, D] = {x.shape} but w is [D, L] = {w.shape}: D differs")
    if w.shape[1] == 0:
        raise ValueError(f"w must have at least one class (column), found shape {w.shape}")
    if bias is not None and jnp.shape(bias) != (w.shape[1],):
        raise ValueError(f"bias must have shape ({w.shape[1]},), found {jnp.shape(bias)}")
    return x.shape[0], w.shape[1]


def _zero(t: Any) -> bool:
    return t is None or isinstance(t, SymbolicZero)


class _Want(NamedTuple):
    """Which outputs pass B must produce (static)."""

    x: bool = False
    w: bool = False
    b: bool = False
    labels: bool = False
    weights: bool = False
    eps: bool = False


def _scan(
    config: Config,
    sched: _Schedule,
    args: _Args,
    a: jax.Array,
    b_scale: jax.Array,
    want: _Want,
    dots: _Args | None = None,
) -> dict[str, jax.Array]:
    """Per-token losses and what ``want`` asks for, or (``dots``) the per-token tangent.

    Runs on one device, or on one vocabulary shard inside ``shard_map`` (``sched.axis_name``):
    then ``w``, ``b``, the class weights and probability labels are the local shard, and the
    statistics of each chunk are merged across shards before pass B.
    """
    x, w = args.x, args.w
    if dots is not None:
        dots = _dots_values(dots)
        if not config.soft:
            dots = dots._replace(labels=None)
    num_tokens, dim = x.shape
    local_classes = w.shape[1]
    acc = accumulation_dtype(x, w)
    arrays = Arrays(args.weights, args.eps, args.z)
    chunk = sched.chunk
    chunks = -(-num_tokens // chunk)
    pad = chunks * chunk - num_tokens
    block = min(sched.block, local_classes)
    full_blocks, rest = divmod(local_classes, block)
    offset = 0
    if sched.axis_name is not None:
        offset = lax.axis_index(sched.axis_name) * local_classes

    def split(v: jax.Array) -> jax.Array:
        v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
        return v.reshape((chunks, chunk, *v.shape[1:]))

    per_token = {"x": x, "labels": args.labels, "counted": args.counted, "bad": args.bad}
    per_token |= {"a": a, "b_scale": b_scale}
    if dots is not None:
        per_token |= {"x_dot": dots.x, "q_dot": dots.labels}
    per_token = {k: split(v) for k, v in per_token.items() if v is not None}

    def logits_block(c: dict, rows: Rows, start: Any, size: int, dot: bool = False) -> tuple:
        """Block ``[start, start + size)`` (local columns): s, ds/dx, target, and z's tangent."""
        w_b = lax.dynamic_slice_in_dim(w, start, size, axis=1)
        z = jnp.dot(c["x"], w_b, preferred_element_type=acc)
        z = z + lax.dynamic_slice_in_dim(args.b, start, size).astype(acc)[None, :]
        s, ds = _kernel.cap(config, z)
        local = Arrays(lax.dynamic_slice_in_dim(args.weights, start, size), args.eps, args.z)
        target = _target(rows, local, s, start, size)
        z_dot = None
        if dot:
            z_dot = jnp.zeros(z.shape, acc)
            if not _zero(dots.x):
                z_dot = z_dot + jnp.dot(c["x_dot"], w_b, preferred_element_type=acc)
            if not _zero(dots.w):
                w_dot = lax.dynamic_slice_in_dim(dots.w, start, size, axis=1)
                z_dot = z_dot + jnp.dot(c["x"], w_dot, preferred_element_type=acc)
            if not _zero(dots.b):
                z_dot = z_dot + lax.dynamic_slice_in_dim(dots.b, start, size).astype(acc)[None, :]
        return w_b, s, ds, target, local, z_dot

    def _target(rows: Rows, local: Arrays, s: jax.Array, start: Any, size: int) -> Any:
        # Probability labels and class weights are sliced locally, class indices compared
        # with global column numbers.
        weights = local.weights if config.has_weights else None
        if config.soft:
            q = lax.dynamic_slice_in_dim(rows.labels, start, size, axis=1)
            return _kernel.target_block(config, q, weights, args.eps, s, 0)
        return _kernel.target_block(config, rows.labels, weights, args.eps, s, start + offset)

    def body(carry: tuple, inputs: tuple) -> tuple:
        c, pin = inputs

        def over_blocks(step: Any, carry: Any) -> Any:
            # `pin` is a zero that comes from the scanned inputs. Without it the block offsets
            # look loop-invariant to JAX's partial evaluation, which (under jax.grad) hoists
            # every block of W out of the token loop and stacks them: a copy of W or more.
            go = lambda j, c: step(c, j * block + pin, block)  # noqa: E731
            carry = lax.fori_loop(0, full_blocks, go, carry)
            return step(carry, full_blocks * block + pin, rest) if rest else carry

        rows = Rows(c["labels"], c["counted"], c["bad"])

        def stats(st: _kernel.Stats, start: Any, size: int) -> _kernel.Stats:
            _, s, _, target, _, _ = logits_block(c, rows, start, size)
            return _kernel.merge(st, _kernel.block_stats(s, target.t))

        zeros = jnp.zeros((chunk,), acc)
        st = over_blocks(stats, _kernel.Stats(zeros - jnp.inf, zeros, zeros, zeros))
        if sched.axis_name is not None:
            st = _merge_shards(st, sched.axis_name)
        lse, ce, empty = _kernel.finish(st)
        rows = rows._replace(bad=rows.bad | (rows.counted & empty))
        loss = _kernel.row_losses(config, rows, arrays, ce, lse, c["a"], c["b_scale"])
        out = {"loss": loss, "ce": jnp.where(rows.counted, ce, 0.0), "lse": lse}
        if dots is not None:
            out["tangent"] = over_blocks(
                lambda t, start, size: t + _tangent_block(c, rows, st, start, size),
                jnp.zeros((chunk,), acc),
            )
            return carry, out
        if not any(want):
            return carry, out

        def grads(g: dict, start: Any, size: int) -> dict:
            w_b, s, ds, target, local, _ = logits_block(c, rows, start, size)
            grad = _kernel.grad_block(config, rows, local, s, ds, target, st, c["a"], c["b_scale"])
            g = dict(g)
            g_in = grad.astype(x.dtype)
            if want.x:
                g["dx"] = g["dx"] + _matmul(g_in, w_b.T, acc)
            if want.w:
                upd = lax.dynamic_slice_in_dim(g["dw"], start, size, axis=1)
                upd = upd + _matmul(c["x"].T, g_in, acc)
                g["dw"] = lax.dynamic_update_slice_in_dim(g["dw"], upd, start, axis=1)
            if want.b:
                upd = lax.dynamic_slice_in_dim(g["db"], start, size) + jnp.sum(grad, axis=0)
                g["db"] = lax.dynamic_update_slice_in_dim(g["db"], upd, start, axis=0)
            if want.labels or want.weights or want.eps:
                coef = _kernel.label_coefficients(config, rows, local, s, target, st, c["a"])
                if want.labels:
                    g["dq"] = lax.dynamic_update_slice_in_dim(g["dq"], coef.labels, start, 1)
                if want.weights:
                    upd = lax.dynamic_slice_in_dim(g["dweights"], start, size)
                    upd = upd + jnp.sum(coef.weights, axis=0)
                    g["dweights"] = lax.dynamic_update_slice_in_dim(g["dweights"], upd, start, 0)
                if want.eps:
                    g["deps"] = g["deps"] + jnp.sum(coef.smoothing)
            return g

        init = {"dx": jnp.zeros((chunk, dim), acc) if want.x else None}
        init |= {"dq": jnp.zeros((chunk, local_classes), acc) if want.labels else None}
        init |= {k: v for k, v in carry.items()}
        g = over_blocks(grads, init)
        out |= {k: g[k] for k in ("dx", "dq") if g[k] is not None}
        return {k: g[k] for k in carry}, out

    def _tangent_block(c: dict, rows: Rows, st: Any, start: Any, size: int) -> Any:
        # Checkpointed: reverse mode recomputes G_b instead of keeping an [N, L] residual.
        def contract(x_c, x_dot_c, q_dot_c, st, start):
            cc = dict(c, x=x_c, x_dot=x_dot_c, q_dot=q_dot_c)
            _, s, ds, target, local, z_dot = logits_block(cc, rows, start, size, dot=True)
            grad = _kernel.grad_block(config, rows, local, s, ds, target, st, c["a"], c["b_scale"])
            out = jnp.sum(grad * z_dot, axis=1)
            coef = None
            if not (_zero(dots.labels) and _zero(dots.weights) and _zero(dots.eps)):
                coef = _kernel.label_coefficients(config, rows, local, s, target, st, c["a"])
            if config.soft and not _zero(dots.labels):
                q_dot_b = lax.dynamic_slice_in_dim(q_dot_c, start, size, axis=1)
                out = out + jnp.sum(coef.labels * q_dot_b, axis=1)
            if not _zero(dots.weights):
                w_dot = lax.dynamic_slice_in_dim(dots.weights, start, size)
                out = out + jnp.sum(coef.weights * w_dot[None, :], axis=1)
            if not _zero(dots.eps):
                out = out + jnp.sum(coef.smoothing, axis=1) * dots.eps
            return out

        return jax.checkpoint(contract)(c["x"], c.get("x_dot"), c.get("q_dot"), st, start)

    carry = {}
    if want.w:
        carry["dw"] = jnp.zeros((dim, local_classes), acc)
    if want.b:
        carry["db"] = jnp.zeros((local_classes,), acc)
    if want.weights:
        carry["dweights"] = jnp.zeros((local_classes,), acc)
    if want.eps:
        carry["deps"] = jnp.zeros((), acc)
    carry, outs = lax.scan(body, carry, (per_token, jnp.zeros((chunks,), jnp.int32)))
    result = {k: v.reshape(-1, *v.shape[2:])[:num_tokens] for k, v in outs.items()}
    return result | carry


def _matmul(a: jax.Array, b: jax.Array, acc: Any) -> jax.Array:
    """``a @ b`` accumulated in ``acc``; bf16 operands go up to ``acc`` first on CPU.

    XLA:CPU converts bf16 matmuls to float32 anyway, and its DotThunk cannot run some
    bf16 x bf16 -> f32 products outside a loop ("Unsupported element type").
    """
    if a.dtype != acc and jax.default_backend() == "cpu":
        a, b = a.astype(acc), b.astype(acc)
    return jnp.dot(a, b, preferred_element_type=acc)


def _merge_shards(stats: _kernel.Stats, axis_name: str) -> _kernel.Stats:
    """:func:`_kernel.merge` across the vocabulary shards: ``pmax`` of the max, ``psum`` else."""
    m = lax.pmax(stats.m, axis_name)
    local = _kernel.rebase(stats, m)
    return _kernel.Stats(m, *(lax.psum(v, axis_name) for v in local[1:]))


@functools.lru_cache(maxsize=64)
def _loss_fn(config: Config, sched: _Schedule) -> Any:
    """The loss for one static config and schedule, as a custom_jvp over the chunked scan."""
    run = _runner(config, sched)

    @jax.custom_jvp
    def loss_fn(*args):
        args = _Args(*args)
        a, b_scale, _ = _kernel.row_scales(config, Rows(*args[3:6]), args.weights)
        return _reduce(config, run(args, a, b_scale, _Want())["loss"])

    def loss_jvp(primals, tangents):
        args, dots = _Args(*primals), _Args(*tangents)
        rows = Rows(args.labels, args.counted, args.bad)
        a, b_scale, n = _kernel.row_scales(config, rows, args.weights)
        if config.reduction == "none":
            out = run(args, a, b_scale, _Want(), dots)
            tangent = out["tangent"]
        else:
            want = _Want(
                *(not _zero(t) for t in (dots.x, dots.w, dots.b)),
                config.soft and not _zero(dots.labels),
                not _zero(dots.weights),
                not _zero(dots.eps),
            )
            out = run(args, a, b_scale, want)
            tangent = jnp.zeros((), out["loss"].dtype)
            for key, dot in (
                ("dx", dots.x),
                ("dw", dots.w),
                ("db", dots.b),
                ("dq", dots.labels),
                ("dweights", dots.weights),
                ("deps", dots.eps),
            ):
                if key in out:
                    tangent = tangent + jnp.sum(out[key] * dot.astype(out[key].dtype))
            if want.weights:
                d_w = _kernel.weights_denominator_grad(
                    config, rows, jnp.sum(a * out["ce"]), _kernel.denominator(rows.counted, n)
                )
                if d_w is not None:
                    tangent = tangent + jnp.sum(d_w * dots.weights)
        if not _zero(dots.z):
            lse = _kernel.safe_lse(rows, out["lse"])
            z_term = jnp.where(rows.counted, b_scale * lse**2, 0.0) * dots.z
            tangent = tangent + (z_term if config.reduction == "none" else jnp.sum(z_term))
        tangent = jnp.where(
            args.bad if config.reduction == "none" else jnp.any(args.bad), jnp.nan, tangent
        )
        return _reduce(config, out["loss"]), tangent.astype(out["loss"].dtype)

    loss_fn.defjvp(loss_jvp, symbolic_zeros=True)
    return jax.jit(loss_fn)  # one compiled program for eager calls, as in _loss._loss_fn


def _reduce(config: Config, per_token: jax.Array) -> jax.Array:
    return per_token if config.reduction == "none" else jnp.sum(per_token)


def _runner(config: Config, sched: _Schedule) -> Any:
    """``_scan`` on one device, or under ``shard_map`` over the vocabulary shards."""
    if sched.axis_name is None:
        return functools.partial(_scan, config, sched)
    rep, cols, vec = (
        PartitionSpec(),
        PartitionSpec(None, sched.axis_name),
        PartitionSpec(sched.axis_name),
    )
    label_spec = cols if config.soft else rep

    def run(args: _Args, a: jax.Array, b_scale: jax.Array, want: _Want, dots: Any = None):
        in_args = _Args(rep, cols, vec, label_spec, rep, rep, vec, rep, rep)
        specs = {"loss": rep, "ce": rep, "lse": rep, "tangent": rep, "dx": rep, "dw": cols}
        specs |= {"db": vec, "dq": cols, "dweights": vec, "deps": rep}

        def local(args, a, b_scale, dots):
            if dots is not None:
                dots = _Args(**{k: dots.get(k) for k in _Args._fields})
            out = _scan(config, sched, args, a, b_scale, want, dots)
            for k in ("tangent", "dx", "deps"):
                if k in out:
                    out[k] = lax.psum(out[k], sched.axis_name)
            return out

        keys = _output_keys(config, want, dots is not None)
        dots_values = None if dots is None else _dots_values(dots)._asdict()
        dots_values = dots_values and {k: v for k, v in dots_values.items() if v is not None}
        dots_spec = dots_values and {k: getattr(in_args, k) for k in dots_values}
        mapped = jax.shard_map(
            local,
            mesh=sched.mesh,
            in_specs=(in_args, rep, rep, dots_spec),
            out_specs={k: specs[k] for k in keys},
            check_vma=False,
        )
        return mapped(args, a, b_scale, dots_values)

    return run


def _output_keys(config: Config, want: _Want, tangent: bool) -> list[str]:
    keys = ["loss", "ce", "lse"] + (["tangent"] if tangent else [])
    names = ("dx", "dw", "db", "dq", "dweights", "deps")
    return keys + [k for k, on in zip(names, want, strict=True) if on]


def _dots_values(dots: _Args) -> _Args:
    return _Args(*(None if _zero(d) else d for d in dots))


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
) -> jax.Array:
    r"""Cross-entropy of :math:`\operatorname{softmax}(x W + b)`, chunked over tokens.

    Equal to ``jxent.softmax_cross_entropy(x @ w + bias, labels, ...)`` with every option, but
    the ``[N, L]`` logits exist only as ``[chunk_size, vocab_block_size]`` blocks (formed twice:
    once for the log-sum-exp, once for the gradient, see the module notes). Its derivative is a
    ``jax.custom_jvp`` built on the hand-derived gradient of the row kernel,

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
        chunk_size: Tokens per chunk; by default a power of two with ``chunk * block`` near
            4M elements, at most 4096 (2048 tokens for ``L >= 2048``), at most ``N`` rounded up
            to 8. Each chunk reads and writes dW once.
        vocab_block_size: Classes per block (default 2048); the last block may be smaller.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]``.
        where: Boolean mask ``[N]`` of tokens that count.
        ignore_index: Label value of tokens that do not count.
        label_smoothing: As in :func:`jxent.loss_and_logits_grad`.
        z_loss: As in :func:`jxent.loss_and_logits_grad`.
        logit_softcap: As in :func:`jxent.loss_and_logits_grad`.

    Returns:
        The loss: scalar, or ``[N]`` for ``reduction="none"`` (whose gradients are exact for
        any per-token cotangent).

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
    config, args = _prepare("linear_cross_entropy", x, w, labels, bias, where, options)
    sched = schedule(args.x.shape[0], config.num_classes, chunk_size, vocab_block_size)
    return _loss_fn(config, sched)(*args)


def schedule(
    num_tokens: int,
    num_classes: int,
    chunk_size: int | None,
    vocab_block_size: int | None,
    axis_name: str | None = None,
    mesh: Mesh | None = None,
) -> _Schedule:
    """The chunked schedule: the defaults for None, else positive ints (0 is not "default")."""
    for name, v in (("chunk_size", chunk_size), ("vocab_block_size", vocab_block_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, found {v!r}")
    return _Schedule(
        chunk=default_chunk_size(num_tokens, num_classes) if chunk_size is None else chunk_size,
        block=_VOCAB_BLOCK if vocab_block_size is None else vocab_block_size,
        axis_name=axis_name,
        mesh=mesh,
    )


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
) -> jax.Array:
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

    Args:
        x: Hidden states ``[N, D]`` (replicated).
        w: ``[D, L]``, sharded (or to be sharded) as ``P(None, axis_name)``.
        labels: Integer labels ``[N]`` (replicated) or probabilities ``[N, L]`` (sharded like
            ``w``'s columns).
        mesh: The device mesh.
        axis_name: The mesh axis that shards the vocabulary.
        bias: Optional ``[L]``, sharded like ``w``'s columns.
        chunk_size: Tokens per chunk (default as :func:`linear_cross_entropy` for ``L/P``).
        vocab_block_size: Classes per block within a shard (default 2048).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]``, sharded like ``w``'s columns.
        where: Boolean token mask ``[N]``.
        ignore_index: Label value of tokens that do not count.
        label_smoothing: As in :func:`jxent.loss_and_logits_grad`.
        z_loss: As in :func:`jxent.loss_and_logits_grad`.
        logit_softcap: As in :func:`jxent.loss_and_logits_grad`.

    Returns:
        The loss, scalar or ``[N]``; ``jax.grad`` gives ``dw`` sharded like ``w``.

    Raises:
        ValueError: ``axis_name`` not in ``mesh``, ``L`` not divisible by its size, and
            everything :func:`linear_cross_entropy` raises.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    shards = mesh.shape[axis_name]
    options = {"reduction": reduction, "weights": weights, "ignore_index": ignore_index}
    options |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    options |= {"logit_softcap": logit_softcap}
    config, args = _prepare(
        "vocab_parallel_linear_cross_entropy", x, w, labels, bias, where, options
    )
    if config.num_classes % shards:
        raise ValueError(
            f"w has L = {config.num_classes} classes, which do not divide over the {shards} "
            f"devices of mesh axis {axis_name!r}"
        )
    sched = schedule(
        args.x.shape[0], config.num_classes // shards, chunk_size, vocab_block_size, axis_name, mesh
    )
    return _loss_fn(config, sched)(*args)
