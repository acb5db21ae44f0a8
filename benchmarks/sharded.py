"""Sharded like the batch: the fused head on 8 CPU devices, and micro-batching's memory.

    python -m benchmarks.sharded [--quick] [--repeats R]

Runs itself in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` when
fewer devices are visible. Prints one JSON line (last line) with:

- ``head``: ``jax.value_and_grad`` of ``jxent.linear_cross_entropy`` (w.r.t. ``x`` and ``w``)
  with the tokens sharded ``P("data")`` over 8 devices (Auto and Explicit meshes), and of the
  materialised ``jax.nn`` loss the same way, each timed interleaved with its one-device run
  (median of the rounds). On forced CPU devices all 8 share the machine's cores, so time
  measures total work: a ratio near 1 means each device did its 1/8 (the issue's 8.4 was every
  device scanning every token).
- ``microbatch``: XLA's scratch memory (``compiled.memory_analysis().temp_size_in_bytes``) of a
  training step of an MLP whose activations dominate, with ``microbatches=k`` against the whole
  batch -- read from the compiled program, so it does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

DEVICES = 8


def _head(quick: bool, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jxent

    n, d, vocab = (1024, 32, 512) if quick else (16384, 128, 4096)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, d))
    w = jax.random.normal(keys[1], (d, vocab)) * 0.05
    y = jax.random.randint(keys[2], (n,), 0, vocab)

    def materialised(x, w, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x @ w), y[:, None], axis=1))

    losses = {"fused": jxent.linear_cross_entropy, "materialised": materialised}
    meshes = {
        "auto": Mesh(np.array(jax.devices()), ("data",)),
        "explicit": jax.make_mesh((DEVICES,), ("data",)),
    }
    runs = {}
    for name, loss in losses.items():
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        runs[f"{name} one device"] = _compiled(fn, x, w, y)
        for kind, mesh in meshes.items():
            tokens = NamedSharding(mesh, P("data"))
            args = (jax.device_put(x, tokens), jax.device_put(w, NamedSharding(mesh, P())))
            runs[f"{name} sharded ({kind})"] = _compiled(fn, *args, jax.device_put(y, tokens))
    times = _interleaved(runs, repeats)
    ratios = {
        f"{name} sharded ({kind}) / one device": times[f"{name} sharded ({kind})"]
        / times[f"{name} one device"]
        for name in losses
        for kind in meshes
    }
    return {"shape": {"N": n, "D": d, "L": vocab}, "median_s": times, "ratios": ratios}


def _compiled(fn: Any, *args: Any) -> Any:
    import jax

    compiled = fn.lower(*args).compile()

    def run() -> Any:
        return jax.block_until_ready(compiled(*args))

    run()
    return run


def _interleaved(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _microbatch(quick: bool) -> dict[str, Any]:
    import jax
    import optax

    import jxent
    from jxent.predictors import mlp

    batch, sizes = (256, [64, 256, 256, 10]) if quick else (4096, [256, 2048, 2048, 10])
    params = mlp.init(jax.random.key(0), sizes)
    opt = optax.adam(1e-3)
    state = jxent.train.init_state(params, opt)
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    scratch = {}
    for k in (1, 2, 4, 8):
        step = jxent.train.make_step(mlp.apply, opt, microbatches=k)
        # jit of the step's Python wrapper traces the jitted step inside: one program.
        analysis = jax.jit(step).lower(state, x, y).compile().memory_analysis()
        scratch[k] = analysis.temp_size_in_bytes
    activations = batch * sum(sizes[1:-1]) * 4 * 2  # forward values and their cotangents
    return {
        "batch": batch,
        "sizes": sizes,
        "activations_bytes": activations,
        "scratch_bytes": {str(k): v for k, v in scratch.items()},
        "scratch_ratio": {str(k): scratch[k] / scratch[1] for k in scratch},
        "target_ratio": {str(k): 1 / k + 0.1 for k in scratch},
    }


def measure(quick: bool, repeats: int) -> dict[str, Any]:
    import jax

    assert jax.device_count() == DEVICES, jax.devices()
    return {"head": _head(quick, repeats), "microbatch": _microbatch(quick)}


def run(quick: bool, repeats: int) -> dict[str, Any]:
    """The measurements, from a subprocess with 8 forced CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    cmd = [sys.executable, "-m", "benchmarks.sharded", "--repeats", str(repeats)]
    out = subprocess.run(
        cmd + (["--quick"] if quick else []), capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(res: dict[str, Any]) -> list[str]:
    head, micro = res["head"], res["microbatch"]
    shape = head["shape"]
    lines = [
        f"Sharded like the batch (8 forced CPU devices sharing the cores; N={shape['N']}, "
        f'D={shape["D"]}, L={shape["L"]}): time with the tokens sharded over `"data"` / time on '
        "one device (target for the fused head: <= 1.3)",
        "",
        "| loss | ratio |",
        "|---|---|",
    ]
    lines += [f"| {name} | {ratio:.2f} |" for name, ratio in head["ratios"].items()]
    lines += [
        "",
        f"Micro-batched step, MLP {micro['sizes']} on a batch of {micro['batch']}: XLA scratch "
        "memory / the whole-batch step's (target <= 1/k + 0.1)",
        "",
        "| k | scratch (MiB) | ratio | target |",
        "|---|---|---|---|",
    ]
    for k, ratio in micro["scratch_ratio"].items():
        mib = micro["scratch_bytes"][k] / 2**20
        lines.append(f"| {k} | {mib:.1f} | {ratio:.3f} | {micro['target_ratio'][k]:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    args = parser.parse_args()
    import jax

    if jax.device_count() < DEVICES:
        res = run(args.quick, args.repeats)
    else:
        res = measure(args.quick, args.repeats)
    print("\n".join(markdown(res)), file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
