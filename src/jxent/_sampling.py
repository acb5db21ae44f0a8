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
from jax import lax
from jax.typing import ArrayLike

from jxent import _linear, _options, _validate

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
    float32 or wider.

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
    labels = jax.random.categorical(key, s, axis=-1).astype(jnp.int32)
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
    not draw by draw. Deterministic for a given key and schedule. A token with a NaN logit gets
    label -1, as in :func:`sample_labels`.

    Args:
        key: PRNG key.
        x: Hidden states ``[N, D]``.
        w: Output projection ``[D, L]``.
        bias: Optional ``[L]``.
        chunk_size: Tokens per chunk (default as :func:`jxent.linear_cross_entropy`).
        vocab_block_size: Classes per block (default 2048).
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
    num_tokens, num_classes = _linear._check_shapes(x, w, bias)
    _options.check_softcap(logit_softcap)
    b = jnp.zeros((num_classes,), w.dtype) if bias is None else jnp.asarray(bias)
    sched = _linear.schedule(num_tokens, num_classes, chunk_size, vocab_block_size)
    return _linear_sampler(sched, None if logit_softcap is None else float(logit_softcap))(
        key, x, w, b
    )


@functools.lru_cache(maxsize=64)
def _linear_sampler(sched: _linear._Schedule, logit_softcap: float | None) -> Any:
    def run(key: jax.Array, x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        num_tokens = x.shape[0]
        num_classes = w.shape[1]
        acc = _linear.accumulation_dtype(x, w)
        chunk = sched.chunk
        chunks = -(-num_tokens // chunk)
        xs = jnp.pad(x, [(0, chunks * chunk - num_tokens), (0, 0)])
        xs = xs.reshape(chunks, chunk, x.shape[1])  # explicit: -1 fails for no tokens
        block = min(sched.block, num_classes)
        full_blocks, rest = divmod(num_classes, block)

        def body(_: None, inputs: tuple) -> tuple[None, jax.Array]:
            x_c, index = inputs
            chunk_key = jax.random.fold_in(key, index)

            def step(best: tuple, start: Any, size: int) -> tuple:
                w_b = lax.dynamic_slice_in_dim(w, start, size, axis=1)
                z = jnp.dot(x_c, w_b, preferred_element_type=acc)
                z = z + lax.dynamic_slice_in_dim(b, start, size).astype(acc)[None, :]
                noise = jax.random.gumbel(jax.random.fold_in(chunk_key, start), z.shape, acc)
                score = _capped(z, logit_softcap) + noise
                value = jnp.max(score, axis=1)
                where = (jnp.argmax(score, axis=1) + start).astype(jnp.int32)  # int32 under x64
                better = value > best[0]
                nan = best[2] | jnp.any(jnp.isnan(score), axis=1)
                return jnp.where(better, value, best[0]), jnp.where(better, where, best[1]), nan

            best = (
                jnp.full((chunk,), NEG_INF, acc),
                jnp.zeros((chunk,), jnp.int32),
                jnp.zeros((chunk,), bool),
            )
            go = lambda j, c: step(c, j * block, block)  # noqa: E731
            best = lax.fori_loop(0, full_blocks, go, best)
            if rest:
                best = step(best, full_blocks * block, rest)
            return None, jnp.where(best[2], -1, best[1])

        _, labels = lax.scan(body, None, (xs, jnp.arange(chunks)))
        return labels.reshape(-1)[:num_tokens]

    return jax.jit(run)
