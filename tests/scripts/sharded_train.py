"""Run in a subprocess with 8 host devices: 5 sharded steps must equal 5 single-device steps."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from jxent.predictors import mlp

assert jax.device_count() == 8, jax.devices()
key = jax.random.key(0)
params = mlp.init(key, [12, 16, 5])
x = jax.random.normal(jax.random.key(1), (5, 32, 12))
y = jax.random.randint(jax.random.key(2), (5, 32), 0, 5)
opt = optax.adam(1e-2)
results = {}
for name, mesh in (("single", None), ("sharded", jxent.train.data_mesh())):
    step = jxent.train.make_step(mlp.apply, opt, mesh=mesh, label_smoothing=0.1)
    state = jxent.train.init_state(jax.tree.map(jnp.array, params), opt)
    losses = []
    for i in range(5):
        state, metrics = step(state, x[i], y[i])
        losses.append(float(metrics["loss"]))
    if mesh is not None:
        assert len(state.params[0][0].sharding.device_set) == 8
    results[name] = {
        "losses": losses,
        "params": [np.asarray(a).tolist() for a in jax.tree.leaves(state.params)],
    }
json.dump(results, sys.stdout)
