r"""Labels drawn from the model's own predictive distribution, with and without the logits.

Sophia-G's Gauss-Newton-Bartlett estimator and Monte-Carlo Fisher estimates need
:math:`\hat y \sim \operatorname{softmax}(s)` for the model's (soft-capped, masked) scores
:math:`s`. :func:`sample_labels` draws from materialised logits; :func:`linear_sample_labels`
draws from :math:`\operatorname{softmax}(xW + b)` with the Gumbel-max trick carried block by
block through the same chunked schedule as :func:`jxent.linear_cross_entropy`:
:math:`\hat y = \arg\max_l (s_l + g_l)`, :math:`g_l` i.i.d. standard Gumbel, and the argmax of a
union of blocks is the better of the blocks' argmaxes -- so no ``[N, L]`` buffer exists.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _head, _options, _validate

NEG_INF = -jnp.inf


def _capped(x: jax.Array, logit_softcap: float | None) -> jax.Array:
    """``c tanh(x / c)``, ``-inf`` kept (the loss's cap, ``_kernel.cap``)."""
    if logit_softcap is None:
        return x
    c = logit_softcap
    return jnp.where(x == NEG_INF, NEG_INF, c * jnp.tanh(x / c))


def sample_labels(
    key: jax.Array,
    logits: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    r"""Class indices drawn from the model: :math:`\hat y_i \sim \operatorname{softmax}(s_i)`.

    :math:`s = c\tanh(x/c)` with ``logit_softcap`` :math:`c` (else the logits), exactly the
    distribution the loss's softmax uses. Classes masked by a per-logit ``where`` (or with a
    ``-inf`` logit) are never drawn; a per-example ``where`` does not change the distribution
    (the loss then ignores those examples). An example with no class left gets label 0, which a
    loss with the same ``where`` does not count. An example with a NaN score (in a class that is
    not masked) has no distribution and gets label -1, which the loss refuses (eagerly) or turns
    into NaN (under ``jit``). Drawn with ``jax.random.categorical`` (the Gumbel-max trick) in
    float32 or wider, with ``mode="high"`` noise so that classes far below the top are drawn in
    proportion (see ``_gumbel``).

    Args:
        key: PRNG key.
        logits: Floating scores, classes along ``axis``.
        axis: The class axis, or a tuple of axes (labels then index the flattened classes, as the
            loss's integer labels do).
        where: Optional boolean mask, per example or per logit, as in the loss.
        logit_softcap: The loss's soft cap, or None.

    Returns:
        ``int32`` labels with the logits' shape without the class axes.

    Raises:
        TypeError: Non-floating logits, a non-boolean ``where``.
        ValueError: Bad axes or ``where`` shape, a non-positive ``logit_softcap``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> logits = jnp.array([[0.0, -jnp.inf, 0.0], [5.0, 0.0, 0.0]])
        >>> jxent.sample_labels(jax.random.key(0), logits).shape
        (2,)

    References:
        Gumbel 1954; Maddison et al. 2014 ("A* sampling": the Gumbel-max trick); Liu et al.
        2023 (Sophia: labels sampled from the model).
    """
    logits = jnp.asarray(logits)
    layout = _validate.check_logits(logits, axis)
    _, class_mask = _validate.check_where(where, logits.shape, layout)
    _options.check_softcap(logit_softcap)
    x = layout.to_rows(logits).astype(jnp.promote_types(logits.dtype, jnp.float32))
    return _sample_rows(key, x, class_mask, logit_softcap).reshape(layout.batch_shape)


@functools.partial(jax.jit, static_argnums=3)
def _sample_rows(key, x, class_mask, logit_softcap):
    s = _capped(x, logit_softcap)
    if class_mask is not None:
        s = jnp.where(class_mask, s, NEG_INF)
    labels = jax.random.categorical(key, s, axis=-1, mode="high").astype(jnp.int32)
    return jnp.where(jnp.any(jnp.isnan(s), axis=-1), -1, labels)  # no distribution: no label


def linear_sample_labels(
    key: jax.Array,
    x: ArrayLike,
    w: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    r"""Labels :math:`\hat y_i \sim \operatorname{softmax}(s(x_i W + b))`, without the logits.

    The Gumbel-max trick over the chunked schedule of :func:`jxent.linear_cross_entropy`: for
    each chunk of tokens and each block of classes, the block's logits, their soft cap and fresh
    standard Gumbel noise :math:`g` give the block's best :math:`s_l + g_l`; the running best
    over blocks is the draw. Buffers are ``[chunk_size, vocab_block_size]``. The noise differs
    from :func:`sample_labels`'s (other shapes, other keys), so the two agree in distribution,
    not draw by draw. Deterministic for a given key and ``vocab_block_size``: the same draw
    for any ``chunk_size`` and any sharding of the tokens (one key per token). A token with a
    NaN logit gets label -1, as in :func:`sample_labels`.

    Args:
        key: PRNG key.
        x: Hidden states ``[N, D]``.
        w: Output projection ``[D, L]``.
        bias: Optional ``[L]``.
        chunk_size: Tokens per chunk (default as :func:`jxent.linear_cross_entropy`).
        vocab_block_size: Classes per block (default as :func:`jxent.linear_cross_entropy`).
        logit_softcap: The loss's soft cap, or None.

    Returns:
        ``int32 [N]``.

    Raises:
        TypeError, ValueError: As :func:`jxent.linear_cross_entropy` for ``x``, ``w``, ``bias``,
            the schedule and ``logit_softcap``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> y = jxent.linear_sample_labels(jax.random.key(0), jnp.ones((3, 4)), jnp.zeros((4, 5)))
        >>> y.shape, y.dtype
        ((3,), dtype('int32'))
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    num_tokens, num_classes = _head.check_shapes(x, w, bias)
    _options.check_softcap(logit_softcap)
    b = jnp.zeros((num_classes,), w.dtype) if bias is None else jnp.asarray(bias)
    sched = _head.schedule(num_tokens, num_classes, chunk_size, vocab_block_size)
    cap = None if logit_softcap is None else float(logit_softcap)
    impl = str(jax.random.key_impl(key))
    return _linear_sampler(sched, cap, impl)(jax.random.key_data(key), x, w, b)


@functools.lru_cache(maxsize=64)
def _linear_sampler(sched: _head.Schedule, logit_softcap: float | None, impl: str) -> Any:
    def run(key_data: jax.Array, x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        tokens = jnp.arange(x.shape[0], dtype=jnp.int32)  # sharded like x: global positions
        scan = functools.partial(_draw, sched, logit_softcap, impl)
        roles = ("." * key_data.ndim, "T.", ".V", "V", "T")
        return _head.over_tokens(scan, (key_data, x, w, b, tokens), roles, "T")

    return jax.jit(run)


def _draw(
    sched: _head.Schedule,
    logit_softcap: float | None,
    impl: str,
    key_data: jax.Array,
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    tokens: jax.Array,
) -> jax.Array:
    """The Gumbel-max draw of this device's tokens, block by block (a running best)."""
    key = jax.random.wrap_key_data(key_data, impl=impl)
    acc = _head.accumulation_dtype(x, w)

    def body(_: None, c: tuple, scan_zero: jax.Array) -> tuple[None, jax.Array]:
        x_c, token = c
        # One key per token (its global position): the draw does not depend on chunk_size
        # or on how the tokens are sharded.
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, token)

        def step(best: tuple, start: Any, size: int) -> tuple:
            z = _head.block_logits(None, x_c, w, b, start, size).logits
            noise = jax.vmap(lambda k: _gumbel(jax.random.fold_in(k, start), size, acc))(keys)
            score = _capped(z, logit_softcap) + noise
            value = jnp.max(score, axis=1)
            where = (jnp.argmax(score, axis=1) + start).astype(jnp.int32)  # int32 under x64
            better = value > best[0]
            nan = best[2] | jnp.any(jnp.isnan(score), axis=1)
            return jnp.where(better, value, best[0]), jnp.where(better, where, best[1]), nan

        rows = x_c.shape[0]
        best = (jnp.full((rows,), NEG_INF, acc), jnp.zeros((rows,), jnp.int32))
        best = _head.over_blocks(
            step, (*best, jnp.zeros((rows,), bool)), w.shape[1], sched.block, scan_zero
        )
        return None, jnp.where(best[2], -1, best[1])

    return _head.scan_tokens(body, None, (x, tokens), sched.chunk)[1]


def _gumbel(key: jax.Array, size: int, dtype: Any) -> jax.Array:
    r"""Standard Gumbel noise whose tail reaches the classes far below the top.

    The default (``mode="low"``) noise :math:`-\log(-\log u)` of a float32 uniform ``u`` stops
    near 16 (``u`` comes no closer to 0 than ``2^-23``), so a class about 15 nats below the top
    is drawn too rarely -- and a large vocabulary puts real mass there (65,535 classes at -15
    hold 2 %). ``mode="high"`` builds ``u`` from two uniforms (about ``2^-46``: noise to ~32).
    """
    return jax.random.gumbel(key, (size,), dtype, mode="high")
