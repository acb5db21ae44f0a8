"""jxent inside the user's own sharded programs, on 8 host devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python compose.py

Prints one JSON object (last line): for each case the largest error against the plain loss on
one device (float32, relative to the largest reference entry), with the element counts of the
compiled program's all-gathers where the case keeps each device's tokens, or the error message
when it raised. ``tests/test_compose.py`` asserts on it.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

assert jax.device_count() == 8, jax.devices()
N, D, L = 64, 8, 40
keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (N, D))
w = jax.random.normal(keys[1], (D, L))
y = jax.random.randint(keys[2], (N,), 0, L)
class_weights = jax.random.uniform(keys[3], (L,), minval=0.5, maxval=2.0)


def plain(x, w, y, weights=None):
    """The plain summed loss: log_softmax and a gather, no jxent code."""
    log_p = jax.nn.log_softmax(x @ w)
    picked = -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
    if weights is None:
        return jnp.sum(picked)
    return jnp.sum(weights[y] * picked) / jnp.sum(weights[y])


def error(got, want):
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(a) - b))) for a, b in pairs)
    return diff / max(float(jnp.max(jnp.abs(b))) for _, b in pairs)


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # the test reports the message
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def fused_sum(x, w, y):
    return jxent.linear_cross_entropy(x, w, y, reduction="sum", chunk_size=8, vocab_block_size=16)


WANT = jax.grad(plain, argnums=(0, 1))(x, w, y)


def in_users_shard_map(mesh, axis_names=None):
    """jax.grad of the fused loss inside the user's shard_map over "data" (check_vma on)."""

    def local(x, y, w):
        return jax.grad(fused_sum, argnums=(0, 1))(x, w, y)  # dW: psum by the transpose

    extra = {} if axis_names is None else {"axis_names": axis_names}
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P("data"), P()), **extra
    )
    tokens, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (jax.device_put(x, tokens), jax.device_put(y, tokens), jax.device_put(w, whole))
    return error(jax.jit(mapped)(*args), WANT)


def vocab_parallel_in_users_shard_map(mesh, token_axis=None):
    """jax.grad of the vocab-parallel loss inside the user's shard_map over "vocab" (and the
    tokens' axis), check_vma on: w is each device's shard, the loss its collectives' own."""
    tokens = P() if token_axis is None else P(token_axis)

    def local(x, y, w):
        def loss(x, w):
            return jxent.vocab_parallel_linear_cross_entropy(
                x, w, y, mesh=mesh, reduction="sum", chunk_size=8, vocab_block_size=2
            )

        return jax.grad(loss, argnums=(0, 1))(x, w)  # dW: psum over the tokens by the transpose

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, P(None, "vocab")),
        out_specs=(tokens, P(None, "vocab")),
    )
    args = [x, y, w]
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        specs = (tokens, tokens, P(None, "vocab"))
        args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    return error(jax.jit(mapped)(*args), WANT)


def vocab_parallel_class_weights(jit):
    """Class weights sharded like w's columns, labels replicated (an Explicit mesh)."""
    mesh = jax.make_mesh((8,), ("vocab",))
    columns = NamedSharding(mesh, P(None, "vocab"))
    ws = jax.device_put(w, columns)
    weights = jax.device_put(class_weights, NamedSharding(mesh, P("vocab")))

    def loss(x, w, weights):
        return jxent.vocab_parallel_linear_cross_entropy(x, w, y, mesh=mesh, weights=weights)

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    fn = jax.jit(fn) if jit else fn
    with jax.set_mesh(mesh):  # eager jax.grad on an Explicit mesh needs one (JAX's rule)
        got = fn(x, ws, weights)
    want = jax.value_and_grad(plain, argnums=(0, 1))(x, w, y, class_weights)
    return error(got, want)


def vmap_over_a_sharded_explicit_axis():
    """A stack of 8 problems, the stack axis sharded: materialised and fused, as unsharded."""
    mesh = jax.make_mesh((8,), ("data",))
    stack = NamedSharding(mesh, P("data"))
    xs = jax.random.normal(keys[0], (8, 16, D))
    ys = jax.random.randint(keys[1], (8, 16), 0, L)

    def both(x, y):
        return jxent.softmax_cross_entropy(x @ w, y), jxent.linear_cross_entropy(x, w, y)

    sharded = (jax.device_put(xs, stack), jax.device_put(ys, stack))
    got = jax.jit(jax.vmap(both))(*sharded)
    want = [jax.vmap(lambda x, y: plain(x, w, y) / 16)(xs, ys)] * 2

    def total(x, y):  # the gradient with respect to the mapped inputs, fused head
        return jnp.sum(jax.vmap(lambda x, y: jxent.linear_cross_entropy(x, w, y))(x, y))

    grad = jax.jit(jax.grad(total))(*sharded)
    want_grad = jax.grad(lambda x: jnp.sum(jax.vmap(lambda x, y: plain(x, w, y) / 16)(x, ys)))(xs)
    return max(error(got, want), error(grad, want_grad))


def gathers(fn, *args):
    """Element counts of the compiled program's all-gathers."""
    text = fn.lower(*args).compile().as_text()
    found = re.finditer(r"= \w+\[([0-9,]*)\][^ ]* all-gather\(", text)
    return [int(np.prod([int(d) for d in m.group(1).split(",") if d])) for m in found]


def vmap_of_the_fused_head_on_an_auto_mesh():
    """A stack of two heads (an unsharded vmapped axis) over tokens sharded on an Auto mesh."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    tokens = NamedSharding(mesh, P("data"))
    heads = jnp.stack([w, 0.5 * w])
    fn = jax.jit(jax.vmap(jax.value_and_grad(fused_sum, argnums=(0, 1)), in_axes=(None, 0, None)))
    args = (jax.device_put(x, tokens), heads, jax.device_put(y, tokens))
    want = jax.vmap(jax.value_and_grad(plain, argnums=(0, 1)), in_axes=(None, 0, None))(x, heads, y)
    return {"error": error(fn(*args), want), "gathers": gathers(fn, *args)}


def exported_on_an_explicit_mesh():
    """value_and_grad of the fused head, tokens sharded: exported, serialized, called."""
    mesh = jax.make_mesh((8,), ("data",))
    tokens = NamedSharding(mesh, P("data"))
    args = (jax.device_put(x, tokens), w, jax.device_put(y, tokens))
    fn = jax.jit(jax.value_and_grad(fused_sum, argnums=(0, 1)))
    exported = export.deserialize(export.export(fn)(*args).serialize())
    want = jax.value_and_grad(plain, argnums=(0, 1))(x, w, y)
    return error(exported.call(*args), want)


def on_an_auto_mesh():
    """x and y with their tokens sharded on an Auto mesh (``Mesh``, no ``jax.set_mesh``)."""
    tokens = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    return jax.device_put(x, tokens), jax.device_put(y, tokens)


def exported_on_an_auto_mesh():
    """The same on an Auto mesh: the plain scan exported (the rule is not serializable)."""
    xs, ys = on_an_auto_mesh()
    fn = jax.jit(jax.value_and_grad(fused_sum, argnums=(0, 1)))
    exported = export.deserialize(export.export(fn)(xs, w, ys).serialize())
    want = jax.value_and_grad(plain, argnums=(0, 1))(x, w, y)
    return error(exported.call(xs, w, ys), want)


X_DOT = jax.random.normal(keys[2], (N, D))
W_DOT = jax.random.normal(keys[3], (D, L))
COTANGENT = jnp.linspace(-1.0, 1.0, N)  # of each token's loss, reduction="none"


def hvp(loss):
    """Forward over reverse: the Hessian of ``loss`` times (X_DOT, W_DOT)."""
    grad = jax.grad(loss, argnums=(0, 1))
    return lambda x, w, y: jax.jvp(lambda x, w: grad(x, w, y), (x, w), (X_DOT, W_DOT))


def grad_of_grad(loss):
    """Reverse over reverse."""
    grad = jax.grad(loss, argnums=1)
    return lambda x, w, y: jax.grad(lambda x, w: jnp.sum(grad(x, w, y) ** 2), argnums=(0, 1))(x, w)


def hessian(loss):
    """jax.hessian (forward over reverse, vmapped over the tangents) with respect to ``w``."""
    return lambda x, w, y: jax.hessian(loss, argnums=1)(x, w, y)


def per_token(x, w, y):
    return jxent.linear_cross_entropy(x, w, y, reduction="none", chunk_size=8, vocab_block_size=16)


def plain_per_token(x, w, y):
    log_p = jax.nn.log_softmax(x @ w)
    return -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]


def grad_none(loss):
    return lambda x, w, y: jax.grad(
        lambda x, w: jnp.sum(COTANGENT * loss(x, w, y)), argnums=(0, 1)
    )(x, w)


def jvp_none(loss):
    return lambda x, w, y: jax.jvp(lambda x, w: loss(x, w, y), (x, w), (X_DOT, W_DOT))


def log_probs_sum(x, w, y):
    """Each token's log-probability and entropy at a temperature, weighted."""
    out = jxent.linear_log_probs(x, w, y, temperature=1.3, chunk_size=8, vocab_block_size=16)
    return jnp.sum(COTANGENT * (out.log_prob + 0.3 * out.entropy))


def plain_log_probs_sum(x, w, y):
    log_p = jax.nn.log_softmax(x @ w / 1.3)
    picked = jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=1)
    return jnp.sum(COTANGENT * (picked + 0.3 * entropy))


TEACHER_X = jax.random.normal(keys[3], (N, D))  # replicated beside the student's sharded x
TEACHER_W = jax.random.normal(keys[2], (D, L))


def distillation_sum(x, w, y):
    """Each token's KL(teacher || student), weighted (reduction="none")."""
    kl = jxent.linear_distillation_loss(
        x, w, TEACHER_X, TEACHER_W, reduction="none", chunk_size=8, vocab_block_size=16
    )
    return jnp.sum(COTANGENT * kl)


def plain_distillation_sum(x, w, y):
    log_q, log_p = jax.nn.log_softmax(x @ w), jax.nn.log_softmax(TEACHER_X @ TEACHER_W)
    return jnp.sum(COTANGENT * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))


def grad(loss):
    return jax.grad(loss, argnums=(0, 1))


def derivative_on_an_auto_mesh(derivative, fused, reference):
    """``derivative`` of the fused loss with tokens sharded on an Auto mesh, and its program."""
    xs, ys = on_an_auto_mesh()
    fn = jax.jit(derivative(fused))
    want = derivative(reference)(x, w, y)
    return {"error": error(fn(xs, w, ys), want), "gathers": gathers(fn, xs, w, ys)}


DERIVATIVES = {  # second derivatives, and reduction="none" (a tangent map JAX transposes)
    "hvp": (hvp, fused_sum, plain),
    "grad_of_grad": (grad_of_grad, fused_sum, plain),
    "hessian": (hessian, fused_sum, plain),
    "none_grad": (grad_none, per_token, plain_per_token),
    "none_jvp": (jvp_none, per_token, plain_per_token),
    "log_probs_grad": (grad, log_probs_sum, plain_log_probs_sum),  # the same tangent map
    "distillation_grad": (grad, distillation_sum, plain_distillation_sum),
}


def mean_denominators_with_sharded_class_weights():
    mesh = jax.make_mesh((8,), ("vocab",))
    weights = jax.device_put(class_weights, NamedSharding(mesh, P("vocab")))
    got = jxent.train.mean_denominators(y, weights=weights)
    return error(got, (jnp.sum(class_weights[y]), jnp.asarray(float(N))))


def main():
    devices = np.array(jax.devices())
    auto = Mesh(devices, ("data",))
    auto_2d = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    results = {
        "shard_map_auto": attempt(lambda: in_users_shard_map(auto)),
        "shard_map_explicit": attempt(lambda: in_users_shard_map(jax.make_mesh((8,), ("data",)))),
        "shard_map_partial_2d": attempt(lambda: in_users_shard_map(auto_2d, {"data"})),
        "vocab_parallel_shard_map_auto": attempt(
            lambda: vocab_parallel_in_users_shard_map(Mesh(devices, ("vocab",)))
        ),
        "vocab_parallel_shard_map_explicit": attempt(
            lambda: vocab_parallel_in_users_shard_map(jax.make_mesh((8,), ("vocab",)))
        ),
        "vocab_parallel_shard_map_2d": attempt(
            lambda: vocab_parallel_in_users_shard_map(
                Mesh(devices.reshape(2, 4), ("data", "vocab")), "data"
            )
        ),
        "vocab_weights_jit": attempt(lambda: vocab_parallel_class_weights(True)),
        "vocab_weights_eager": attempt(lambda: vocab_parallel_class_weights(False)),
        "vmap_sharded_explicit": attempt(vmap_over_a_sharded_explicit_axis),
        "export_explicit": attempt(exported_on_an_explicit_mesh),
        "mean_denominators_sharded_weights": attempt(mean_denominators_with_sharded_class_weights),
        "vmap_auto": attempt(vmap_of_the_fused_head_on_an_auto_mesh),
        "export_auto": attempt(exported_on_an_auto_mesh),
        **{
            f"auto_{name}": attempt(lambda case=case: derivative_on_an_auto_mesh(*case))
            for name, case in DERIVATIVES.items()
        },
    }
    print(json.dumps(results))


main()
