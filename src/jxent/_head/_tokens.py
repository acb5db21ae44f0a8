r"""Each device scans its own tokens: the chunked head, sharded like the batch.

The chunked computations of the linear head (``_chunked``) are, across tokens, a map followed
by a sum: per-token outputs (losses, ``dx``, sampled labels) stay with their tokens, and
parameter gradients (``dW``, ``db``) are sums over tokens. So with the tokens sharded over mesh
axes, each device runs the whole chunked loop on its own tokens and the sums are ``psum``-ed
once at the end -- the per-device work is ``N/d`` tokens and nothing token-sized moves. This
module finds the tokens' sharding and runs a function that way:

- **Explicit mesh axes** (``jax.make_mesh``'s default; sharding in types): the sharding is read
  from ``jax.typeof(x)`` and the function runs under ``jax.shard_map``; inputs not laid out as
  needed are resharded (``jax.sharding.reshard``: ``W`` sharded FSDP-style is gathered once).
- **Auto mesh axes** (``Mesh(...)``; under ``jit`` the tracer does not know its sharding): a
  ``custom_partitioning`` rule, which XLA's partitioner calls with the inputs' shardings, runs
  the function on each device's tokens. ``jax.vmap`` of it is the same rule over the vmapped
  function (``custom_vmap``: each device keeps its tokens); ``jax.jvp`` of it runs the function
  unpartitioned (``custom_jvp``), as XLA would without the rule, so that its tangent map stays
  transposable. Inside the user's ``shard_map`` the rule stands aside.
- **No mesh**: the function runs as it is (the same program as without this module).

Each argument and output is described by a *role*, one character per dimension: ``"T"`` the
tokens, ``"V"`` the vocabulary (sharded over the vocab-parallel axis, if any), ``"."`` neither.
Outputs without a ``"T"`` are sums over tokens and get ``psum``-ed over the token axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Roles = Any  # a pytree of role strings, matching the arguments or outputs


def spec(role: str, token_axes: Sequence[str], vocab_axis: str | None) -> PartitionSpec:
    """The ``PartitionSpec`` of a value with this role."""
    tokens = tuple(token_axes) or None
    if tokens is not None and len(tokens) == 1:
        tokens = tokens[0]
    names = {"T": tokens, "V": vocab_axis, ".": None}
    return PartitionSpec(*(names[c] for c in role))


def _specs(roles: Roles, token_axes: Sequence[str], vocab_axis: str | None) -> Any:
    return jax.tree.map(lambda r: spec(r, token_axes, vocab_axis), roles)


def _reduce_over_tokens(outputs: Any, roles: Roles, token_axes: Sequence[str]) -> Any:
    """``psum`` over the token axes of every output that is a sum over tokens."""
    if not token_axes:
        return outputs
    axes = tuple(token_axes)
    return jax.tree.map(lambda v, r: v if "T" in r else jax.lax.psum(v, axes), outputs, roles)


def explicit_token_axes(x: jax.Array) -> tuple[str, ...]:
    """The Explicit mesh axes that shard ``x``'s first (token) dimension under ``jit`` or not."""
    sharding = jax.typeof(x).sharding
    spec0 = sharding.spec[0] if len(sharding.spec) else None
    if spec0 is None:
        return ()
    return (spec0,) if isinstance(spec0, str) else tuple(spec0)


def vocab_parallel_token_axes(x: jax.Array, mesh: Any, vocab_axis: str) -> tuple[str, ...]:
    """The axes that shard the tokens beside the vocabulary.

    Those of an Explicit ``x``, else every other axis of ``mesh`` of size > 1 when their sizes
    divide ``N`` (else none).
    """
    axes = explicit_token_axes(x)
    if axes:
        return axes
    others = tuple(a for a in mesh.axis_names if a != vocab_axis and mesh.shape[a] > 1)
    return others if x.shape[0] % math.prod(mesh.shape[a] for a in others) == 0 else ()


def _explicit_mesh(leaves: list) -> Any:
    """The mesh of the first leaf whose type carries Explicit mesh axes, or None."""
    for v in leaves:
        mesh = jax.typeof(v).sharding.mesh
        if not mesh.empty and any(t == AxisType.Explicit for t in mesh.axis_types):
            return mesh
    return None


def _has_auto_axes(x: jax.Array) -> bool:
    """Auto axes to partition over, outside any ``shard_map``.

    Inside the user's ``shard_map`` (manual axes in the context) the tokens are already the
    device's own; the Auto axes it leaves (partial-manual) are XLA's to partition: the
    partitioning rule, which reads whole-mesh shardings, does not run there.
    """
    if jax.sharding.get_abstract_mesh().manual_axes:
        return False
    mesh = jax.typeof(x).sharding.mesh
    return not mesh.empty and any(t == AxisType.Auto for t in mesh.axis_types) and mesh.size > 1


def shard_map_over(
    fn: Callable[..., Any],
    args: tuple,
    in_roles: Roles,
    out_roles: Roles,
    mesh: Any,
    token_axes: Sequence[str],
    vocab_axis: str | None = None,
) -> Any:
    """``fn(*args)`` under ``jax.shard_map``: tokens over ``token_axes``, classes ``vocab_axis``.

    Inputs are first laid out as their roles say (a no-op where they are).
    """
    in_specs = _specs(in_roles, token_axes, vocab_axis)
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        args = jax.tree.map(
            lambda v, s: jax.sharding.reshard(v, NamedSharding(mesh, s)), args, in_specs
        )

    def local(*args: Any) -> Any:
        return _reduce_over_tokens(fn(*args), out_roles, token_axes)

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=_specs(out_roles, token_axes, vocab_axis),
        check_vma=False,
    )
    return mapped(*args)


def over_tokens(
    fn: Callable[..., Any],
    args: tuple,
    in_roles: Roles,
    out_roles: Roles,
    *,
    transposable: bool = False,
) -> Any:
    """``fn(*args)``, each device running it on its own tokens when they are sharded.

    ``args`` is a tuple of pytrees (``None`` leaves allowed) described by ``in_roles``. On an
    Explicit mesh the first per-token leaf sharded over its token axis decides the axes (``x``,
    else the labels or mask), and every input is laid out as its role says -- a replicated
    ``x`` beside sharded labels is sliced, a feature-sharded ``x`` gathered -- so ``fn`` always
    sees whole rows. On an Auto mesh the first per-token leaf (``x``) decides. ``fn`` must treat
    tokens independently; outputs without a ``"T"`` in ``out_roles`` must be sums over tokens.
    ``transposable``: the result must be linear-transposable (a tangent map JAX transposes for
    reverse mode), which the Auto-axes rule is not: there XLA partitions ``fn`` by itself.
    """
    leaves, roles = jax.tree.leaves(args), jax.tree.leaves(in_roles)
    per_token = [v for v, r in zip(leaves, roles, strict=True) if r.startswith("T")]
    mesh = _explicit_mesh(leaves)
    if mesh is not None:
        axes = next((a for a in map(explicit_token_axes, per_token) if a), ())
        return shard_map_over(fn, args, in_roles, out_roles, mesh, axes)
    x = per_token[0]
    if _has_auto_axes(x) and not transposable:
        return _auto_partitioned(fn, args, in_roles, out_roles)
    return fn(*args)


def _auto_partitioned(fn: Callable[..., Any], args: tuple, in_roles: Roles, out_roles: Roles):
    """``fn`` under a ``custom_partitioning`` rule that shards it like the tokens of ``x``."""
    flat, tree = jax.tree.flatten(args)
    in_flat = jax.tree.leaves(in_roles)
    out_tree = jax.tree.structure(out_roles)
    out_flat = jax.tree.leaves(out_roles)

    def plain(*flat: jax.Array) -> list[jax.Array]:
        return jax.tree.leaves(fn(*jax.tree.unflatten(tree, flat)))

    partitioned = _rule(plain, tuple(in_flat), tuple(out_flat))
    return jax.tree.unflatten(out_tree, partitioned(*flat))


def _rule(plain: Callable[..., list], in_roles: tuple, out_roles: tuple) -> Callable[..., list]:
    def tokens_of(mesh: Any, arg_shapes: Any) -> tuple[str, ...]:
        first = next(i for i, r in enumerate(in_roles) if r.lstrip(".").startswith("T"))
        dim = in_roles[first].index("T")  # after the axes vmap added in front
        s = arg_shapes[first].sharding
        spec0 = s.spec[dim] if len(s.spec) > dim else None
        axes = () if spec0 is None else (spec0,) if isinstance(spec0, str) else tuple(spec0)
        shards = math.prod(mesh.shape[a] for a in axes)
        # Uneven shards would hand padding rows to the function: those stay replicated.
        return axes if arg_shapes[first].shape[dim] % shards == 0 else ()

    def shardings(mesh: Any, roles: tuple, axes: tuple) -> list:
        return [NamedSharding(mesh, spec(r, axes, None)) for r in roles]

    @custom_partitioning
    def cp(*flat: jax.Array) -> list[jax.Array]:
        return plain(*flat)

    def infer(mesh: Any, arg_shapes: Any, result_shape: Any) -> list:
        return shardings(mesh, out_roles, tokens_of(mesh, arg_shapes))

    def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> tuple:
        axes = tokens_of(mesh, arg_shapes)

        def lower(*flat: jax.Array) -> list[jax.Array]:
            return _reduce_over_tokens(plain(*flat), list(out_roles), axes)

        arg_shardings = tuple(shardings(mesh, in_roles, axes))
        return mesh, lower, shardings(mesh, out_roles, axes), arg_shardings

    cp.def_partition(
        infer_sharding_from_operands=infer,
        partition=partition,
        sharding_rule=_sharding_rule(in_roles, out_roles),
    )

    # vmap of the rule: the same rule over the vmapped function, each role with the mapped
    # axis in front (a stack of heads over sharded tokens keeps each device's tokens).
    @jax.custom_batching.custom_vmap
    def batchable(*flat: jax.Array) -> list[jax.Array]:
        return cp(*flat)

    @batchable.def_vmap
    def _(axis_size: int, in_batched: list[bool], *flat: jax.Array) -> tuple:
        axes = tuple(0 if b else None for b in in_batched)
        roles = tuple("." + r if b else r for r, b in zip(in_roles, in_batched, strict=True))

        def mapped(*flat: jax.Array) -> list[jax.Array]:
            return jax.vmap(plain, in_axes=axes)(*flat)

        batched = _rule(mapped, roles, tuple("." + r for r in out_roles))
        return batched(*flat), [True] * len(out_roles)

    # jvp of the rule: the plain function (what XLA partitions by itself), whose tangent map
    # JAX can transpose (reverse over reverse); forward over reverse gathers the tokens.

    @jax.custom_jvp
    def differentiable(*flat: jax.Array) -> list[jax.Array]:
        return batchable(*flat)

    differentiable.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
    return differentiable


def _sharding_rule(in_roles: tuple, out_roles: tuple) -> str:
    """Shardy's einsum-like rule: one factor ``n`` for tokens, a factor of its own elsewhere."""
    count = iter(range(10**6))

    def factors(role: str) -> str:
        if not role:
            return ""  # a scalar
        return " ".join("n" if c == "T" else f"f{next(count)}" for c in role)

    ins = ", ".join(factors(r) for r in in_roles)
    return f"{ins} -> {', '.join(factors(r) for r in out_roles)}"
