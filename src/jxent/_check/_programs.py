r"""The checker's references as compiled programs, cached by predictor, options and shapes.

:func:`jxent.check_grads` needs, per call, ``jax.grad`` of the plain loss (``_plain``: no jxent
derivative under it) and finite differences of it. Built as closures over the call's data they
were retraced and recompiled on every call,
and ``jax.grad`` ran op by op; here each is one ``jax.jit`` program whose static part is the
predictor and the options that shape the program, and whose arguments are the parameters, the
data and the array options. A second check of the same model and shapes (another candidate,
another batch) reuses them, and finite differences cost their evaluations, not a compilation
per leaf or per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jxent import _fd
from jxent._options import split_static
from jxent._plain import plain_loss
from jxent._vjp import logits_only

PyTree = Any
Data = tuple[Any, Any, dict[str, Any]]  # inputs x, labels, array options


class LossKey(NamedTuple):
    """What a compiled reference is keyed on: the predictor and the static options."""

    predictor: _Predictor
    static: tuple[tuple[str, Any], ...]


class _Predictor:
    """A predictor as a static argument.

    Equal when it is the same function, or a ``functools.partial`` of the same function with
    equal (hashable) arguments -- so a partial rebuilt for every call finds its programs.
    """

    def __init__(self, fn: Callable[[PyTree, Any], jax.Array]) -> None:
        self.fn = fn
        self.identity = _identity(fn)

    def __hash__(self) -> int:
        return hash(self.identity)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Predictor) and self.identity == other.identity


def _identity(fn: Any) -> Hashable:
    if isinstance(fn, functools.partial):
        try:
            identity = (_identity(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
            hash(identity)
            return identity
        except TypeError:  # unhashable arguments: the partial object itself
            return fn
    return fn


def split(
    predictor: Callable[[PyTree, Any], jax.Array], options: dict[str, Any]
) -> tuple[LossKey, dict[str, Any]]:
    """``(key, arrays)``: the static part of a loss and its array options."""
    static, arrays = split_static(options)
    return LossKey(_Predictor(predictor), static), arrays


def _loss(key: LossKey, params: PyTree, x: Any, labels: Any, arrays: dict[str, Any]) -> jax.Array:
    logits = logits_only(key.predictor.fn(params, x))
    return plain_loss(logits, labels, **dict(key.static), **arrays)


@functools.partial(jax.jit, static_argnums=0)
def reference_grad(
    key: LossKey, params: PyTree, x: Any, labels: Any, arrays: dict[str, Any]
) -> PyTree:
    """``jax.grad`` of the plain loss: JAX's autodiff, none of jxent's derivative rules."""
    return jax.grad(_loss, argnums=1)(key, params, x, labels, arrays)


@functools.partial(jax.jit, static_argnums=(0, 1))
def entry_differences(
    key: LossKey, step: float, params: PyTree, data: Data, leaf_ids: jax.Array, entries: jax.Array
) -> jax.Array:
    """Central differences of the loss at the ``(leaf, flat entry)`` pairs, in one program."""
    return _fd.pair_differences(lambda p: _loss(key, p, *data), params, leaf_ids, entries, step)


@functools.partial(jax.jit, static_argnums=(0, 1))
def directional_differences(
    key: LossKey, step: float, params: PyTree, data: Data, directions: PyTree
) -> jax.Array:
    r""":math:`(J(\theta + hv) - J(\theta - hv)) / 2h` for each direction (leading axis)."""

    def one(v: PyTree) -> jax.Array:
        plus = jax.tree.map(lambda a, d: a + step * d, params, v)
        minus = jax.tree.map(lambda a, d: a - step * d, params, v)
        return (_loss(key, plus, *data) - _loss(key, minus, *data)) / (2 * step)

    return lax.map(one, directions)


def flat_pairs(indices: list[np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """The ``(leaf id, flat entry)`` pairs of per-leaf index lists, as int32 arrays."""
    leaf_ids = np.concatenate([np.full(len(c), i) for i, c in enumerate(indices)] or [[]])
    entries = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    return jnp.asarray(leaf_ids, jnp.int32), jnp.asarray(entries, jnp.int32)
