r"""Central finite differences of a scalar function of a parameter pytree.

.. math::

    \frac{\partial f}{\partial \theta_i} \approx
    \frac{f(\theta + h_i e_i) - f(\theta - h_i e_i)}{(\theta_i + h_i) - (\theta_i - h_i)},
    \qquad h_i = \text{step} \cdot \max(1, |\theta_i|).

The denominator is the step actually taken after rounding. The truncation error is
:math:`O(h^2)` and the rounding error :math:`O(\epsilon_{\text{mach}} |f| / h)`; with float64
(:math:`\epsilon \approx 2.2\times10^{-16}`) and the default ``step=1e-5`` both are about
:math:`10^{-10}`. In float32 (:math:`\epsilon \approx 1.2\times10^{-7}`) the rounding term alone is
:math:`\approx 10^{-2}` for the same step -- as large as the gradients being checked, which is
why jxent only trusts finite differences in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any
DEFAULT_STEP = 1e-5


def finite_difference_entries(
    f: Callable[[PyTree], jax.Array],
    params: PyTree,
    indices: Sequence[np.ndarray | None],
    *,
    step: float = DEFAULT_STEP,
    batch_size: int = 64,
) -> list[jax.Array]:
    """Central differences of ``f`` at chosen flat entries of each leaf.

    Args:
        f: Scalar function of ``params``.
        params: Parameter pytree (use float64 leaves for meaningful results).
        indices: For each leaf (in ``jax.tree.leaves`` order), the flat entry indices to
            differentiate, or ``None`` for every entry.
        step: Relative step ``h``.
        batch_size: Perturbed evaluations of ``f`` run this many at a time under ``vmap``.

    Returns:
        For each leaf, the estimated partial derivatives at its chosen entries.
    """
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, (leaf, idx) in enumerate(zip(leaves, indices, strict=True)):
        leaf = jnp.asarray(leaf)
        idx = np.arange(leaf.size) if idx is None else np.asarray(idx)
        out.append(_leaf_differences(f, leaves, treedef, i, jnp.asarray(idx), step, batch_size))
    return out


def finite_difference_grad(
    f: Callable[[PyTree], jax.Array], params: PyTree, *, step: float = DEFAULT_STEP
) -> PyTree:
    """Central-difference gradient of ``f`` at every entry of ``params``.

    Args:
        f: Scalar function of ``params``.
        params: Parameter pytree; float64 leaves for meaningful results.
        step: Relative step ``h``.

    Returns:
        A pytree shaped like ``params``.
    """
    leaves, treedef = jax.tree.flatten(params)
    values = finite_difference_entries(f, params, [None] * len(leaves), step=step)
    return treedef.unflatten(
        [v.reshape(jnp.shape(leaf)) for v, leaf in zip(values, leaves, strict=True)]
    )


def _leaf_differences(
    f: Callable[[PyTree], jax.Array],
    leaves: list[Any],
    treedef: Any,
    position: int,
    idx: jax.Array,
    step: float,
    batch_size: int,
) -> jax.Array:
    leaf = jnp.asarray(leaves[position])
    flat = leaf.ravel()

    def f_of_leaf(value: jax.Array) -> jax.Array:
        new = list(leaves)
        new[position] = value.reshape(leaf.shape)
        return f(treedef.unflatten(new))

    def one(k: jax.Array) -> jax.Array:
        h = step * jnp.maximum(1.0, jnp.abs(flat[k]))
        plus, minus = flat[k] + h, flat[k] - h
        f_plus = f_of_leaf(flat.at[k].set(plus))
        f_minus = f_of_leaf(flat.at[k].set(minus))
        return (f_plus - f_minus) / (plus - minus)

    return jax.jit(lambda ks: lax.map(one, ks, batch_size=batch_size))(idx)
