r"""The loss options, validated once into one object that every schedule takes.

:class:`Config` holds the Python-level choices (hashable, so it can key a ``jax.custom_jvp``
and a cache); :class:`Arrays` holds what may be traced: class weights, the smoothing
:math:`\varepsilon` and the z-loss coefficient :math:`z` (scalars, so a schedule under ``jit``
works). :func:`prepare` checks everything a user passes and is the only place that knows the
option names.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _jax_config
from jax.typing import ArrayLike

REDUCTIONS = ("mean", "sum", "none")

# On while jxent.checked traces its function: the losses then add a checkify check for bad
# labels. A JAX config state in the trace context, so a function jitted outside checked is
# traced again inside it (and the other way round). Off, no program carries an effect, so every
# jxent program exports and serializes. JAX has no public way to add a state to the jit key.
CHECKING = _jax_config.bool_state(
    name="jxent_checked_labels",
    default=False,
    help="jxent: trace label-range checks for jxent.checked (set by it, not by hand)",
    include_in_jit_key=True,
    include_in_trace_context=True,
)
OPTION_NAMES = (
    "axis",
    "reduction",
    "weights",
    "where",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "logit_softcap",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The static part of the options (hashable).

    Attributes:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        num_classes: ``L``.
        soft: Probability labels (True) or integer class indices (False).
        ignore_index: Integer label value that does not count, or None.
        logit_softcap: The cap ``c`` or None.
        has_weights: Class weights were given.
        has_smoothing: ``label_smoothing`` is traced or non-zero.
        has_z_loss: ``z_loss`` is traced or non-zero.
        class_mask: ``where`` masks individual logits (optax's per-logit ``where``).
        checked: Traced inside :func:`jxent.checked`: bad labels raise through checkify.
    """

    reduction: str
    num_classes: int
    soft: bool
    ignore_index: int | None = None
    logit_softcap: float | None = None
    has_weights: bool = False
    has_smoothing: bool = False
    has_z_loss: bool = False
    class_mask: bool = False
    checked: bool = False


class Arrays(NamedTuple):
    """The traceable part of the options, in the compute dtype."""

    weights: jax.Array  # [L]; ones when no weights were given
    label_smoothing: jax.Array  # scalar epsilon
    z_loss: jax.Array  # scalar z


# Options that shape a loss's program; with Python scalars they are the static part of a jitted
# loss (hashable, and validated at trace time as eagerly), the rest are traced arrays.
STRUCTURAL_OPTIONS = ("axis", "reduction", "ignore_index", "logit_softcap")


def split_static(options: dict[str, Any]) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """``(static, arrays)``: structural options and Python scalars, sorted; the array options."""
    static, arrays = [], {}
    for name, value in options.items():
        if name in STRUCTURAL_OPTIONS or isinstance(value, (int, float)):
            static.append((name, value))
        else:
            arrays[name] = value
    return tuple(sorted(static)), arrays


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds numbers now, i.e. it is not a tracer."""
    return value is None or not isinstance(value, jax.core.Tracer)


def check_option_names(
    options: dict[str, Any], function: str, parameters: tuple[str, ...] = ()
) -> None:
    """Raises ``TypeError`` naming ``function`` and the closest option for a misspelled one.

    ``parameters``: the function's own keyword parameters, suggested too (``microbatch=`` to
    ``make_step`` means ``microbatches=``, not a loss option).
    """
    for name in options:
        if name not in OPTION_NAMES:
            close = difflib.get_close_matches(name, OPTION_NAMES + tuple(parameters), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{function}() got an unknown loss option {name!r}{hint} "
                f"(options: {', '.join(OPTION_NAMES)})"
            )


def suggests_misspellings(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose misspelled keyword arguments raise a ``TypeError`` suggesting the closest.

    For public functions that spell their options out (``linear_cross_entropy``): Python's own
    message names the unknown argument but not the one meant. The signature stays ``fn``'s.
    """
    known = inspect.signature(fn).parameters  # once: the wrapper runs on every eager call

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{fn.__name__}() got an unexpected keyword argument {unknown[0]!r}{hint}"
            )
        return fn(*args, **kwargs)

    return wrapper


def merged(factory: dict[str, Any], call: dict[str, Any], function: str) -> dict[str, Any]:
    """The options of one call: those given to the factory, overridden by the call's own.

    ``jxent.value_and_grad(predictor, **factory)(params, x, labels, **call)`` and every other
    factory (``make_step``, ``ggn_vector_product``, the diagonals) merge this way, here only.
    """
    check_option_names(call, function)
    return {**factory, **call}


def require_scalar(options: dict[str, Any], function: str) -> None:
    """Raises ``ValueError`` when ``options`` ask for ``reduction="none"`` (one loss needed)."""
    if options.get("reduction", "mean") == "none":
        raise ValueError(
            f"{function} needs one loss: reduction 'mean' or 'sum', found 'none' (the gradient "
            "of the per-example losses summed is the 'sum' one)"
        )


def reject_structural(options: dict[str, Any], function: str) -> None:
    """Structural options belong to the factory, not a traced call (checked before ``jit``)."""
    for name in STRUCTURAL_OPTIONS:
        if name in options:
            raise TypeError(
                f"{name}= shapes the compiled {function}: give it to the factory "
                f"({function}'s maker, e.g. make_step(..., {name}=...)), not to the call "
                "(per-call options are arrays such as where=)"
            )


def prepare(
    *,
    batch_shape: tuple[int, ...],
    num_classes: int,
    soft: bool,
    compute_dtype: Any,
    reduction: str,
    weights: ArrayLike | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    logit_softcap: float | None,
    class_mask: bool = False,
) -> tuple[Config, Arrays]:
    """Validates the options that do not depend on label values; returns them as one object."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, found {reduction!r}")
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != (num_classes,):
            raise ValueError(
                f"weights must have shape ({num_classes},), one per class, found {weights.shape}"
            )
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise TypeError(f"weights must have a floating dtype, found {weights.dtype}")
    if ignore_index is not None:
        if soft:
            raise ValueError(
                "ignore_index applies to integer labels only; mask probability labels with where="
            )
        if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be a Python int or None, found {ignore_index!r}")
    eps = _scalar("label_smoothing", label_smoothing, 0.0, 1.0, compute_dtype)
    z = _scalar("z_loss", z_loss, 0.0, float("inf"), compute_dtype)
    check_softcap(logit_softcap)
    config = Config(
        reduction=reduction,
        num_classes=num_classes,
        soft=soft,
        ignore_index=None if ignore_index is None else int(ignore_index),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        has_weights=weights is not None,
        has_smoothing=_maybe_nonzero(label_smoothing),
        has_z_loss=_maybe_nonzero(z_loss),
        class_mask=class_mask,
        checked=bool(CHECKING.value),
    )
    w = jnp.ones((num_classes,), compute_dtype) if weights is None else weights
    return config, Arrays(w.astype(compute_dtype), eps, z)


def check_softcap(logit_softcap: Any) -> None:
    """``logit_softcap`` must be None or a positive, finite Python number."""
    if logit_softcap is not None:
        if not isinstance(logit_softcap, numbers.Real) or isinstance(logit_softcap, bool):
            raise TypeError(
                f"logit_softcap must be a Python number or None, found {type(logit_softcap)}"
            )
        if not 0 < logit_softcap < float("inf"):
            raise ValueError(f"logit_softcap must be positive and finite, found {logit_softcap}")


def _maybe_nonzero(value: ArrayLike) -> bool:
    return not is_concrete(value) or float(np.asarray(value)) != 0.0


def _scalar(name: str, value: ArrayLike, lo: float, hi: float, dtype: Any) -> jax.Array:
    """A scalar option as an array; range-checked when concrete (traced: see ``bad_option``)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "dtype")):
        raise TypeError(f"{name} must be a real number or a scalar array, found {type(value)}")
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, found shape {jnp.shape(value)}")
    if hasattr(value, "dtype") and not (
        jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a real number, found dtype {value.dtype}")
    if is_concrete(value):
        v = float(np.asarray(value))
        if not lo <= v <= hi:
            raise ValueError(f"{name} must lie in [{lo}, {hi}], found {v}")
    return jnp.asarray(value).astype(dtype)


def bad_option(config: Config, arrays: Arrays) -> jax.Array:
    """True when a traced ``label_smoothing``/``z_loss`` is out of range (the loss is then NaN)."""
    bad = jnp.zeros((), bool)
    if config.has_smoothing:
        eps = arrays.label_smoothing
        bad = bad | ~((eps >= 0) & (eps <= 1))
    if config.has_z_loss:
        bad = bad | ~(arrays.z_loss >= 0)
    return bad
