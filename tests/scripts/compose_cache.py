"""The persistent compilation cache across processes, on 8 host devices.

    JXENT_CACHE_DIR=/tmp/cache XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python compose_cache.py

Compiles, with JAX's persistent compilation cache in ``$JXENT_CACHE_DIR`` (every program
cached), ``jax.value_and_grad`` of the fused head with its tokens sharded on an Auto mesh (the
``custom_partitioning`` rule) and on an Explicit one, the Hessian-vector product and the
gradient of ``reduction="none"`` on the Auto mesh (the rule's linear tangent map), and runs
them. Prints one JSON object (last line): the cache's entries afterwards and each result's
error against the plain loss (float32, relative to the largest reference entry). Run twice on
one directory, the second run adds no entry: every program comes from the cache.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

CACHE = os.environ["JXENT_CACHE_DIR"]
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

assert jax.device_count() == 8, jax.devices()
N, D, L = 64, 8, 40
keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (N, D))
w = jax.random.normal(keys[1], (D, L))
y = jax.random.randint(keys[2], (N,), 0, L)
w_dot = jax.random.normal(keys[3], (D, L))


def plain(x, w, y):
    """Each token's loss: log_softmax and a gather, no jxent code."""
    log_p = jax.nn.log_softmax(x @ w)
    return -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]


def fused(x, w, y, reduction="sum"):
    return jxent.linear_cross_entropy(
        x, w, y, reduction=reduction, chunk_size=8, vocab_block_size=16
    )


def value_and_grad(loss):
    return jax.value_and_grad(lambda x, w, y: jnp.sum(loss(x, w, y)), argnums=(0, 1))


def hvp(loss):
    grad = jax.grad(lambda x, w, y: jnp.sum(loss(x, w, y)), argnums=1)
    return lambda x, w, y: jax.jvp(lambda w: grad(x, w, y), (w,), (w_dot,))[1]


def grad_none(loss):
    scale = jnp.linspace(-1.0, 1.0, N)
    return jax.grad(lambda x, w, y: jnp.sum(scale * loss(x, w, y)), argnums=(0, 1))


def error(got, want):
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    return diff / max(float(jnp.max(jnp.abs(b))) for _, b in pairs)


def main():
    meshes = {
        "auto": Mesh(np.array(jax.devices()), ("data",)),
        "explicit": jax.make_mesh((8,), ("data",)),
    }
    cases = {
        "value_and_grad_auto": ("auto", value_and_grad, fused),
        "value_and_grad_explicit": ("explicit", value_and_grad, fused),
        "hvp_auto": ("auto", hvp, fused),
        "none_grad_auto": ("auto", grad_none, lambda x, w, y: fused(x, w, y, "none")),
    }
    errors = {}
    for name, (mesh, derivative, loss) in cases.items():
        tokens = NamedSharding(meshes[mesh], P("data"))
        xs, ys = jax.device_put(x, tokens), jax.device_put(y, tokens)
        errors[name] = error(jax.jit(derivative(loss))(xs, w, ys), derivative(plain)(x, w, y))
    print(json.dumps({"entries": sorted(os.listdir(CACHE)), "errors": errors}))


main()
