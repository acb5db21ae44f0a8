"""Data-parallel training in a subprocess: 5 steps of ``make_step(..., mesh=data_mesh())``.

    python sharded_train.py                      # 1 process, 8 host devices: single vs sharded
    python sharded_train.py PROCESS_ID 2 PORT    # one of 2 processes, 4 host devices each

The launcher sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (or 4). With two
processes, each joins ``jax.distributed.initialize`` on localhost (CPU collectives: gloo), holds
its half of every global batch and builds the global arrays with
``jax.make_array_from_process_local_data`` -- the launch the README documents. Prints JSON:
losses and parameters per run, as the last line (process 0 only, when there are two).
"""

import json
import sys

import jax

if len(sys.argv) > 1:
    process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )

import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import jxent
from jxent.predictors import mlp

assert jax.device_count() == 8, jax.devices()
params = mlp.init(jax.random.key(0), [12, 16, 5])
x = np.asarray(jax.random.normal(jax.random.key(1), (5, 32, 12)))
y = np.asarray(jax.random.randint(jax.random.key(2), (5, 32), 0, 5))
where = np.arange(32) % 8 != 3  # a per-batch padding mask, given to each step call
opt = optax.adam(1e-2)


def run(mesh, batches):
    step = jxent.train.make_step(mlp.apply, opt, mesh=mesh, label_smoothing=0.1)
    state = jxent.train.init_state(params, opt)
    losses = []
    for xb, yb, wb in batches:
        state, metrics = step(state, xb, yb, where=wb)
        losses.append(float(metrics["loss"]))
    if mesh is not None:
        assert len(state.params[0][0].sharding.device_set) == 8
    return {
        "losses": losses,
        "params": [np.asarray(a).tolist() for a in jax.tree.leaves(state.params)],
    }


mesh = jxent.train.data_mesh()
if jax.process_count() == 1:
    batches = [(x[i], y[i], where) for i in range(5)]
    results = {"single": run(None, batches), "sharded": run(mesh, batches)}
    # Curvature products on the data-parallel mesh: the batch sharded, the result as on one device.
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)
    data = NamedSharding(mesh, PartitionSpec(jxent.train.DATA_AXIS))
    for name in ("ggn_vector_product", "hessian_vector_product"):
        product = jax.jit(getattr(jxent, name)(mlp.apply, label_smoothing=0.1, z_loss=1e-3))
        one = product(params, x[0], y[0], v, where=where)
        xs, ys, ws = (jax.device_put(a, data) for a in (x[0], y[0], where))
        sharded = product(params, xs, ys, v, where=ws)
        results[name] = [
            [np.asarray(a).tolist() for a in jax.tree.leaves(t)] for t in (one, sharded)
        ]
else:
    # This process's half of every global batch, assembled into global arrays.
    sharding = NamedSharding(mesh, PartitionSpec(jxent.train.DATA_AXIS))
    half = slice(16 * jax.process_index(), 16 * (jax.process_index() + 1))

    def global_array(local, shape):
        return jax.make_array_from_process_local_data(sharding, local, shape)

    batches = [
        (
            global_array(x[i][half], x[i].shape),
            global_array(y[i][half], y[i].shape),
            global_array(where[half], where.shape),
        )
        for i in range(5)
    ]
    results = {"multiprocess": run(mesh, batches)}
if jax.process_index() == 0:  # the last line of stdout (gloo prints its own lines before it)
    print("\n" + json.dumps(results))
