"""Opt-in runtime checks under ``jit`` through :mod:`jax.experimental.checkify`.

The plain jitted path cannot raise, so a bad label makes that example's loss and gradient row NaN.
:func:`checked` traces a function with label checks switched on and raises a
``checkify.JaxRuntimeError`` (a ``ValueError``) naming the first bad position instead.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import checkify

F = TypeVar("F", bound=Callable[..., Any])
_state = threading.local()


def enabled() -> bool:
    """Whether the function being traced asked for checkify label checks."""
    return getattr(_state, "on", False)


@contextlib.contextmanager
def _checks_on() -> Iterator[None]:
    before = enabled()
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def check_labels(bad: jax.Array, labels: jax.Array, num_classes: int) -> None:
    """Adds a checkify error when any counted label lies outside ``[0, num_classes)``."""
    flat = jnp.ravel(bad)
    first = jnp.argmax(flat)
    checkify.check(
        ~jnp.any(flat),
        "label out of range: flat position {pos} has label {value}, expected 0.."
        + str(num_classes - 1),
        pos=first,
        value=jnp.ravel(labels)[first],
    )


def checked(fn: F) -> F:
    """Jit-compiles ``fn`` with label checks that raise instead of returning NaN.

    Args:
        fn: A function that calls jxent losses, e.g. ``jxent.value_and_grad(predictor)``. Pass the
            plain (un-jitted) function: it is traced here with the checks switched on.

    Returns:
        A jitted function with ``fn``'s signature that raises ``checkify.JaxRuntimeError`` (a
        ``ValueError``: "label out of range: flat position ...") on a bad label. Arguments are
        passed through ``jit``, so bind static options (``reduction=...``) beforehand, e.g.
        with ``jxent.value_and_grad(predictor, reduction="sum")`` or ``functools.partial``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> f = jxent.checked(jxent.softmax_cross_entropy)
        >>> f(jnp.zeros((2, 3)), jnp.array([0, 3]))
        Traceback (most recent call last):
        ...
        jax._src.checkify.JaxRuntimeError: label out of range: flat position 1 has label 3, ...
    """

    def with_checks(*args: Any, **kwargs: Any) -> Any:
        with _checks_on():
            return fn(*args, **kwargs)

    checkified = jax.jit(checkify.checkify(with_checks, errors=checkify.user_checks))

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        err, out = checkified(*args, **kwargs)
        err.throw()
        return out

    return run  # type: ignore[return-value]
