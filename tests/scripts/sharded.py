"""The linear head and the training step with the batch sharded over 8 host devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded.py

For each mesh (Auto and Explicit axes, 1-D and 2-D, inside ``jax.set_mesh`` too) and each case,
computes on sharded inputs and on one device and prints one JSON object (last line) of
measurements that ``tests/test_sharded.py`` asserts on: the largest error against one device,
the shardings of the outputs, and what the compiled program moves and multiplies (all-gathers,
dot shapes) -- the per-device work is read from the program, not timed.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent.predictors import mlp

assert jax.device_count() == 8, jax.devices()
N, D, L = 512, 32, 300
CHUNK, BLOCK = 16, 128
keys = jax.random.split(jax.random.key(0), 8)
x = jax.random.normal(keys[0], (N, D))
w = jax.random.normal(keys[1], (D, L)) * 0.3
bias = jax.random.normal(keys[2], (L,)) * 0.1
y = jax.random.randint(keys[3], (N,), 0, L).at[::9].set(-100)
q = jax.nn.softmax(jax.random.normal(keys[4], (N, L)))
where = jnp.arange(N) % 7 != 3
x_dot, w_dot = jax.random.normal(keys[5], (N, D)), jax.random.normal(keys[6], (D, L))
weights = jax.random.uniform(keys[7], (L,), minval=0.5, maxval=2.0)

MESHES = {
    "auto": lambda: Mesh(np.array(jax.devices()), ("data",)),
    "explicit": lambda: jax.make_mesh((8,), ("data",)),
    "auto_2d": lambda: Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model")),
    "explicit_2d": lambda: jax.make_mesh((4, 2), ("data", "model")),
}
CASES = {
    "mean": dict(labels=y, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3),
    "sum_weights_cap": dict(
        labels=y, ignore_index=-100, reduction="sum", weights=weights, logit_softcap=5.0
    ),
    "none_where": dict(labels=jnp.abs(y), where=where, reduction="none"),
    "soft": dict(labels=q, label_smoothing=0.2),
}


def max_error(a, b):
    """Largest difference over all leaves, relative to the largest reference entry."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in pairs)
    return diff / max(float(jnp.max(jnp.abs(v))) for _, v in pairs)


def program(fn, *args):
    """What the compiled program does: its all-gathers' element counts and its dot shapes."""
    text = fn.lower(*args).compile().as_text()
    gathers = []
    for line in text.splitlines():
        m = re.search(r"= \w+\[([0-9,]*)\][^ ]* all-gather\(", line)
        if m:
            gathers.append(int(np.prod([int(d) for d in m.group(1).split(",") if d])))
    dots = sorted(set(re.findall(r"= f32\[([0-9,]+)\][^ ]* dot\(", text)))
    return {"gathers": gathers, "dots": dots}


def spec(a):
    return [None if s is None else str(s) for s in a.sharding.spec]


def head_loss(case):
    options = {k: v for k, v in CASES[case].items() if k not in ("labels", "where")}
    reduce = jnp.sum if options.get("reduction") == "none" else (lambda v: v)

    def f(x, w, bias, labels, where=None):
        extra = {} if where is None else {"where": where}
        out = jxent.linear_cross_entropy(
            x, w, labels, bias=bias, chunk_size=CHUNK, vocab_block_size=BLOCK, **options, **extra
        )
        return reduce(out)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def head_cases(mesh):
    out = {}
    tokens = NamedSharding(mesh, P("data"))
    for case, spec_ in CASES.items():
        fn = head_loss(case)
        labels = spec_["labels"]
        args = (x, w, bias, labels) + ((where,) if "where" in spec_ else ())
        ref = fn(*args)
        sharded = jax.device_put(args[:1], tokens) + args[1:3] + jax.device_put(args[3:], tokens)
        got = fn(*sharded)
        out[case] = {"error": max_error(got, ref), "dx": spec(got[1][0]), **program(fn, *sharded)}
    return out


def other_layouts(mesh):
    """x replicated beside sharded labels; x sharded on its features: whole rows all the same."""
    fn = head_loss("mean")
    ref = fn(x, w, bias, y)
    tokens, features = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))
    labels_only = (x, w, bias, jax.device_put(y, tokens))
    x_features = (jax.device_put(x, features), w, bias, y)
    return {
        "labels_only": max_error(fn(*labels_only), ref),
        "x_features": max_error(fn(*x_features), ref),
    }


def fsdp_w(mesh):
    """``W`` sharded FSDP-style ``P("data", None)``: gathered once per call, never per chunk."""
    fn = head_loss("mean")
    tokens = NamedSharding(mesh, P("data"))
    args = (
        jax.device_put(x, tokens),
        jax.device_put(w, NamedSharding(mesh, P("data", None))),
        bias,
        jax.device_put(y, tokens),
    )
    return {"error": max_error(fn(*args), fn(x, w, bias, y)), **program(fn, *args)}


def ggn_and_samples(mesh):
    tokens = NamedSharding(mesh, P("data"))
    ggn = jax.jit(
        lambda x, w, y, xd, wd: jxent.linear_cross_entropy_ggn_vector_product(
            x,
            w,
            y,
            (xd, wd, None),
            chunk_size=CHUNK,
            vocab_block_size=BLOCK,
            ignore_index=-100,
            z_loss=1e-3,
        )[:2]
    )
    sample = jax.jit(
        lambda key, x, w: jxent.linear_sample_labels(
            key, x, w, chunk_size=CHUNK, vocab_block_size=BLOCK, logit_softcap=4.0
        )
    )
    sx, sy, sxd = jax.device_put((x, y, x_dot), tokens)
    g = ggn(sx, w, sy, sxd, w_dot)
    s = sample(keys[7], sx, w)
    return {
        "ggn": {
            "error": max_error(g, ggn(x, w, y, x_dot, w_dot)),
            "gx": spec(g[0]),
            **program(ggn, sx, w, sy, sxd, w_dot),
        },
        "samples": {
            "equal": bool(jnp.all(s == sample(keys[7], x, w))),
            "spec": spec(s),
            **program(sample, keys[7], sx, w),
        },
    }


def vocab_parallel():
    """The vocab-parallel loss on make_mesh (Explicit) and Mesh (Auto) meshes, 1-D and 2-D."""
    out = {}
    meshes = {
        "explicit": jax.make_mesh((8,), ("vocab",)),
        "auto": Mesh(np.array(jax.devices()), ("vocab",)),
        "explicit_2d": jax.make_mesh((4, 2), ("data", "vocab")),
        "auto_2d": Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "vocab")),
    }
    ref = head_loss("mean")(x, w[:, :296], bias[:296], jnp.abs(y) % 296)
    for name, mesh in meshes.items():
        fn = jax.jit(
            jax.value_and_grad(
                lambda x, w, b, y, mesh=mesh: jxent.vocab_parallel_linear_cross_entropy(
                    x,
                    w,
                    y,
                    mesh=mesh,
                    bias=b,
                    chunk_size=CHUNK,
                    label_smoothing=0.1,
                    ignore_index=-100,
                    z_loss=1e-3,
                ),
                argnums=(0, 1, 2),
            )
        )
        args = (x, w[:, :296], bias[:296], jnp.abs(y) % 296)
        got = fn(*args)
        out[name] = {
            "error": max_error(got, ref),
            "dx": spec(got[1][0]),
            "dw": spec(got[1][1]),
            **program(fn, *args),
        }
    return out


def steps(mesh):
    """make_step on the mesh (whole batch and 4 micro-batches) against one device."""
    params = mlp.init(jax.random.key(1), [D, 16, 5])
    labels = jnp.abs(y[:64]) % 5
    batch_where = jnp.arange(64) < 40  # micro-batches count different numbers of examples
    opt = optax.sgd(0.5)
    options = dict(label_smoothing=0.1, z_loss=1e-3, weights=jnp.array([1.0, 2, 3, 1, 0.5]))
    one, _ = jxent.train.make_step(mlp.apply, opt, **options)(
        jxent.train.init_state(params, opt), x[:64], labels, where=batch_where
    )
    out = {}
    for k in (1, 4):
        step = jxent.train.make_step(mlp.apply, opt, mesh=mesh, microbatches=k, **options)
        state, _ = step(jxent.train.init_state(params, opt), x[:64], labels, where=batch_where)
        out[f"microbatches_{k}"] = max_error(state.params, one.params)
    return out


def main():
    results = {}
    for name, make in MESHES.items():
        mesh = make()
        results[name] = {
            "head": head_cases(mesh),
            "fsdp": fsdp_w(mesh),
            "layouts": other_layouts(mesh),
            **ggn_and_samples(mesh),
            "steps": steps(mesh),
        }
    mesh = MESHES["explicit"]()
    with jax.set_mesh(mesh):
        results["set_mesh"] = {"head": head_cases(mesh), "steps": steps(mesh)}
    results["vocab_parallel"] = vocab_parallel()
    print(json.dumps(results))


main()
