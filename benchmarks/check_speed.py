"""Time jxent.check_grads on a 26-leaf, ~1e6-parameter MLP (the checker issue's size target)."""

import functools
import time

import jax
import jax.numpy as jnp

import jxent
from jxent.predictors import mlp

sizes = [64] + [288] * 12 + [10]
params = mlp.init(jax.random.key(0), sizes)
n = sum(l.size for l in jax.tree.leaves(params))
print("leaves", len(jax.tree.leaves(params)), "entries", n)
x = jax.random.normal(jax.random.key(1), (32, 64))
y = jax.random.randint(jax.random.key(2), (32,), 0, 10)
apply = functools.partial(mlp.apply, activation=jnp.tanh)
g = jax.jit(jxent.grad(apply))
for fd in ["entries", "directions"]:
    t = time.perf_counter()
    r = jxent.check_grads(g, apply, params, x, y, fd=fd)
    print(fd, r.ok, time.perf_counter() - t)
print(r.diagnosis.message)
