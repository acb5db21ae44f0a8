r"""The one chunk schedule of the linear head: tokens in chunks, the vocabulary in blocks.

Every computation of the head :math:`z = xW + b` that never forms the ``[N, L]`` logits -- the
loss and its derivative (``_linear``), its Gauss-Newton product (``_linear_ggn``) and label
sampling (``_sampling``), on one device or one vocabulary shard -- is the same loop: a
``lax.scan`` over chunks of tokens and, inside a chunk, one or more passes over blocks of the
vocabulary. This module owns that loop (:func:`scan_tokens`, :func:`over_blocks`) and the
block's logits (:func:`block_logits`); each caller gives only its pass bodies. Spreading the
tokens over devices is ``_tokens``' job, around the whole loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from jxent import _kernel
from jxent._options import Config

# The scratch budget of one pass per chunk: where a chunk of at least 256 tokens fits with the
# whole vocabulary in 2M float32 logits (8 MiB; about three such buffers are live: logits, their
# exponentials, G), the chunk's logits are formed once for the loss, dx and dW (6NDL FLOPs).
# Measured on a 2-core CPU at N2048 D512 L8192: 0.89x the materialised loss (blocks: 1.02x).
# Past it, vocabulary blocks of 1024 with the online softmax (8NDL), in chunks whose block stays
# near 4M elements (16 MiB): at L65536 blocks of 1024 ran 0.94-0.95x the materialised loss and
# blocks of 2048 1.01x (docs/large-vocabularies.md, "Schedule").
_ONE_PASS_ELEMENTS = 2**21
_MIN_ONE_PASS_CHUNK = 256
_CHUNK_ELEMENTS = 2**22
_VOCAB_BLOCK = 1024
_MAX_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The loop's static shape.

    Attributes:
        chunk: Tokens per scan step.
        block: Classes per vocabulary block (the last block may be smaller).
        vocab_axis: The mesh axis that shards the vocabulary (vocab-parallel), or None.
        mesh: The mesh of ``vocab_axis``, or None (inside the user's ``shard_map`` over it).
        token_axes: With ``vocab_axis``: the mesh axes that shard the tokens (``()``: none).
    """

    chunk: int
    block: int
    vocab_axis: str | None = None
    mesh: Mesh | None = None
    token_axes: tuple[str, ...] = ()

    @property
    def inside(self) -> bool:
        """Vocab-parallel inside the user's ``shard_map``: ``vocab_axis`` is already manual."""
        return self.vocab_axis is not None and self.mesh is None


def default_chunk_size(num_tokens: int, num_classes: int) -> int:
    """Tokens per chunk over vocabulary blocks: ``chunk * min(L, block)`` near 4M elements.

    Each chunk updates the whole dW once, so larger chunks mean fewer passes over it; the
    chunk's ``[chunk, block]`` logits stay 16 MiB (4096 tokens for blocks of 1024 classes).
    At most 4096 and at most ``N`` rounded up to a multiple of 8 (8 when there are no tokens).
    """
    chunk = 8
    while chunk < _MAX_CHUNK and 2 * chunk * min(num_classes, _VOCAB_BLOCK) <= _CHUNK_ELEMENTS:
        chunk *= 2
    return min(chunk, _token_cap(num_tokens))


def one_pass_chunk(num_tokens: int, num_classes: int) -> int | None:
    """Tokens per chunk of one pass over the whole vocabulary, or None past the budget.

    The largest power of two up to 4096 whose ``[chunk, L]`` float32 logits fit 8 MiB, when
    that is at least 256 tokens (or all of them); capped at ``N`` rounded up to 8.
    """
    chunk = _MAX_CHUNK
    while chunk > 8 and chunk * num_classes > _ONE_PASS_ELEMENTS:
        chunk //= 2
    chunk = min(chunk, _token_cap(num_tokens))
    fits = chunk * num_classes <= _ONE_PASS_ELEMENTS
    return chunk if fits and chunk >= min(_MIN_ONE_PASS_CHUNK, _token_cap(num_tokens)) else None


def _token_cap(num_tokens: int) -> int:
    return max(8, -(-num_tokens // 8) * 8)  # 8 for no tokens: an empty scan


def schedule(
    num_tokens: int,
    num_classes: int,
    chunk_size: int | None,
    vocab_block_size: int | None,
    **sharding: Any,
) -> Schedule:
    """The schedule for these sizes: the defaults for None, else positive ints (0 is no default).

    By default one pass per chunk over the whole vocabulary where it fits the scratch budget
    (:func:`one_pass_chunk`), else vocabulary blocks of 1024 (:func:`default_chunk_size`).
    A given ``chunk_size`` keeps one pass when its ``[chunk, L]`` fits the budget; a given
    ``vocab_block_size`` is used as it is. ``num_tokens`` and ``num_classes`` are what one
    device scans (its shard's share). ``sharding``: the vocab-parallel fields of
    :class:`Schedule`.
    """
    for name, v in (("chunk_size", chunk_size), ("vocab_block_size", vocab_block_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, found {v!r}")
    if vocab_block_size is None and chunk_size is None:
        chunk = one_pass_chunk(num_tokens, num_classes)
        if chunk is not None:
            return Schedule(chunk=chunk, block=num_classes, **sharding)
    if vocab_block_size is None and chunk_size is not None:
        one_pass = min(chunk_size, _token_cap(num_tokens)) * num_classes <= _ONE_PASS_ELEMENTS
        vocab_block_size = num_classes if one_pass else _VOCAB_BLOCK
    return Schedule(
        chunk=default_chunk_size(num_tokens, num_classes) if chunk_size is None else chunk_size,
        block=_VOCAB_BLOCK if vocab_block_size is None else vocab_block_size,
        **sharding,
    )


def accumulation_dtype(x: jax.Array, w: jax.Array) -> Any:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 ones."""
    return jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)


def scan_tokens(
    body: Callable[[Any, Any, jax.Array], tuple[Any, Any]],
    carry: Any,
    per_token: Any,
    chunk: int,
) -> tuple[Any, Any]:
    """``lax.scan`` of ``body(carry, chunk, scan_zero) -> (carry, outputs)`` over chunks.

    ``per_token`` is a pytree of arrays with the tokens along axis 0 (``None`` leaves allowed);
    each step sees ``chunk`` of them (the last chunk zero-padded: bodies mask padded tokens
    through their ``counted`` rows). ``scan_zero`` is an int32 zero that comes from the scanned
    inputs: add it to block offsets (:func:`over_blocks` does), or JAX's partial evaluation
    sees them as loop-invariant and, under ``jax.grad``, hoists every block of ``W`` out of the
    token loop and stacks them -- a copy of ``W`` or more. Outputs come back ``[N, ...]``.
    ``chunk`` is capped at ``N`` rounded up to 8 (a device's share of sharded tokens).
    """
    num_tokens = jax.tree.leaves(per_token)[0].shape[0]
    # This device's tokens may be fewer than the schedule was made for (tokens sharded).
    chunk = min(chunk, max(8, -(-num_tokens // 8) * 8))
    chunks = -(-num_tokens // chunk)
    pad = chunks * chunk - num_tokens

    def split(v: jax.Array) -> jax.Array:
        v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
        return v.reshape((chunks, chunk, *v.shape[1:]))  # explicit: -1 fails for no tokens

    def step(carry: Any, inputs: tuple) -> tuple[Any, Any]:
        c, scan_zero = inputs
        return body(carry, c, scan_zero)

    xs = (jax.tree.map(split, per_token), jnp.zeros((chunks,), jnp.int32))
    if chunks and _manual_axes():
        first = jax.tree.map(lambda v: v[0], xs)
        carry = match_varying(carry, jax.eval_shape(lambda c: step(c, first)[0], carry))
    carry, outs = lax.scan(step, carry, xs)
    return carry, jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:])[:num_tokens], outs)


def over_blocks(
    step: Callable[[Any, Any, int], Any], carry: Any, num_classes: int, block: int, scan_zero: Any
) -> Any:
    """Folds ``step(carry, start, size)`` over the blocks of ``num_classes`` columns.

    Full blocks run in a ``fori_loop``, the ragged last one after it; a vocabulary of one block
    runs without a loop, so that two passes over it share its logits (XLA sees both).
    """
    block = min(block, num_classes)
    full, rest = divmod(num_classes, block)
    if full == 1 and not rest:
        return step(carry, scan_zero, block)
    if _manual_axes():
        carry = match_varying(carry, jax.eval_shape(lambda c: step(c, scan_zero, block), carry))
    carry = lax.fori_loop(0, full, lambda j, c: step(c, j * block + scan_zero, block), carry)
    return step(carry, full * block + scan_zero, rest) if rest else carry


def _manual_axes() -> bool:
    """Inside the user's ``shard_map`` (manual mesh axes in the context)."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def _varying(a: Any) -> frozenset:
    kind = a if isinstance(a, jax.ShapeDtypeStruct) else jax.typeof(a)
    mat = getattr(kind, "manual_axis_type", None)
    return frozenset() if mat is None else frozenset(mat.varying)


def match_varying(carry: Any, out: Any) -> Any:
    """The loop's initial ``carry`` typed as varying wherever the body's output ``out`` is.

    Inside ``shard_map`` (``check_vma=True``) a value computed from a device's own tokens
    varies over the manual axes, a zero does not, and a loop's carry must keep one type: so
    the zeros a loop starts from are cast to varying (``lax.pcast``) over the axes its body's
    result varies over.
    """

    def one(c: jax.Array, o: Any) -> jax.Array:
        missing = tuple(sorted(_varying(o) - _varying(c)))
        return lax.pcast(c, missing, to="varying") if missing else c

    return jax.tree.map(one, carry, out)


class Block(NamedTuple):
    """One vocabulary block of one chunk: columns ``[start, start + size)`` of the shard.

    Attributes:
        w: ``W[:, start:start + size]``.
        logits: The block's logits ``x W_b + b_b`` ``[chunk, size]``, accumulation dtype.
        s: Its scores: the logits soft-capped (``_kernel.cap``).
        ds: ``ds/dz``, or None without a cap.
    """

    w: jax.Array
    logits: jax.Array
    s: jax.Array
    ds: jax.Array | None


def block_logits(
    config: Config | None, x: jax.Array, w: jax.Array, bias: jax.Array, start: Any, size: int
) -> Block:
    """The block's logits and scores (``config`` None: no cap, as for a bare sampler)."""
    acc = accumulation_dtype(x, w)
    w_block = lax.dynamic_slice_in_dim(w, start, size, axis=1)
    logits = jnp.dot(x, w_block, preferred_element_type=acc)
    logits = logits + lax.dynamic_slice_in_dim(bias, start, size).astype(acc)[None, :]
    s, ds = (logits, None) if config is None else _kernel.cap(config, logits)
    return Block(w_block, logits, s, ds)


def matmul(a: jax.Array, b: jax.Array, acc: Any) -> jax.Array:
    """``a @ b`` accumulated in ``acc``; operands of two dtypes, or bf16 on CPU, go up to ``acc``.

    The gradient passes multiply the float32 ``G`` with bf16/float16 inputs: ``G`` is never
    rounded to the inputs' dtype (float16 would flush ``G / N`` to zero at large ``N``). XLA:CPU
    converts bf16 matmuls to float32 anyway, and its DotThunk cannot run some bf16 x bf16 -> f32
    products outside a loop ("Unsupported element type").
    """
    if a.dtype != b.dtype or (a.dtype != acc and jax.default_backend() == "cpu"):
        a, b = a.astype(acc), b.astype(acc)
    return jnp.dot(a, b, preferred_element_type=acc)


def add_columns(total: jax.Array, update: jax.Array, start: Any, axis: int) -> jax.Array:
    """``total[..., start:start + size] += update`` along ``axis`` (a block's share of dW)."""
    size = update.shape[axis]
    current = lax.dynamic_slice_in_dim(total, start, size, axis=axis)
    return lax.dynamic_update_slice_in_dim(total, current + update, start, axis=axis)
