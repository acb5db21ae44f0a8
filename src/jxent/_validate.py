"""Eager argument checks: every message names the argument, what was expected and what was found."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "sum", "none")


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds numbers now, i.e. we are not inside a trace."""
    return value is None or not isinstance(value, jax.core.Tracer)


def check_logits(logits: jax.Array, axis: int) -> int:
    """Checks the logits' dtype and rank and returns ``axis`` as a non-negative index."""
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must have a floating dtype, found {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one (class) axis, found a scalar")
    if not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"axis={axis} is out of range for logits of rank {logits.ndim}")
    return axis % logits.ndim


def check_labels(logits: jax.Array, labels: jax.Array, axis: int) -> bool:
    """Checks labels against logits; returns True for probability (soft) labels."""
    batch_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != batch_shape:
            raise ValueError(
                f"integer labels must have shape {batch_shape} (logits {logits.shape} without "
                f"the class axis {axis}), found {labels.shape}"
            )
        return False
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits.shape:
            raise ValueError(
                f"probability labels (floating dtype) must have the logits' shape "
                f"{logits.shape}, found {labels.shape}; pass integer class indices of shape "
                f"{batch_shape} for hard labels"
            )
        return True
    raise TypeError(
        f"labels must be integer class indices or floating probabilities, found dtype "
        f"{labels.dtype}"
    )


def check_label_range(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    where: jax.Array | None,
) -> None:
    """Raises ``ValueError`` naming the first counted label outside ``[0, num_classes)``.

    Only runs when the labels (and ``where``) are concrete; under ``jit`` the NaN policy of
    :func:`jxent.loss_and_logits_grad` applies instead.
    """
    if not (is_concrete(labels) and is_concrete(where)):
        return
    y = np.asarray(labels)
    bad = (y < 0) | (y >= num_classes)
    if ignore_index is not None:
        bad &= y != ignore_index
    if where is not None:
        bad &= np.asarray(where)
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


def check_options(
    *,
    batch_shape: tuple[int, ...],
    num_classes: int,
    soft: bool,
    reduction: str,
    weights: jax.Array | None,
    where: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: float,
    z_loss: float,
    logit_softcap: float | None,
) -> None:
    """Checks the loss options that do not depend on label values."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, found {reduction!r}")
    if weights is not None:
        if weights.shape != (num_classes,):
            raise ValueError(
                f"weights must have shape ({num_classes},), one per class, found {weights.shape}"
            )
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise TypeError(f"weights must have a floating dtype, found {weights.dtype}")
    if where is not None:
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, found dtype {where.dtype}")
        if where.shape != batch_shape:
            raise ValueError(
                f"where must have the labels' batch shape {batch_shape}, found {where.shape}"
            )
    if ignore_index is not None:
        if soft:
            raise ValueError(
                "ignore_index applies to integer labels only; mask probability labels with where="
            )
        if not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be a Python int or None, found {ignore_index!r}")
    _check_static_number("label_smoothing", label_smoothing, 0.0, 1.0)
    _check_static_number("z_loss", z_loss, 0.0, float("inf"))
    if logit_softcap is not None:
        _check_static_number("logit_softcap", logit_softcap, 0.0, float("inf"))
        if logit_softcap == 0:
            raise ValueError("logit_softcap must be positive (or None for no cap), found 0")


def _check_static_number(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, found {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], found {value}")
