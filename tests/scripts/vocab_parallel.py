"""Run with 8 host devices: the vocab-parallel loss, its gradients (x, w, b, probability labels,
class weights) and its forward-mode derivative equal those of the plainly written reference loss
(tests/_reference.py) on materialised logits, differentiated by jax in float64."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jxent
from _reference import reference_loss

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("vocab",))
k = jax.random.split(jax.random.key(0), 8)
N, D, L = 19, 6, 48
x = jax.random.normal(k[0], (N, D), jnp.float64)
w = jax.random.normal(k[1], (D, L), jnp.float64)
b = jax.random.normal(k[2], (L,), jnp.float64)
y = jax.random.randint(k[3], (N,), 0, L).at[4].set(-100)
q = jax.random.dirichlet(k[4], jnp.ones(L, jnp.float64), (N,))
cw = jax.random.uniform(k[5], (L,), jnp.float64, 0.2, 2.0)
mask = jax.random.bernoulli(k[6], 0.8, (N,))
cols, vec = PartitionSpec(None, "vocab"), PartitionSpec("vocab")
w_sharded = jax.device_put(w, NamedSharding(mesh, cols))
b_sharded = jax.device_put(b, NamedSharding(mesh, vec))
cases = {
    "plain": ({}, jnp.where(y < 0, 0, y), None),
    "int-options": (
        {"label_smoothing": 0.1, "z_loss": 0.05, "logit_softcap": 2.5, "ignore_index": -100},
        y,
        cw,
    ),
    "soft-options": ({"z_loss": 0.05, "where": mask}, q, cw),
}
errors = {}
wanted = set(sys.argv[1:])  # e.g. "mean-plain"; all nine when empty
for reduction in ("mean", "sum", "none"):
    for case, (opts, labels, class_weights) in cases.items():
        if wanted and f"{reduction}-{case}" not in wanted:
            continue
        ct = jnp.arange(1.0, N + 1.0) if reduction == "none" else 1.0
        soft = labels.dtype == jnp.float64
        diff = (0, 1, 2, 3, 4) if soft else (0, 1, 2, 4)

        def vp(x, w, b, labels, cw, opts=opts, reduction=reduction, ct=ct):
            loss = jxent.vocab_parallel_linear_cross_entropy(
                x,
                w,
                labels,
                mesh=mesh,
                bias=b,
                reduction=reduction,
                weights=cw,
                chunk_size=8,
                vocab_block_size=4,
                **opts,
            )
            return jnp.sum(loss * ct)

        def ref(x, w, b, labels, cw, opts=opts, reduction=reduction, ct=ct):
            loss = reference_loss(x @ w + b[None], labels, reduction=reduction, weights=cw, **opts)
            return jnp.sum(loss * ct)

        if class_weights is None:
            diff = diff[:-1]
        args = (x, w_sharded, b_sharded, labels, class_weights)
        got = jax.jit(jax.value_and_grad(vp, argnums=diff))(*args)
        want = jax.value_and_grad(ref, argnums=diff)(x, w, b, labels, class_weights)
        assert got[1][1].sharding.spec == cols, got[1][1].sharding
        rel = [abs(float(got[0] - want[0])) / abs(float(want[0]))]
        rel += [
            float(jnp.max(jnp.abs(g - h)) / jnp.max(jnp.abs(h))) for g, h in zip(got[1], want[1])
        ]
        tangents = (jnp.ones_like(x), jnp.full_like(w, 0.5), jnp.ones_like(b))
        rest = (labels, class_weights)
        jvp_got = jax.jvp(lambda *p, rest=rest: vp(*p, *rest), args[:3], tangents)[1]
        jvp_want = jax.jvp(lambda *p, rest=rest: ref(*p, *rest), (x, w, b), tangents)[1]
        rel.append(abs(float(jvp_got - jvp_want)) / abs(float(jvp_want)))
        errors[f"{reduction}-{case}"] = max(rel)
json.dump(errors, sys.stdout)
