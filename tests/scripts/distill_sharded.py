"""Fused distillation on 8 host devices, in float64, against the plain divergence on one.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python distill_sharded.py

Tokens sharded over Auto and Explicit meshes; both heads sharded over the vocabulary (1-D and a
2-D ``("data", "vocab")`` mesh). Prints one JSON object (last line): each case's largest error
(loss and the student's gradients) relative to the largest reference entry, or the message.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 8, jax.devices()
N, D, DT, L, T = 64, 8, 6, 48, 1.7
k = jax.random.split(jax.random.key(0), 7)
f = jnp.float64
x, w = jax.random.normal(k[0], (N, D), f), jax.random.normal(k[1], (D, L), f)
b = jax.random.normal(k[2], (L,), f)
tx, tw = jax.random.normal(k[3], (N, DT), f), jax.random.normal(k[4], (DT, L), f)
y = jax.random.randint(k[5], (N,), 0, L)
where = jax.random.bernoulli(k[6], 0.9, (N,))


def plain(x, w, b, divergence):
    log_q = jax.nn.log_softmax((x @ w + b[None]) / T)
    log_p = jax.nn.log_softmax((tx @ tw) / T)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    if divergence == "forward_kl":
        d = jnp.sum(p * (log_p - log_q), -1)
    elif divergence == "reverse_kl":
        d = jnp.sum(q * (log_q - log_p), -1)
    else:
        log_m = jnp.log(0.5 * (p + q))
        d = 0.5 * jnp.sum(p * (log_p - log_m), -1) + 0.5 * jnp.sum(q * (log_q - log_m), -1)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(x @ w + b[None]), y[:, None], 1)[:, 0]
    loss = jnp.where(where, 0.8 * d + 0.2 * hard, 0.0)
    return jnp.sum(loss) / jnp.sum(where)


def error(fn, divergence):
    got = jax.jit(jax.value_and_grad(fn, (0, 1, 2)))(x, w, b)
    want = jax.value_and_grad(lambda *a: plain(*a, divergence), (0, 1, 2))(x, w, b)
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in pairs)


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # the test reports the message
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def options(divergence):
    opts = {"divergence": divergence, "temperature": T, "labels": y, "hard_weight": 0.2}
    return opts | {"where": where, "chunk_size": 8, "vocab_block_size": 5}


def tokens_on(mesh, divergence):
    tokens = NamedSharding(mesh, P("data"))

    def fn(x, w, b):
        x, t = jax.device_put(x, tokens), jax.device_put(tx, tokens)
        return jxent.linear_distillation_loss(x, w, t, tw, bias=b, **options(divergence))

    return error(fn, divergence)


def vocab_parallel_on(mesh, divergence):
    def fn(x, w, b):
        return jxent.vocab_parallel_linear_distillation_loss(
            x, w, tx, tw, mesh=mesh, bias=b, **options(divergence)
        )

    return error(fn, divergence)


devices = np.asarray(jax.devices())
auto = Mesh(devices, ("data",))
explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
vocab_1d, vocab_2d = Mesh(devices, ("vocab",)), Mesh(devices.reshape(2, 4), ("data", "vocab"))
results = {
    "tokens_auto-forward_kl": attempt(lambda: tokens_on(auto, "forward_kl")),
    "tokens_explicit-jsd": attempt(lambda: tokens_on(explicit, "jsd")),
    "vocab_parallel_1d-reverse_kl": attempt(lambda: vocab_parallel_on(vocab_1d, "reverse_kl")),
    "vocab_parallel_1d-jsd": attempt(lambda: vocab_parallel_on(vocab_1d, "jsd")),
    "vocab_parallel_2d-forward_kl": attempt(lambda: vocab_parallel_on(vocab_2d, "forward_kl")),
}
print(json.dumps(results))
