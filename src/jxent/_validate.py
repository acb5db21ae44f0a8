"""Eager argument checks: every message names the argument, what was expected and what was found."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jxent._options import is_concrete


class Layout(NamedTuple):
    """Where the class axes are: logits go to ``[rows, L]`` and gradients come back."""

    perm: tuple[int, ...]  # batch axes, then class axes
    batch_shape: tuple[int, ...]
    class_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """``L``: the product of the class axes' sizes."""
        return math.prod(self.class_shape)

    @property
    def num_rows(self) -> int:
        """The number of examples."""
        return math.prod(self.batch_shape)

    def to_rows(self, a: jax.Array) -> jax.Array:
        """``[..., classes, ...] -> [rows, L]``."""
        return jnp.transpose(a, self.perm).reshape(self.num_rows, self.num_classes)

    def from_rows(self, a: jax.Array) -> jax.Array:
        """``[rows, L] -> [..., classes, ...]`` (the inverse of :meth:`to_rows`)."""
        a = a.reshape(self.batch_shape + self.class_shape)
        return jnp.transpose(a, tuple(int(i) for i in np.argsort(self.perm)))


def check_logits(logits: jax.Array, axis: int | tuple[int, ...], name: str = "logits") -> Layout:
    """Checks the logits' dtype, rank and class axes; returns where the classes are."""
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, found {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError(f"{name} must have at least one (class) axis, found a scalar")
    axes = (axis,) if not isinstance(axis, tuple) else axis
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"axis must be an int or a non-empty tuple of ints, found {axis!r}")
    for a in axes:
        if not -logits.ndim <= a < logits.ndim:
            raise ValueError(f"axis={axis} is out of range for {name} of rank {logits.ndim}")
    axes = tuple(a % logits.ndim for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis={axis} names an axis twice")
    batch = tuple(i for i in range(logits.ndim) if i not in axes)
    layout = Layout(
        batch + axes,  # class axes flattened in the order given, as optax does
        tuple(logits.shape[i] for i in batch),
        tuple(logits.shape[i] for i in axes),
    )
    if layout.num_classes == 0:
        raise ValueError(
            f"{name} must have at least one class, found {name} of shape {logits.shape} with "
            f"0 classes along axis={axis}"
        )
    return layout


def check_labels(logits_shape: tuple[int, ...], labels: jax.Array, layout: Layout) -> bool:
    """Checks labels against logits; returns True for probability (soft) labels."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != layout.batch_shape:
            raise ValueError(
                f"integer labels must have shape {layout.batch_shape} (logits {logits_shape} "
                f"without the class axes), found {labels.shape}"
            )
        return False
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits_shape:
            raise ValueError(
                f"probability labels (floating dtype) must have the logits' shape "
                f"{logits_shape}, found {labels.shape}; pass integer class indices of shape "
                f"{layout.batch_shape} for hard labels"
            )
        return True
    raise TypeError(
        f"labels must be integer class indices or floating probabilities, found dtype "
        f"{labels.dtype}"
    )


def check_where(
    where: Any, logits_shape: tuple[int, ...], layout: Layout
) -> tuple[jax.Array | None, jax.Array | None]:
    """``where`` as a per-example mask ``[rows]`` and/or a per-logit mask ``[rows, L]``.

    A mask with the batch shape (or broadcastable to it) masks examples; one with the logits'
    rank, broadcastable to the logits' shape, masks individual logits (optax's ``where``). A
    per-logit mask that is constant along the class axes is an example mask.
    """
    if where is None:
        return None, None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, found dtype {where.dtype}")
    rank = len(logits_shape)
    try:
        if where.ndim == rank:
            full = jnp.broadcast_to(where, logits_shape)
            class_sizes = [where.shape[i] for i in layout.perm[len(layout.batch_shape) :]]
            if any(n != 1 for n in class_sizes):
                return None, layout.to_rows(full)
            where = jnp.transpose(where, layout.perm).reshape(
                tuple(where.shape[i] for i in layout.perm[: len(layout.batch_shape)])
            )
        return jnp.broadcast_to(where, layout.batch_shape).reshape(-1), None
    except ValueError:
        raise ValueError(
            f"where must have the examples' shape {layout.batch_shape} (a mask per example) or "
            f"be broadcastable to the logits' shape {logits_shape} (a mask per logit), found "
            f"{where.shape}"
        ) from None


def check_label_range(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    where: jax.Array | None,
) -> None:
    """Raises ``ValueError`` naming the first counted label outside ``[0, num_classes)``.

    Only runs when the labels (and ``where``) are concrete; under ``jit`` the NaN policy of
    :func:`jxent.loss_and_logits_grad` applies instead. Works in the labels' own dtype, which
    numpy compares against Python ints without wrapping.
    """
    if not (is_concrete(labels) and is_concrete(where)):
        return
    y = np.asarray(labels)
    bad = (y < 0) | (y >= num_classes)
    if ignore_index is not None:
        bad &= y != ignore_index
    if where is not None:
        bad &= np.asarray(where).reshape(y.shape)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = f"0..{num_classes - 1}"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        where_txt = pos[0] if len(pos) == 1 else pos
        raise ValueError(
            f"label out of range: labels[{where_txt}] = {int(y[pos])}, expected {allowed} "
            f"({int(bad.sum())} bad label(s) in all)"
        )
