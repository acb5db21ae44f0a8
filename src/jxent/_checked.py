"""Runtime label errors under ``jit``: one mechanism, :mod:`jax.experimental.checkify`.

Under ``jit`` a counted out-of-range label makes that example's loss and gradient row NaN (and
a reduced loss NaN); no jxent program carries a check or an effect, so every one exports and
serializes. :func:`checked` traces its function with ``_options.CHECKING`` on, a JAX config
state in the trace context: the losses then add a ``checkify.check``, and a function jitted
outside ``checked`` is traced again inside it, so the result does not depend on trace order
or on ``jit`` caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax.experimental import checkify

from jxent import _options

F = TypeVar("F", bound=Callable[..., Any])


def checked(fn: F) -> F:
    """Jit-compiles ``fn`` with label checks that raise instead of returning NaN.

    Args:
        fn: A function that calls jxent losses, e.g. ``jxent.value_and_grad(predictor)``, jitted
            helpers included.

    Returns:
        A jitted function with ``fn``'s signature that raises ``checkify.JaxRuntimeError`` (a
        ``ValueError``: "label out of range: flat position ...") on a counted label outside
        ``[0, L)``. Arguments are passed through ``jit``, so bind static options
        (``reduction=...``) beforehand, e.g. with ``functools.partial``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> f = jxent.checked(jxent.softmax_cross_entropy)
        >>> f(jnp.zeros((2, 3)), jnp.array([0, 3]))
        Traceback (most recent call last):
        ...
        jax._src.checkify.JaxRuntimeError: label out of range: flat position 1 has label 3, ...
    """
    checkified = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _options.CHECKING(True):
            err, out = checkified(*args, **kwargs)
        err.throw()
        return out

    return run  # type: ignore[return-value]
