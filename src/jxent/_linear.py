r"""Linear + softmax cross-entropy that never materialises the ``[tokens, vocab]`` logits.

For a language-model head :math:`z = x W + b` with :math:`x \in \mathbb{R}^{N\times D}`,
:math:`W \in \mathbb{R}^{D\times L}`, the hand-derived logits gradient :math:`G = \partial J /
\partial z` (rows :math:`p_i - \operatorname{onehot}(y_i)`, or the full option formula) gives

.. math::

    \frac{\partial J}{\partial x} = G W^\top, \qquad \frac{\partial J}{\partial W} = x^\top G,
    \qquad \frac{\partial J}{\partial b} = \textstyle\sum_i G_i,

and each row of :math:`G` needs only its own row of logits. So the tokens are processed in
chunks of ``chunk_size``: a chunk's logits, loss and :math:`G` rows are formed, used for
:math:`dx` and accumulated into :math:`dW` (in vocabulary blocks, updated in place), and
dropped. For ``"mean"``/``"sum"`` the gradients are formed in the same pass as the loss (the
Liger approach: :math:`6NDL` FLOPs, the same as the materialised computation) and scaled by the
incoming scalar cotangent in the backward pass; for ``"none"`` the backward pass recomputes
with the per-token cotangent (exact gradients for every reduction).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jax.typing import ArrayLike

from jxent import _validate
from jxent._loss import Reduction, loss_and_logits_grad, mean_denominator

# A chunk's [chunk, L] float32 buffers are kept near this many elements (16 MiB each).
_CHUNK_ELEMENTS = 2**22
_VOCAB_BLOCK = 8192


def default_chunk_size(num_tokens: int, num_classes: int) -> int:
    """Tokens per chunk: a power of two in [64, 1024] with ``chunk * L`` near 4M elements.

    Every chunk reads and writes the whole float32 dW once, so fewer than 64 tokens per chunk
    makes that traffic, not the matmuls, the cost: measured at N=2048, D=512, L=262144, chunks
    of 16 took 40.5 s where 64 keeps the time linear in L.
    """
    chunk = 64
    while chunk < 1024 and 2 * chunk * num_classes <= _CHUNK_ELEMENTS:
        chunk *= 2
    return min(chunk, -(-num_tokens // 8) * 8)


@dataclasses.dataclass(frozen=True)
class _Config:
    reduction: str
    chunk: int
    ignore_index: int | None
    label_smoothing: float
    z_loss: float
    logit_softcap: float | None
    has_weights: bool


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
) -> jax.Array:
    r"""Cross-entropy of :math:`\operatorname{softmax}(x W + b)`, chunked over tokens.

    Equal to ``jxent.softmax_cross_entropy(x @ w + bias, labels, ...)`` with every option, but
    the ``[N, L]`` logits exist only ``chunk_size`` rows at a time, and ``jax.grad`` gives
    :math:`dx, dW, db` through a ``jax.custom_vjp`` built on the hand-derived gradient

    .. math::

        dx = G W^\top, \quad dW = x^\top G, \quad db = \textstyle\sum_i G_i, \qquad
        G_i = \partial \ell / \partial z_i \text{ (see } \texttt{loss\_and\_logits\_grad}).

    The matmuls run in the inputs' dtype with float32 accumulation; the log-sum-exp, the loss
    and :math:`G` are float32, :math:`dW` and :math:`db` accumulate in float32 across chunks and
    are returned in the parameters' dtypes. Padded tokens (when ``chunk_size`` does not divide
    ``N``) are masked and contribute nothing.

    Args:
        x: Hidden states ``[N, D]``.
        w: Output projection ``[D, L]``.
        labels: Integer class indices ``[N]`` or probabilities ``[N, L]``.
        bias: Optional ``[L]``.
        chunk_size: Tokens per chunk; by default a power of two keeping a chunk's logits near
            16 MiB (64 tokens at ``L = 65536``), at least 64 (at most ``N`` rounded up to 8).
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
    args, config = _prepare(
        x,
        w,
        labels,
        bias,
        chunk_size,
        reduction,
        weights,
        where,
        ignore_index,
        label_smoothing,
        z_loss,
        logit_softcap,
    )
    return _custom_vjp(config)(*args)


def _prepare(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    bias: ArrayLike | None,
    chunk_size: int | None,
    reduction: str,
    weights: ArrayLike | None,
    where: ArrayLike | None,
    ignore_index: int | None,
    label_smoothing: float,
    z_loss: float,
    logit_softcap: float | None,
) -> tuple[tuple[jax.Array, ...], _Config]:
    """Validates the arguments; returns the custom_vjp's array arguments and static config."""
    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    num_tokens, num_classes = _check_shapes(x, w, bias)
    soft = _validate.check_labels(
        jax.ShapeDtypeStruct((num_tokens, num_classes), x.dtype), labels, 1
    )
    weights = None if weights is None else jnp.asarray(weights)
    where = None if where is None else jnp.asarray(where)
    _validate.check_options(
        batch_shape=(num_tokens,),
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
    acc = accumulation_dtype(x, w)
    counted = jnp.ones((num_tokens,), bool) if where is None else where
    normaliser = jnp.ones((num_tokens,), acc)
    if not soft:
        _validate.check_label_range(labels, num_classes, ignore_index, where)
        if ignore_index is not None:
            counted = counted & (labels != ignore_index)
        if weights is not None:
            in_range = (labels >= 0) & (labels < num_classes)
            normaliser = jnp.take(weights.astype(acc), jnp.where(in_range, labels, 0))
    denominator = (
        mean_denominator(counted, normaliser) if reduction == "mean" else jnp.ones((), acc)
    )
    bias = jnp.zeros((num_classes,), w.dtype) if bias is None else jnp.asarray(bias)
    config = _Config(
        reduction=reduction,
        chunk=chunk_size or default_chunk_size(num_tokens, num_classes),
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        has_weights=weights is not None,
    )
    if weights is None:
        weights = jnp.ones((num_classes,), acc)
    mask = jnp.ones((num_tokens,), bool) if where is None else where
    return (x, w, bias, labels, mask, weights, denominator), config


def accumulation_dtype(x: jax.Array, w: jax.Array) -> Any:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 ones."""
    return jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)


def _check_shapes(x: jax.Array, w: jax.Array, bias: ArrayLike | None) -> tuple[int, int]:
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, found {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, found shape {a.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x is [N, D] = {x.shape} but w is [D, L] = {w.shape}: D differs")
    if bias is not None and jnp.shape(bias) != (w.shape[1],):
        raise ValueError(f"bias must have shape ({w.shape[1]},), found {jnp.shape(bias)}")
    return x.shape[0], w.shape[1]


@functools.lru_cache(maxsize=64)
def _custom_vjp(config: _Config, backend: tuple = ("chunked",)) -> Any:
    """The loss as a custom_vjp over ``_fused`` (one device) or ``_vocab_parallel_fused``."""
    if backend[0] == "chunked":
        fused = _fused
    else:
        fused = functools.partial(_vocab_parallel_fused, backend[1], backend[2])

    @jax.custom_vjp
    def loss_fn(x, w, b, labels, mask, weights, denominator):
        per_token = fused(config, x, w, b, labels, mask, weights, None)[0]
        return _reduce(config, per_token, denominator)

    def fwd(x, w, b, labels, mask, weights, denominator):
        if config.reduction == "none":
            per_token = fused(config, x, w, b, labels, mask, weights, None)[0]
            return per_token, (x, w, b, labels, mask, weights, denominator)
        scale = jnp.broadcast_to(1.0 / denominator, mask.shape).astype(accumulation_dtype(x, w))
        per_token, dx, dw, db = fused(config, x, w, b, labels, mask, weights, scale)
        return _reduce(config, per_token, denominator), (dx, dw, db)

    def bwd(residuals, cotangent):
        if config.reduction == "none":
            x, w, b, labels, mask, weights, _ = residuals
            _, dx, dw, db = fused(
                config, x, w, b, labels, mask, weights, cotangent.astype(accumulation_dtype(x, w))
            )
        else:
            dx, dw, db = (
                (cotangent * g.astype(cotangent.dtype)).astype(g.dtype) for g in residuals
            )
        return dx, dw, db, None, None, None, None

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


def _reduce(config: _Config, per_token: jax.Array, denominator: jax.Array) -> jax.Array:
    if config.reduction == "none":
        return per_token
    total = jnp.sum(per_token)
    return total / denominator if config.reduction == "mean" else total


def _fused(
    config: _Config,
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    weights: jax.Array,
    token_scale: jax.Array | None,
) -> tuple[jax.Array, ...]:
    """Per-token losses and, with ``token_scale``, gradients of ``sum_i scale_i * loss_i``."""
    num_tokens, dim = x.shape
    num_classes = w.shape[1]
    chunk = config.chunk
    chunks = -(-num_tokens // chunk)
    pad = chunks * chunk - num_tokens

    def split(a: jax.Array, fill: Any) -> jax.Array:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape((chunks, chunk, *a.shape[1:]))

    acc = accumulation_dtype(x, w)
    need_grad = token_scale is not None
    scale = token_scale if need_grad else jnp.zeros((num_tokens,), acc)
    xs = (split(x, 0), split(labels, 0), split(mask, False), split(scale, 0))
    options = {
        "ignore_index": config.ignore_index,
        "label_smoothing": config.label_smoothing,
        "z_loss": config.z_loss,
        "logit_softcap": config.logit_softcap,
        "weights": weights if config.has_weights else None,
    }

    def body(carry: tuple, inputs: tuple) -> tuple:
        dw, db = carry
        x_c, y_c, m_c, s_c = inputs
        logits = jnp.dot(x_c, w, preferred_element_type=acc) + b.astype(acc)[None, :]
        loss_c, g = loss_and_logits_grad(logits, y_c, reduction="none", where=m_c, **options)
        if not need_grad:
            return carry, (loss_c,)
        g = g * s_c[:, None]
        g_in = g.astype(x.dtype)
        dx_c = jnp.dot(g_in, w.T, preferred_element_type=acc).astype(x.dtype)
        dw = _accumulate_dw(dw, x_c, g_in)
        return (dw, db + jnp.sum(g, axis=0)), (loss_c, dx_c)

    init = (jnp.zeros((dim, num_classes), acc), jnp.zeros((num_classes,), acc))
    if not need_grad:
        init = (jnp.zeros(()), jnp.zeros(()))
    (dw, db), outs = lax.scan(body, init, xs)
    per_token = outs[0].reshape(-1)[:num_tokens]
    if not need_grad:
        return (per_token,)
    dx = outs[1].reshape(-1, dim)[:num_tokens]
    return per_token, dx, dw.astype(w.dtype), db.astype(b.dtype)


def _accumulate_dw(dw: jax.Array, x_c: jax.Array, g: jax.Array) -> jax.Array:
    """``dw + x_c.T @ g`` in vocabulary blocks updated in place (no [D, L] temporary)."""
    num_classes = dw.shape[1]
    block = min(_VOCAB_BLOCK, num_classes)
    full = num_classes // block

    def update(start: jax.Array | int, size: int, dw: jax.Array) -> jax.Array:
        g_block = lax.dynamic_slice_in_dim(g, start, size, axis=1)
        current = lax.dynamic_slice_in_dim(dw, start, size, axis=1)
        new = current + jnp.dot(x_c.T, g_block, preferred_element_type=dw.dtype)
        return lax.dynamic_update_slice_in_dim(dw, new, start, axis=1)

    dw = lax.fori_loop(0, full, lambda j, dw: update(j * block, block, dw), dw)
    if num_classes % block:
        dw = update(full * block, num_classes % block, dw)
    return dw


def vocab_parallel_linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str = "vocab",
    bias: ArrayLike | None = None,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
) -> jax.Array:
    r""":func:`linear_cross_entropy` with ``w`` sharded along the vocabulary over ``mesh``.

    Megatron-LM's vocab-parallel scheme under ``jax.shard_map``: device :math:`k` holds
    :math:`W_k \in \mathbb{R}^{D \times L/P}` and forms only its logits shard :math:`x W_k`.
    Three collectives combine the softmax -- ``pmax`` of the row maxima, ``psum`` of the sums of
    exponentials (the log-sum-exp) and ``psum`` of the target logit (found on one shard) -- plus
    ``psum`` of :math:`\sum_c s_c` for label smoothing. The hand-derived gradient is local:
    :math:`G_k = p_k(1 + 2z\,\mathrm{lse}) - t_k`, :math:`dW_k = x^\top G_k`, and
    :math:`dx = \operatorname{psum}_k G_k W_k^\top`.

    Integer labels only, without class ``weights`` (use :func:`linear_cross_entropy` for
    those). ``L`` must divide evenly over the ``axis_name`` devices.

    Args:
        x: Hidden states ``[N, D]`` (replicated).
        w: ``[D, L]``, sharded (or to be sharded) as ``P(None, axis_name)``.
        labels: Integer labels ``[N]``.
        mesh: The device mesh.
        axis_name: The mesh axis that shards the vocabulary.
        bias: Optional ``[L]``, sharded like ``w``'s columns.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        where: Boolean token mask ``[N]``.
        ignore_index: Label value of tokens that do not count.
        label_smoothing: As in :func:`jxent.loss_and_logits_grad`.
        z_loss: As in :func:`jxent.loss_and_logits_grad`.
        logit_softcap: As in :func:`jxent.loss_and_logits_grad`.

    Returns:
        The loss, scalar or ``[N]``; ``jax.grad`` gives ``dw`` sharded like ``w``.
    """
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError("vocab_parallel_linear_cross_entropy takes integer labels only")
    shards = mesh.shape[axis_name]
    if jnp.shape(w)[-1] % shards:
        raise ValueError(f"L = {jnp.shape(w)[-1]} does not divide over {shards} devices")
    args, config = _prepare(
        x,
        w,
        labels,
        bias,
        None,
        reduction,
        None,
        where,
        ignore_index,
        label_smoothing,
        z_loss,
        logit_softcap,
    )
    return _custom_vjp(config, ("vocab", mesh, axis_name))(*args)


def _vocab_parallel_fused(
    mesh: Mesh,
    axis: str,
    config: _Config,
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    weights: jax.Array,
    token_scale: jax.Array | None,
) -> tuple[jax.Array, ...]:
    del weights  # not supported on this path (checked by the caller)
    need_grad = token_scale is not None
    scale = token_scale if need_grad else jnp.zeros(mask.shape, accumulation_dtype(x, w))
    num_classes = w.shape[1]
    eps, z, cap = config.label_smoothing, config.z_loss, config.logit_softcap

    def local(x, w_k, b_k, labels, mask, scale):
        acc = accumulation_dtype(x, w_k)
        s = jnp.dot(x, w_k, preferred_element_type=acc) + b_k.astype(acc)[None, :]
        if cap is not None:
            tanh = jnp.tanh(s / cap)
            s = cap * tanh
        shard = w_k.shape[1]
        row_max = lax.pmax(jnp.max(s, axis=1), axis)
        exp = jnp.exp(s - row_max[:, None])
        sum_exp = lax.psum(jnp.sum(exp, axis=1), axis)
        lse = row_max + jnp.log(sum_exp)
        offset = lax.axis_index(axis) * shard
        local_y = labels - offset
        here = (local_y >= 0) & (local_y < shard)
        s_local = jnp.take_along_axis(s, jnp.clip(local_y, 0, shard - 1)[:, None], axis=1)[:, 0]
        s_y = lax.psum(jnp.where(here, s_local, 0.0), axis)
        loss = (1.0 - eps) * (lse - s_y)
        if eps:
            loss = loss + eps * (lse - lax.psum(jnp.sum(s, axis=1), axis) / num_classes)
        if z:
            loss = loss + z * lse**2
        counted = mask if config.ignore_index is None else mask & (labels != config.ignore_index)
        bad = counted & ((labels < 0) | (labels >= num_classes))
        loss = jnp.where(bad, jnp.nan, jnp.where(counted, loss, 0.0))
        if not need_grad:
            return (loss,)
        probs = exp / sum_exp[:, None]
        is_target = here[:, None] & (
            lax.broadcasted_iota(labels.dtype, s.shape, 1) == local_y[:, None]
        )
        g = probs * (1.0 + 2.0 * z * lse)[:, None] - jnp.where(is_target, 1.0 - eps, 0.0)
        if eps:
            g = g - eps / num_classes
        if cap is not None:
            g = g * (1.0 - tanh**2)
        keep = jnp.where(counted, scale, 0.0)[:, None]
        g = jnp.where(bad[:, None], jnp.nan, g * keep)
        g_in = g.astype(x.dtype)
        dx = lax.psum(jnp.dot(g_in, w_k.T, preferred_element_type=acc), axis).astype(x.dtype)
        dw = jnp.dot(x.T, g_in, preferred_element_type=acc).astype(w_k.dtype)
        return loss, dx, dw, jnp.sum(g, axis=0).astype(b_k.dtype)

    rep, vocab = PartitionSpec(), PartitionSpec(None, axis)
    out_specs = (rep, rep, vocab, PartitionSpec(axis)) if need_grad else (rep,)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rep, vocab, PartitionSpec(axis), rep, rep, rep),
        out_specs=out_specs,
        check_vma=False,
    )
    return run(x, w, b, labels, mask, scale)
