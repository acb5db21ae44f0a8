"""Time jxent.check_grads on deep many-leaf MLPs (the checker issue's size targets).

Run: python -m benchmarks.check_speed [--layers 30] [--width 180] [--calls 2]

For each finite-difference mode, the first call (compilation included) and the repeated calls
(same shapes) are timed separately: the first is what a user waits for once, the later ones
what a test suite that checks several batches pays.
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

import jxent
from jxent.predictors import mlp


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_speed")
    parser.add_argument("--layers", type=int, default=30, help="linear layers (default 30)")
    parser.add_argument("--width", type=int, default=180, help="hidden width (default 180)")
    parser.add_argument("--calls", type=int, default=2, help="calls per mode (default 2)")
    args = parser.parse_args()
    sizes = [64] + [args.width] * (args.layers - 1) + [10]
    params = mlp.init(jax.random.key(0), sizes)
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    leaves = len(jax.tree.leaves(params))
    print(f"{args.layers}-layer tanh MLP, width {args.width}: {leaves} leaves, {size} parameters")
    x = jax.random.normal(jax.random.key(1), (32, 64))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 10)
    apply = functools.partial(mlp.apply, activation=jnp.tanh)
    grad_fn = jax.jit(jxent.grad(apply))
    results = {"layers": args.layers, "width": args.width, "leaves": leaves, "params": size}
    for fd in ("entries", "directions"):
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            report = jxent.check_grads(grad_fn, apply, params, x, y, fd=fd)
            times.append(time.perf_counter() - start)
        results[fd] = {"ok": report.ok, "seconds": times}
        later = ", then " + ", ".join(f"{t:.1f}" for t in times[1:]) if times[1:] else ""
        print(f"fd={fd}: ok={report.ok}, first call {times[0]:.1f} s{later} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
