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
  function (``custom_vmap``); ``jax.jvp`` of it is the rule again and, for the tangent, a
  linear map of the tangents under the rule with a transpose of its own (``_linear_p``), so
  forward over reverse and reverse over reverse both keep each device's tokens. Tangent maps
  that JAX transposes (``transposable``) run that way too. The rule's key in the program is a
  hash of what it computes, so a second process hits the persistent compilation cache; for
  ``jax.export``, which cannot serialize it, the plain function is lowered instead and XLA
  partitions it by itself. Inside the user's ``shard_map`` the rule stands aside.
- **No mesh**: the function runs as it is (the same program as without this module).

Each argument and output is described by a *role*, one character per dimension: ``"T"`` the
tokens, ``"V"`` the vocabulary (sharded over the vocab-parallel axis, if any), ``"."`` neither.
Outputs without a ``"T"`` are sums over tokens and get ``psum``-ed over the token axes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from jax._src import custom_partitioning as _custom_partitioning
from jax._src import dispatch as _dispatch
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import ad, batching, mlir
from jax.interpreters.mlir import ir
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


def vocab_parallel(
    fn: Callable[..., Any], args: tuple, in_roles: Roles, out_roles: Roles, sched: Any
) -> Any:
    """``fn(*args)`` on each device's vocabulary shard (and tokens), per the schedule.

    Under its own ``shard_map`` over ``sched.mesh``; inside the user's ``shard_map`` over the
    vocabulary axis (``sched.inside``) the arguments already are the shards: ``fn`` runs as is.
    """
    if sched.inside:
        return fn(*args)
    return shard_map_over(
        fn, args, in_roles, out_roles, sched.mesh, sched.token_axes, sched.vocab_axis
    )


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
    ``transposable``: ``fn`` is a tangent map JAX transposes for reverse mode: its last argument
    holds the tangents, and the outputs it returns only when they are given (not ``None``) are
    linear in them. On Auto axes those run as a linear map with its own transpose (each device
    on its tokens in both directions), the others under the partitioning rule.
    """
    leaves, roles = jax.tree.leaves(args), jax.tree.leaves(in_roles)
    per_token = [v for v, r in zip(leaves, roles, strict=True) if r.startswith("T")]
    mesh = _explicit_mesh(leaves)
    if mesh is not None:
        axes = next((a for a in map(explicit_token_axes, per_token) if a), ())
        return shard_map_over(fn, args, in_roles, out_roles, mesh, axes)
    if not _has_auto_axes(per_token[0]):
        return fn(*args)
    if transposable:
        return _auto_tangent_map(fn, args, in_roles, out_roles)
    return _auto_partitioned(fn, args, in_roles, out_roles)


# ---------------------------------------------------------------------------------------------
# Auto axes: a custom_partitioning rule, its derivatives and its cache key.
#
# The rule is bound as ``_partitioned_p``, JAX's custom_partitioning call under a name of ours,
# for two reasons. Its lowering keys the rule by a hash of the function, its roles and its mesh
# instead of JAX's ``id()`` of a Python object, so that the compiled program, and the key of the
# persistent compilation cache, are the same in every process. And when the program is lowered
# for ``jax.export`` (which cannot serialize the rule, a callback into this process) it lowers
# the plain function, which XLA partitions by itself. ``_linear_p`` is the same call for a map
# linear in its last arguments, with a transpose, a batching and a JVP rule of its own: the
# tangent of the rule, which forward mode runs and reverse mode transposes, each device on its
# own tokens either way.


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


def _auto_tangent_map(fn: Callable[..., Any], args: tuple, in_roles: Roles, out_roles: Roles):
    """``fn(*args)`` whose last argument holds tangents, each device on its own tokens.

    The outputs ``fn`` returns without the tangents (``None``) run under the rule; the others,
    linear in the tangents, as a ``_linear_p`` map, which JAX can transpose.
    """
    *primals, dots = args
    primal_roles = (*in_roles[:-1], None)
    by_path = dict(jax.tree_util.tree_leaves_with_path(out_roles))
    shape = jax.eval_shape(fn, *primals, None)
    primal_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(shape)]
    primal_out_roles = jax.tree.unflatten(
        jax.tree.structure(shape), [by_path[p] for p in primal_paths]
    )
    primal_out = _auto_partitioned(fn, (*primals, None), primal_roles, primal_out_roles)
    found = dict(zip(primal_paths, jax.tree.leaves(primal_out), strict=True))
    linear_paths = [p for p in by_path if p not in found]

    res, res_tree = jax.tree.flatten(primals)
    lin, lin_tree = jax.tree.flatten(dots)

    def tangents(*flat: jax.Array) -> list[jax.Array]:
        res_args = jax.tree.unflatten(res_tree, flat[: len(res)])
        out = fn(*res_args, jax.tree.unflatten(lin_tree, flat[len(res) :]))
        leaves = dict(jax.tree_util.tree_leaves_with_path(out))
        return [leaves[p] for p in linear_paths]

    spec = _linear_spec(
        tangents,
        tuple(jax.tree.leaves(primal_roles)),
        tuple(jax.tree.leaves(in_roles[-1])),
        tuple(by_path[p] for p in linear_paths),
        [(v.shape, v.dtype) for v in lin],
    )
    found |= dict(zip(linear_paths, _linear(spec, res, lin), strict=True))
    return jax.tree.unflatten(jax.tree.structure(out_roles), [found[p] for p in by_path])


def _rule(plain: Callable[..., list], in_roles: tuple, out_roles: tuple) -> Callable[..., list]:
    """``plain`` under the partitioning rule, with ``jax.vmap`` and ``jax.jvp`` of it."""

    # vmap of the rule: the same rule over the vmapped function, each role with the mapped
    # axis in front (a stack of heads over sharded tokens keeps each device's tokens).
    @jax.custom_batching.custom_vmap
    def batchable(*flat: jax.Array) -> list[jax.Array]:
        return _partitioned_p.bind(*flat, **_partition_params(plain, in_roles, out_roles, flat))

    @batchable.def_vmap
    def _(axis_size: int, in_batched: list[bool], *flat: jax.Array) -> tuple:
        axes = tuple(0 if b else None for b in in_batched)
        roles = tuple("." + r if b else r for r, b in zip(in_roles, in_batched, strict=True))

        def mapped(*flat: jax.Array) -> list[jax.Array]:
            return jax.vmap(plain, in_axes=axes)(*flat)

        batched = _rule(mapped, roles, tuple("." + r for r in out_roles))
        return batched(*flat), [True] * len(out_roles)

    # jvp of the rule: the rule again, and the tangent a linear map of the tangents (the jvp of
    # `plain`, each device on its tokens) with a transpose of its own, so that forward over
    # reverse keeps the tokens where they are and reverse over reverse can transpose it.
    @jax.custom_jvp
    def differentiable(*flat: jax.Array) -> list[jax.Array]:
        return batchable(*flat)

    def jvp(primals: tuple, tangents: tuple) -> tuple[list, list]:
        out = differentiable(*primals)  # itself: an outer derivative takes this rule again
        moved = [_moved(p, t) for p, t in zip(primals, tangents, strict=True)]
        return out, _jvp_linear(plain, in_roles, out_roles, primals, moved, out)

    differentiable.defjvp(jvp, symbolic_zeros=True)
    return differentiable


def _moved(primal: jax.Array, tangent: Any) -> jax.Array | None:
    """A tangent that can be nonzero (None: symbolically zero, or of an integer input)."""
    if isinstance(tangent, (SymbolicZero, ad.Zero)):
        return None
    return tangent if jnp.issubdtype(primal.dtype, jnp.inexact) else None


def _jvp_linear(
    fn: Callable[..., list], in_roles: tuple, out_roles: tuple, primals, tangents, out: list
) -> list:
    """The tangent of ``fn`` at ``primals`` along ``tangents`` (None: zero), as ``_linear_p``.

    ``out`` is ``fn(*primals)``; integer outputs get float0 tangents, and without a nonzero
    tangent every output's is zero.
    """
    moved = [i for i, t in enumerate(tangents) if t is not None]
    floats = [j for j, o in enumerate(out) if jnp.issubdtype(o.dtype, jnp.inexact)]
    result = [np.zeros(o.shape, jax.dtypes.float0) for o in out]
    if not moved:
        for j in floats:
            result[j] = jnp.zeros_like(out[j])
        return result

    def tangent_map(*flat: jax.Array) -> list[jax.Array]:
        res, lin = flat[: len(primals)], flat[len(primals) :]

        def along(*values: jax.Array) -> list[jax.Array]:
            args = list(res)
            for i, v in zip(moved, values, strict=True):
                args[i] = v
            outs = fn(*args)
            return [outs[j] for j in floats]

        return jax.jvp(along, [res[i] for i in moved], list(lin))[1]

    spec = _linear_spec(
        tangent_map,
        tuple(in_roles),
        tuple(in_roles[i] for i in moved),
        tuple(out_roles[j] for j in floats),
        [(primals[i].shape, primals[i].dtype) for i in moved],
    )
    for j, t in zip(floats, _linear(spec, primals, [tangents[i] for i in moved]), strict=True):
        result[j] = t
    return result


class _Linear(NamedTuple):
    """A map of ``(*res, *lin)`` linear in ``lin``, token by token, and its transpose.

    Static (functions compare by identity). ``transpose`` maps ``(*res, *cotangents)`` to the
    cotangents of ``lin``. Roles as for :func:`over_tokens`.
    """

    fn: Callable[..., list]
    transpose: Callable[..., list]
    res_roles: tuple[str, ...]
    lin_roles: tuple[str, ...]
    out_roles: tuple[str, ...]


def _linear_spec(
    fn: Callable[..., list], res_roles: tuple, lin_roles: tuple, out_roles: tuple, lin_shapes
) -> _Linear:
    """``fn`` and its transpose by ``jax.linear_transpose``, on any device's share of tokens.

    ``lin_shapes``: the whole ``(shape, dtype)`` of each ``lin``; a device's share has the
    token count of its ``res`` in place of ``N``.
    """
    first = next(i for i, r in enumerate(res_roles) if "T" in r)

    def transpose(*flat: jax.Array) -> list[jax.Array]:
        res, cts = flat[: len(res_roles)], flat[len(res_roles) :]
        tokens = res[first].shape[res_roles[first].index("T")]
        avals = [
            jax.ShapeDtypeStruct(
                tuple(tokens if c == "T" else n for c, n in zip(role, shape, strict=True)), dtype
            )
            for role, (shape, dtype) in zip(lin_roles, lin_shapes, strict=True)
        ]
        return list(jax.linear_transpose(functools.partial(fn, *res), *avals)(list(cts)))

    return _Linear(fn, transpose, res_roles, lin_roles, out_roles)


def _linear(spec: _Linear, res: Sequence[jax.Array], lin: Sequence[jax.Array]) -> list:
    """``spec.fn(*res, *lin)``, each device on its tokens: one ``_linear_p`` call."""
    flat = (*res, *lin)
    params = _partition_params(spec.fn, spec.res_roles + spec.lin_roles, spec.out_roles, flat)
    return _linear_p.bind(*flat, spec=spec, **params)


def _linear_jvp(primals: tuple, tangents: tuple, *, spec: _Linear, **params: Any) -> tuple:
    """The map again, and its tangent along every argument (third derivatives of the rule)."""
    out = _linear_p.bind(*primals, spec=spec, **params)
    moved = [_moved(p, t) for p, t in zip(primals, tangents, strict=True)]
    roles = spec.res_roles + spec.lin_roles
    return out, _jvp_linear(spec.fn, roles, spec.out_roles, primals, moved, out)


def _linear_transpose(cts: list, *args: Any, spec: _Linear, **params: Any) -> list:
    """The transpose: ``spec.transpose`` as a ``_linear_p`` map, whose own transpose is ``fn``."""
    res = args[: len(spec.res_roles)]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("jxent: a tangent map is linear in its tangents only")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    flipped = _Linear(spec.transpose, spec.fn, spec.res_roles, spec.out_roles, spec.lin_roles)
    return [None] * len(res) + _linear(flipped, res, cts)


def _linear_batch(args: tuple, dims: tuple, *, spec: _Linear, **params: Any) -> tuple:
    """vmap: the same map over the vmapped functions, the mapped axis in front of each role."""
    num_res = len(spec.res_roles)
    args = tuple(a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True))
    axes = tuple(None if d is None else 0 for d in dims)
    res_axes, lin_axes = axes[:num_res], axes[num_res:]

    def fn(*flat: jax.Array) -> list[jax.Array]:
        return jax.vmap(spec.fn, in_axes=axes)(*flat)

    def transpose(*flat: jax.Array) -> list[jax.Array]:
        ct_axes = (0,) * len(spec.out_roles)
        cts = jax.vmap(spec.transpose, in_axes=res_axes + ct_axes)(*flat)
        # a linear input shared by the whole batch gets the sum of its cotangents
        return [c if a == 0 else jnp.sum(c, axis=0) for c, a in zip(cts, lin_axes, strict=True)]

    def mark(roles: tuple, axes: tuple) -> tuple:
        return tuple(r if a is None else "." + r for r, a in zip(roles, axes, strict=True))

    batched = _Linear(
        fn,
        transpose,
        mark(spec.res_roles, res_axes),
        mark(spec.lin_roles, lin_axes),
        tuple("." + r for r in spec.out_roles),
    )
    out = _linear(batched, args[:num_res], args[num_res:])
    return out, [0] * len(out)


def _partition_params(
    plain: Callable[..., list], in_roles: tuple, out_roles: tuple, flat: Sequence[jax.Array]
) -> dict:
    """The parameters of JAX's ``custom_partitioning`` call of ``plain`` with the rule."""

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
    (eqn,) = jax.make_jaxpr(cp)(*flat).eqns
    return dict(eqn.params, roles=(in_roles, out_roles))


def _lower(ctx: Any, *values: Any, roles: tuple, **params: Any) -> Any:
    """JAX's lowering of the call, keyed by what the rule computes (not by a Python id)."""
    call = params["call"]
    if ctx.module_context.lowering_parameters.for_export:
        # jax.export cannot serialize the rule (a callback): XLA partitions the plain function.
        return mlir.lower_fun(jax_core.jaxpr_as_fun(call), multiple_results=True)(ctx, *values)
    results = _custom_partitioning._custom_partitioning_lowering_rule(ctx, *values, **params)
    op = results[0].owner if results else None
    op = getattr(op, "operation", op)
    if op is None or op.name != "stablehlo.custom_call":
        return results  # one device or manual axes: JAX lowered the plain function
    callbacks = _custom_partitioning._sharding_callbacks
    info = callbacks[ir.StringAttr(op.attributes["backend_config"]).value.encode()]
    mesh = info.mesh
    described = (
        re.sub(r" at 0x[0-9a-fA-F]+", "", str(call)),  # no address of a Python object
        roles,
        tuple(mesh.axis_names),
        tuple(mesh.devices.shape),
        tuple(int(d.id) for d in mesh.devices.flat),
        tuple(ctx.module_context.platforms),
    )
    key = "jxent-tokens-" + hashlib.sha256(repr(described).encode()).hexdigest()
    # Programs lowered alike share one entry: it lives while any of them does.
    ctx.module_context.add_keepalive(callbacks.setdefault(key.encode(), info))
    op.attributes["backend_config"] = ir.StringAttr.get(key)
    return results


def _primitive(name: str) -> jax_core.Primitive:
    p = jax_core.Primitive(name)
    p.multiple_results = True
    p.def_abstract_eval(lambda *avals, call, **params: call.out_avals)
    p.def_impl(lambda *args, call, **params: jax_core.jaxpr_as_fun(call)(*args))
    _dispatch.prim_requires_devices_during_lowering.add(p)
    return p


_partitioned_p = _primitive("jxent_tokens_partitioned")
mlir.register_lowering(_partitioned_p, _lower)
_linear_p = _primitive("jxent_tokens_linear")
mlir.register_lowering(_linear_p, lambda ctx, *v, spec, **params: _lower(ctx, *v, **params))
ad.primitive_jvps[_linear_p] = _linear_jvp
ad.primitive_transposes[_linear_p] = _linear_transpose
batching.primitive_batchers[_linear_p] = _linear_batch


def _sharding_rule(in_roles: tuple, out_roles: tuple) -> str:
    """Shardy's einsum-like rule: one factor ``n`` for tokens, a factor of its own elsewhere."""
    count = iter(range(10**6))

    def factors(role: str) -> str:
        if not role:
            return ""  # a scalar
        return " ".join("n" if c == "T" else f"f{next(count)}" for c in role)

    ins = ", ".join(factors(r) for r in in_roles)
    return f"{ins} -> {', '.join(factors(r) for r in out_roles)}"
