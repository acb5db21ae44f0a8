"""The clipped policy objective on 8 host devices, the batch sharded over a "data" axis.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python policy_sharded.py

For token-mean and sequence-mean, three ways: ``jit`` of the whole-batch objective on sharded
arrays (the denominator a ``jnp.sum`` over every device), ``shard_map`` (each device's count
``psum``-ed), and two micro-batches under ``lax.scan`` on the mesh. Prints one JSON object (last
line): for each case the largest error of the loss and of its gradient against the objective
written plainly on one device in float64 (relative to the largest reference entry), or the
error message when it raised. ``tests/test_policy.py`` asserts on it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 8, jax.devices()
B, T, D, V = 16, 6, 5, 7
OPTIONS = {"epsilon": 0.2, "epsilon_high": 0.28, "kl_coef": 0.05, "entropy_coef": 0.01}
keys = jax.random.split(jax.random.key(0), 9)
params = {"w": jax.random.normal(keys[0], (D, V)), "b": jax.random.normal(keys[1], (V,))}
x = jax.random.normal(keys[2], (B, T, D))
y = jax.random.randint(keys[3], (B, T), 0, V)
lengths = np.array(jax.random.randint(keys[4], (B,), 0, T + 1))
lengths[:2] = 0  # device 0 holds no counted token: its counts are 0, not 1
starts = np.asarray(jax.random.randint(keys[5], (B,), 0, T)) * (lengths < T)
where = jnp.asarray(
    (np.arange(T) >= starts[:, None]) & (np.arange(T) < (starts + lengths)[:, None])
)
advantages = jax.random.normal(keys[6], (B,))


def log_probs(params, x, y):
    logits = x @ params["w"] + params["b"].reshape(1, 1, V)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def shifted(scale, key):
    return jax.tree.map(lambda a: a + scale * jax.random.normal(key, a.shape), params)


old_log_prob = log_probs(shifted(0.4, keys[7]), x, y)[0]
ref_log_prob = log_probs(shifted(0.3, keys[8]), x, y)[0]
batch = (x, y, where, advantages, old_log_prob, ref_log_prob)


def plain(params, loss_type):
    """The objective from its definition, on the whole batch, no jxent code."""
    log_prob, entropy = log_probs(params, x, y)
    r = jnp.exp(log_prob - old_log_prob)
    a = advantages[:, None]
    clipped = jnp.clip(r, 1 - OPTIONS["epsilon"], 1 + OPTIONS["epsilon_high"])
    log_rho = ref_log_prob - log_prob
    per_token = (
        -jnp.minimum(r * a, clipped * a)
        + OPTIONS["kl_coef"] * (jnp.exp(log_rho) - log_rho - 1)
        - OPTIONS["entropy_coef"] * entropy
    )
    per_token = jnp.where(where, per_token, 0.0)
    if loss_type == "token_mean":
        return jnp.sum(per_token) / jnp.sum(where)
    n = jnp.sum(where, axis=-1)
    means = jnp.sum(per_token, axis=-1) / jnp.maximum(n, 1)
    return jnp.sum(means) / jnp.sum(n > 0)


def objective(params, batch, loss_type, denominator=None):
    x, y, where, advantages, old, ref = batch
    log_prob, entropy = log_probs(params, x, y)
    return jxent.policy_loss(
        log_prob,
        old,
        advantages,
        where=where,
        ref_log_prob=ref,
        entropy=entropy,
        loss_type=loss_type,
        denominator=denominator,
        **OPTIONS,
    )[0]


def on_jit(params, batch, loss_type):
    # The whole-batch call: policy_denominator's sum (inside policy_loss) spans the devices.
    return objective(params, batch, loss_type)


def on_shard_map(params, batch, loss_type):
    def local(params, batch):
        count = jxent.policy_denominator(batch[2], loss_type=loss_type)
        denominator = jax.lax.psum(count, "data")
        return jax.lax.psum(objective(params, batch, loss_type, denominator), "data")

    specs = (P(), tuple(P("data") for _ in batch))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(params, batch)


def on_microbatches(params, batch, loss_type, k=2):
    denominator = jxent.policy_denominator(batch[2], loss_type=loss_type)
    # Micro-batch j holds rows j, j + k, ...: every device keeps its share of each.
    micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(-1, k, *a.shape[1:]), 0, 1), batch)

    def add(total, one):
        return total + objective(params, one, loss_type, denominator), None

    return jax.lax.scan(add, jnp.zeros(()), micro)[0]


def error(got, want):
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(a) - b))) for a, b in pairs)
    return diff / max(float(jnp.max(jnp.abs(b))) for _, b in pairs)


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # the test reports the message
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


mesh = jax.make_mesh((8,), ("data",))
sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
assert all(len(a.sharding.device_set) == 8 for a in sharded)
replicated = jax.device_put(params, NamedSharding(mesh, P()))
results = {}
for loss_type in ("token_mean", "sequence_mean"):
    want = jax.value_and_grad(plain)(params, loss_type)
    for name, fn in (("jit", on_jit), ("shard_map", on_shard_map), ("micro", on_microbatches)):
        run = jax.jit(jax.value_and_grad(fn), static_argnums=2)
        results[f"{loss_type}/{name}"] = attempt(
            lambda run=run, loss_type=loss_type, want=want: error(
                run(replicated, sharded, loss_type), want
            )
        )
print(json.dumps(results))
