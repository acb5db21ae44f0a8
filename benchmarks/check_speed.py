"""Time jxent.check_grads on a 26-leaf, ~1e6-parameter MLP (the checker issue's size target).

Run: python benchmarks/check_speed.py  (prints the median of 3 runs per finite-difference mode)
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp

import jxent
from jxent.predictors import mlp


def main() -> None:
    params = mlp.init(jax.random.key(0), [64] + [288] * 12 + [10])
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"{len(jax.tree.leaves(params))} leaves, {size} parameters, batch 32")
    x = jax.random.normal(jax.random.key(1), (32, 64))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 10)
    apply = functools.partial(mlp.apply, activation=jnp.tanh)
    grad_fn = jax.jit(jxent.grad(apply))
    for fd in ("entries", "directions"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            report = jxent.check_grads(grad_fn, apply, params, x, y, fd=fd)
            times.append(time.perf_counter() - start)
        print(f"fd={fd}: ok={report.ok}, median {statistics.median(times):.1f} s of {times}")


if __name__ == "__main__":
    main()
