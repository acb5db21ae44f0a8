"""Run with 8 host devices: vocab-parallel loss and gradients equal the materialised reference."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jxent

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("vocab",))
k = jax.random.split(jax.random.key(0), 4)
N, D, L = 19, 6, 48
x = jax.random.normal(k[0], (N, D), jnp.float64)
w = jax.random.normal(k[1], (D, L), jnp.float64)
b = jax.random.normal(k[2], (L,), jnp.float64)
y = jax.random.randint(k[3], (N,), 0, L).at[4].set(-100)
w_sharded = jax.device_put(w, NamedSharding(mesh, PartitionSpec(None, "vocab")))
b_sharded = jax.device_put(b, NamedSharding(mesh, PartitionSpec("vocab")))
cases = {
    "plain": {},
    "options": {"label_smoothing": 0.1, "z_loss": 0.05, "logit_softcap": 2.5, "ignore_index": -100},
}
errors = {}
for reduction in ("mean", "sum", "none"):
    for case, opts in cases.items():
        labels = jnp.where(y < 0, 0, y) if case == "plain" else y
        ct = jnp.arange(1.0, N + 1.0) if reduction == "none" else 1.0

        def vp(x, w, b, labels=labels, opts=opts, reduction=reduction, ct=ct):
            loss = jxent.vocab_parallel_linear_cross_entropy(
                x, w, labels, mesh=mesh, bias=b, reduction=reduction, **opts
            )
            return jnp.sum(loss * ct)

        def ref(x, w, b, labels=labels, opts=opts, reduction=reduction, ct=ct):
            loss = jxent.softmax_cross_entropy(x @ w + b[None], labels, reduction=reduction, **opts)
            return jnp.sum(loss * ct)

        got = jax.jit(jax.value_and_grad(vp, argnums=(0, 1, 2)))(x, w_sharded, b_sharded)
        want = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, w, b)
        assert got[1][1].sharding.spec == PartitionSpec(None, "vocab"), got[1][1].sharding
        rel = [abs(float(got[0] - want[0])) / abs(float(want[0]))]
        rel += [
            float(jnp.max(jnp.abs(g - h)) / jnp.max(jnp.abs(h))) for g, h in zip(got[1], want[1])
        ]
        errors[f"{reduction}-{case}"] = max(rel)
json.dump(errors, sys.stdout)
