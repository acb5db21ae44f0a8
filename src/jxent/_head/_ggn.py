r"""The Gauss-Newton product of the linear + cross-entropy head, chunked: no ``[N, L]`` buffer.

For :math:`z = xW + b` the GGN product with respect to :math:`(x, W, b)` along
:math:`(\dot x, \dot W, \dot b)` is

.. math::

    \dot z = \dot x W + x\dot W + \dot b, \qquad u_i = H_{\text{GGN},i}\,\dot z_i, \qquad
    (g_x, g_W, g_b) = \big(uW^\top,\; x^\top u,\; \textstyle\sum_i u_i\big),

with :math:`H_{\text{GGN}}` the row kernel's :func:`_kernel.curvature_block`. Each row of
:math:`u` needs two whole-row numbers: the log-sum-exp and :math:`p\cdot(s'\odot\dot z)`. So the
schedule is the loss's: tokens in chunks, and within a chunk the vocabulary in blocks, twice.
Pass A folds each block's online-softmax statistics with :func:`_kernel.merge` and the
softmax-weighted tangent :func:`_kernel.tangent_sum`, rebased to the running max like the sum of
exponentials; pass B forms each block's :math:`z, \dot z` again, its :math:`u`, and accumulates
:math:`g_x \mathrel{+}= u_b W_b^\top`, :math:`g_{W_b} \mathrel{+}= x^\top u_b`. When the
vocabulary is one block, the two passes share the block (one pass of matmuls).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _kernel, _options
from jxent._head import _chunked, _linear, _tokens
from jxent._kernel import OptionDots
from jxent._loss import Reduction
from jxent._problem import Problem


@_options.suggests_misspellings
def linear_cross_entropy_ggn_vector_product(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    tangents: tuple[ArrayLike | None, ArrayLike | None, ArrayLike | None],
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
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    r"""The GGN product of :func:`jxent.linear_cross_entropy` w.r.t. ``(x, w, bias)``, chunked.

    For the language-model head :math:`z = xW + b` and ``tangents`` :math:`(\dot x, \dot W,
    \dot b)`:

    .. math::

        \dot z = \dot x W + x \dot W + \dot b, \qquad u = H_{\text{GGN}}\,\dot z, \qquad
        (g_x, g_W, g_b) = \big(u W^\top,\ x^\top u,\ \textstyle\sum_i u_i\big),

    where :math:`H_{\text{GGN}}` is the per-token positive semi-definite logits curvature of
    :func:`jxent.logits_hvp` with ``curvature="ggn"`` (:math:`T(\operatorname{diag}(p) - pp^\top)
    + 2z\,pp^\top`, the soft cap as part of the model). Equal to
    ``jxent.ggn_vector_product`` of ``lambda p, _: p[0] @ p[1] + p[2]`` on ``(x, w, bias)`` with
    every option, but the logits and their tangents exist only as ``[chunk_size,
    vocab_block_size]`` blocks: two passes over the vocabulary per chunk of tokens, the first for
    the log-sum-exp and :math:`p\cdot\dot z`, the second for :math:`u` and the products.

    It is the head's part of a language model's GGN product: with the body's hidden states
    :math:`x = f(\theta, \text{tokens})`, pass :math:`\dot x = J_f\dot\theta` (``jax.jvp`` or
    ``jax.linearize`` of the body) and pull :math:`g_x` back through the body (its ``jax.vjp``),
    adding :math:`g_W, g_b` for the head's own parameters (docs/second-order.md: a transformer).
    ``reduction="none"`` gives the product for the sum of the per-token losses.

    Args:
        x: Hidden states ``[N, D]``.
        w: Output projection ``[D, L]``.
        labels: Integer class indices ``[N]`` or probabilities ``[N, L]``.
        tangents: ``(x_dot, w_dot, b_dot)`` shaped like ``x``, ``w`` and ``bias``; any may be
            ``None`` (zero), ``b_dot`` must be ``None`` without a ``bias``.
        bias: Optional ``[L]``.
        chunk_size: Tokens per chunk (default as :func:`jxent.linear_cross_entropy`).
        vocab_block_size: Classes per block (default as :func:`jxent.linear_cross_entropy`).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weights: Per-class weights ``[L]``.
        where: Boolean mask ``[N]`` of tokens that count.
        ignore_index: Label value of tokens that do not count.
        label_smoothing: As in :func:`jxent.loss_and_logits_grad`.
        z_loss: As in :func:`jxent.loss_and_logits_grad`.
        logit_softcap: As in :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``(g_x, g_w, g_b)`` in the dtypes of ``x``, ``w`` and ``bias`` (accumulated in float32
        for bf16/float16 inputs); ``g_b`` is ``None`` without a ``bias``.

    Raises:
        TypeError: As :func:`jxent.linear_cross_entropy`; ``tangents`` not a triple, or a
            non-floating tangent.
        ValueError: As :func:`jxent.linear_cross_entropy`; a tangent whose shape differs from
            its primal's; ``b_dot`` without a ``bias``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> x, w = jnp.ones((3, 4)), jnp.zeros((4, 5))
        >>> gx, gw, gb = jxent.linear_cross_entropy_ggn_vector_product(
        ...     x, w, jnp.array([0, 1, 2]), (None, jnp.ones((4, 5)), None))
        >>> print(gx.shape, gw.shape, gb)
        (3, 4) (4, 5) None

    References:
        Schraudolph 2002 (Gauss-Newton products); Martens 2020 (GGN and Fisher); Liger Kernel
        and Wijmans et al. 2024 (chunked linear cross-entropy).
    """
    function = "linear_cross_entropy_ggn_vector_product"
    options = {"reduction": reduction, "weights": weights, "ignore_index": ignore_index}
    options |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    options |= {"logit_softcap": logit_softcap}
    head, problem = _linear.prepare(function, x, w, labels, bias, where, options)
    head_dot = _check_tangents(tangents, head, bias is not None)
    num_classes = problem.config.num_classes
    sched = _chunked.schedule(head.x.shape[0], num_classes, chunk_size, vocab_block_size)
    gx, gw, gb = _ggn_fn(sched)(head, problem, head_dot)
    return gx, gw, gb if bias is not None else None


def _check_tangents(tangents: Any, head: _linear.Head, has_bias: bool) -> _linear.Head:
    """The tangents as a :class:`~jxent._head._linear.Head` (None where zero), checked."""
    if not (isinstance(tangents, (tuple, list)) and len(tangents) == 3):
        raise TypeError(
            "tangents must be a triple (x_dot, w_dot, b_dot) (None for a zero tangent), found "
            f"{type(tangents).__name__}"
            + (f" of {len(tangents)}" if isinstance(tangents, (tuple, list)) else "")
        )
    out = []
    for name, dot, primal in zip(("x_dot", "w_dot", "b_dot"), tangents, head, strict=True):
        if dot is None:
            out.append(None)
            continue
        if name == "b_dot" and not has_bias:
            raise ValueError("b_dot must be None when there is no bias (pass bias= for its GGN)")
        dot = jnp.asarray(dot)
        if not jnp.issubdtype(dot.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, found {dot.dtype}")
        if dot.shape != primal.shape:
            raise ValueError(f"{name} must have shape {primal.shape}, found {dot.shape}")
        out.append(dot)
    return _linear.Head(*out)


@functools.lru_cache(maxsize=64)
def _ggn_fn(sched: _chunked.Schedule) -> Any:
    def run(head: _linear.Head, problem: Problem, head_dot: _linear.Head) -> tuple:
        scales = problem.row_scales()[:2]
        dots = _linear.Dots(head_dot, OptionDots())
        dot_roles = _linear.Dots(_linear.roles_of(head_dot, _linear.HEAD_ROLES), OptionDots())
        gx, gw, gb = _tokens.over_tokens(
            functools.partial(_scan, sched),
            (head, problem, scales, dots),
            (_linear.HEAD_ROLES, problem.roles(), ("T", "T"), dot_roles),
            ("T.", ".V", "V"),
        )
        return gx.astype(head.x.dtype), gw.astype(head.w.dtype), gb.astype(head.bias.dtype)

    return jax.jit(run)


def _scan(
    sched: _chunked.Schedule,
    head: _linear.Head,
    problem: Problem,
    scales: tuple[jax.Array, jax.Array],
    dots: _linear.Dots,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(g_x, g_W, g_b)`` of this device's tokens: two passes over the blocks per chunk."""
    config, x, w = problem.config, head.x, head.w
    dim, num_classes = w.shape
    acc = _chunked.accumulation_dtype(x, w)
    ctx = _linear.Pass(sched, head, problem, dots, 0)

    def body(sums: dict, c: _linear.Chunk, scan_zero: jax.Array) -> tuple[dict, jax.Array]:
        rows = c.rows

        def pass_a(state: tuple, start: Any, size: int) -> tuple:
            st, tan = state
            blk, target, _, logits_dot = _linear.block(ctx, c, rows, start, size, dot=True)
            new = _kernel.merge(st, _kernel.block_stats(blk.s, target))
            tan = _kernel.rebase_sum(tan, st.m, new.m)
            return new, tan + _kernel.tangent_sum(blk.s, blk.ds, new.m, logits_dot)

        zeros = jnp.zeros(rows.counted.shape, acc)
        init = (_kernel.Stats(zeros - jnp.inf, zeros, zeros, zeros), zeros)
        st, tan = _chunked.over_blocks(pass_a, init, num_classes, sched.block, scan_zero)
        empty = _kernel.finish(st)[2]
        rows = rows._replace(bad=rows.bad | (rows.counted & empty))
        p_dot = tan / jnp.where(rows.counted & ~empty, st.se, 1.0)

        x = _linear.counted_only(c.x, rows)  # x^T u: NaN padding must not reach the W part

        def pass_b(g: dict, start: Any, size: int) -> dict:
            blk, target, options, logits_dot = _linear.block(ctx, c, rows, start, size, dot=True)
            u = _kernel.curvature_block(
                config,
                rows,
                options,
                blk.s,
                blk.ds,
                target,
                st,
                c.ce_weight,
                c.z_weight,
                logits_dot,
                p_dot,
                ggn=True,
            )
            return {  # u in the accumulation dtype, as G in the loss's gradient pass
                "gx": g["gx"] + _chunked.matmul(u, blk.w.T, acc),
                "gw": _chunked.add_columns(g["gw"], _chunked.matmul(x.T, u, acc), start, 1),
                "gb": _chunked.add_columns(g["gb"], jnp.sum(u, axis=0), start, 0),
            }

        init = {"gx": jnp.zeros(c.x.shape, acc), **sums}
        g = _chunked.over_blocks(pass_b, init, num_classes, sched.block, scan_zero)
        return {"gw": g["gw"], "gb": g["gb"]}, g["gx"]

    chunks = _linear.chunks_of(head, problem, scales, dots)
    sums = {"gw": jnp.zeros((dim, num_classes), acc), "gb": jnp.zeros((num_classes,), acc)}
    sums, gx = _chunked.scan_tokens(body, sums, chunks, sched.chunk)
    return gx, sums["gw"], sums["gb"]
