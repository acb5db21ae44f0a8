"""Per-token log-probs and return_stats of the fused head on 8 host devices, in float64.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python log_probs_sharded.py

Tokens sharded over Auto and Explicit meshes, the vocab-parallel twin on a 1-D and a 2-D mesh:
fields and gradients (x, w, bias, temperature) against the fields written plainly on one
device. Prints one JSON object (last line): each case's largest error relative to the largest
reference entry (argmax: the number of tokens that differ), or the message if it raised.
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
N, D, L, T = 64, 8, 48, 0.7
k = jax.random.split(jax.random.key(0), 5)
x = jax.random.normal(k[0], (N, D), jnp.float64)
w = jax.random.normal(k[1], (D, L), jnp.float64)
b = jax.random.normal(k[2], (L,), jnp.float64)
y = jax.random.randint(k[3], (N,), 0, L).at[5].set(-100)
where = jax.random.bernoulli(k[4], 0.9, (N,))
cot = jax.random.normal(jax.random.key(9), (3, N), jnp.float64)
counted = where & (y != -100)


def plain(x, w, b, t):
    s = 2.5 * jnp.tanh((x @ w + b[None]) / 2.5) / t
    log_p = jax.nn.log_softmax(s)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    picked = jnp.take_along_axis(log_p, jnp.where(counted, y, 0)[:, None], axis=1)[:, 0]
    fields = (picked, entropy, jax.nn.logsumexp(s, axis=-1))
    return (*(jnp.where(counted, v, 0.0) for v in fields), jnp.argmax(s, axis=-1))


def scalar(fn):
    return lambda *a: sum(jnp.sum(c * v) for c, v in zip(cot, fn(*a)[:3], strict=True))


def compare(fn):
    """Fields and gradients of ``fn(x, w, b, t)`` against the plain ones."""
    got, want = fn(x, w, b, T), plain(x, w, b, T)
    grads = jax.jit(jax.grad(scalar(fn), (0, 1, 2, 3)))(x, w, b, T)
    ref = jax.grad(scalar(plain), (0, 1, 2, 3))(x, w, b, T)
    pairs = list(zip((*got[:3], *grads), (*want[:3], *ref), strict=True))
    err = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in pairs)
    return {"error": err, "argmax_differs": int(jnp.sum(got[3] != want[3]))}


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # the test reports the message
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


OPTS = {"logit_softcap": 2.5, "where": where, "ignore_index": -100, "vocab_block_size": 5}


def fused_on(mesh):
    tokens = NamedSharding(mesh, P("data"))

    def fn(x, w, b, t):
        x = jax.device_put(x, tokens)
        return jxent.linear_log_probs(x, w, y, bias=b, temperature=t, chunk_size=8, **OPTS)

    return fn


def vocab_parallel_on(mesh):
    def fn(x, w, b, t):
        return jxent.vocab_parallel_linear_log_probs(
            x, w, y, mesh=mesh, bias=b, temperature=t, chunk_size=8, **OPTS
        )

    return fn


def stats_vocab_parallel():
    mesh = Mesh(jax.devices(), ("vocab",))
    _, stats = jxent.vocab_parallel_linear_cross_entropy(
        x, w, jnp.where(counted, y, 0), mesh=mesh, bias=b, where=counted, return_stats=True
    )
    s = x @ w + b[None]
    lse = jnp.where(counted, jax.nn.logsumexp(s, axis=-1), 0.0)
    err = float(jnp.max(jnp.abs(stats.lse - lse)) / jnp.max(jnp.abs(lse)))
    return {"error": err, "argmax_differs": int(jnp.sum(stats.argmax != jnp.argmax(s, axis=-1)))}


devices = jax.devices()
auto = Mesh(devices, ("data",))
explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
results = {
    "tokens_auto": attempt(lambda: compare(fused_on(auto))),
    "tokens_explicit": attempt(lambda: compare(fused_on(explicit))),
    "vocab_parallel_1d": attempt(lambda: compare(vocab_parallel_on(Mesh(devices, ("vocab",))))),
    "vocab_parallel_2d": attempt(
        lambda: compare(
            vocab_parallel_on(Mesh(np.asarray(devices).reshape(2, 4), ("data", "vocab")))
        )
    ),
    "return_stats_vocab_parallel": attempt(stats_vocab_parallel),
}
print(json.dumps(results))
