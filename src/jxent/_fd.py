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
from jax.flatten_util import ravel_pytree

PyTree = Any
DEFAULT_STEP = 1e-5


def finite_difference_entries(
    f: Callable[[PyTree], jax.Array],
    params: PyTree,
    indices: Sequence[np.ndarray | None],
    *,
    step: float = DEFAULT_STEP,
    batch_size: int = 1,
) -> list[jax.Array]:
    """Central differences of ``f`` at chosen flat entries of each leaf.

    All entries of all leaves are differentiated by one compiled function (a ``lax.map`` over
    ``(leaf, entry)`` pairs), so the cost is one compilation plus two evaluations of ``f`` per
    entry, whatever the number of leaves.

    Args:
        f: Scalar function of ``params``.
        params: Parameter pytree (use float64 leaves for meaningful results).
        indices: For each leaf (in ``jax.tree.leaves`` order), the flat entry indices to
            differentiate, or ``None`` for every entry.
        step: Relative step ``h``.
        batch_size: Evaluations of ``f`` vectorised at a time. The default, 1, compiles
            fastest; on CPU larger batches did not make up for their longer compilation.

    Returns:
        For each leaf, the estimated partial derivatives at its chosen entries.
    """
    leaves = jax.tree.leaves(params)
    chosen = [
        np.arange(np.size(leaf)) if idx is None else np.asarray(idx, np.int64)
        for leaf, idx in zip(leaves, indices, strict=True)
    ]
    leaf_ids = np.concatenate([np.full(len(c), i) for i, c in enumerate(chosen)] or [[]])
    entries = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    run = jax.jit(lambda p, ids, ks: pair_differences(f, p, ids, ks, step, batch_size))
    values = run(params, jnp.asarray(leaf_ids, jnp.int32), jnp.asarray(entries, jnp.int32))
    splits = np.cumsum([len(c) for c in chosen])[:-1]
    return list(jnp.split(values, splits))


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


def pair_differences(
    f: Callable[[PyTree], jax.Array],
    params: PyTree,
    leaf_ids: jax.Array,
    entries: jax.Array,
    step: float,
    batch_size: int = 1,
) -> jax.Array:
    """Central differences of ``f`` at each ``(leaf_ids[j], entries[j])`` pair (traceable).

    One ``lax.map`` over the pairs: the program holds ``f`` twice, whatever the number of leaves.
    """
    # All leaves as one flat vector: one dynamic update per evaluation keeps the program small
    # (per-leaf updates compile one branch per leaf: a deep model's program grows with it).
    flat, unravel = ravel_pytree(params)
    sizes = [np.size(leaf) for leaf in jax.tree.leaves(params)]
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]), jnp.int32)

    def one(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
        leaf_id, k = pair
        index = offsets[leaf_id] + k
        value = flat[index]
        h = step * jnp.maximum(1.0, jnp.abs(value))
        plus, minus = value + h, value - h

        def evaluate(new_value: jax.Array) -> jax.Array:
            return f(unravel(flat.at[index].set(new_value)))

        return (evaluate(plus) - evaluate(minus)) / (plus - minus)

    return lax.map(one, (leaf_ids, entries), batch_size=batch_size)
