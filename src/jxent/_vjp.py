r"""Predictor-level loss and gradient: ``jax.vjp`` on the predictor, the cotangent by hand.

For a predictor :math:`h(\theta, x)` the chain rule gives

.. math::

    \frac{\partial J}{\partial \theta} = \sum_l \frac{\partial h_l}{\partial \theta}
    \, \frac{\partial J}{\partial h_l}
    = \mathrm{VJP}_h\big(\theta;\, p - \operatorname{onehot}(y)\big),

so the only autodiff jxent uses is the vector-Jacobian product of ``h`` itself; the cotangent
:math:`p - \operatorname{onehot}(y)` comes from :func:`jxent.loss_and_logits_grad`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _loss, _options

PyTree = Any
Predictor = Callable[[PyTree, Any], jax.Array]


class ValueAndGradFn(Protocol):
    """``f(params, x, labels, **options) -> (loss, grads)``, or ``((loss, aux), grads)``."""

    def __call__(self, params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> Any: ...


class GradFn(Protocol):
    """``f(params, x, labels, **options) -> grads``, or ``(grads, aux)``."""

    def __call__(self, params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> Any: ...


def value_and_grad(
    predictor: Predictor, *, has_aux: bool = False, **loss_options: Any
) -> ValueAndGradFn:
    r"""Loss and hand-derived parameter gradient of softmax cross-entropy on ``predictor``.

    Returns ``f(params, x, labels, **options) -> (loss, grads)`` computing

    .. math::

        \text{logits} = h(\theta, x), \qquad
        \frac{\partial J}{\partial \theta} = \mathrm{VJP}_h\big(\theta;\,
        \partial J / \partial\,\text{logits}\big),

    with ``logits, pullback = jax.vjp(lambda p: predictor(p, x), params)`` and
    ``pullback(jxent.logits_grad(logits, labels, ...))``. ``jax.grad`` of the loss is never used.
    Options given to ``f`` (e.g. a per-batch ``where`` mask) override those given here. With
    ``reduction="none"`` the loss is per example and ``grads`` is the gradient of their sum.

    ``has_aux`` follows ``jax.value_and_grad``: the predictor returns ``(logits, aux)`` (a flax
    model's updated ``batch_stats``, intermediate activations, ...), ``aux`` is not
    differentiated, and ``f`` returns ``((loss, aux), grads)``.

    Args:
        predictor: ``predictor(params, x) -> logits`` (``-> (logits, aux)`` with ``has_aux``), a
            pure JAX function of a parameter pytree. Logits have classes along ``axis``.
        has_aux: Whether the predictor returns ``(logits, aux)``.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``f(params, x, labels, **options)``, ``grads`` shaped like ``params``; its signature is
        exactly that, so ``jax.jit(f, static_argnames=("reduction",))`` and
        ``donate_argnames=("labels",)`` work. Wrap it in ``jax.jit``; that is the intended use.

    Raises:
        TypeError: (when ``f`` is called) the predictor returned a tuple, list or dict without
            ``has_aux=True``, or not a pair ``(logits, aux)`` with it.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> f = jax.jit(jxent.value_and_grad(linear.apply))
        >>> loss, grads = f(params, jnp.ones((2, 4)), jnp.array([0, 2]))
        >>> grads["w"].shape
        (4, 3)
    """
    _options.check_option_names(loss_options, "value_and_grad", ("has_aux",))

    def value_and_grad_fn(params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> Any:
        out = loss_grads_and_logits(
            predictor, params, x, labels, loss_options, options, "value_and_grad", has_aux
        )
        return ((out.loss, out.aux), out.grads) if has_aux else (out.loss, out.grads)

    return named_after(value_and_grad_fn, "value_and_grad", predictor)


def named_after(fn: Callable[..., Any], kind: str, predictor: Any) -> Callable[..., Any]:
    """Names ``fn`` after the predictor, keeping ``fn``'s own signature.

    Not ``functools.wraps``: its ``__wrapped__`` makes ``inspect.signature`` (and so
    ``jax.jit``'s ``static_argnames``) see the predictor's parameters instead of ``fn``'s.
    """
    check_predictor(predictor, kind)
    name = getattr(predictor, "__name__", type(predictor).__name__)
    fn.__name__ = fn.__qualname__ = f"{kind}({name})"
    fn.__doc__ = f"jxent.{kind} of ``{name}``: ``f(params, x, labels, **options)``."
    return fn


def check_predictor(predictor: Any, function: str) -> None:
    """Raises ``TypeError`` when ``predictor`` is not a function (e.g. parameters given first)."""
    if not callable(predictor):
        raise TypeError(
            f"{function}() takes the predictor first: a function h(params, x) -> logits, found "
            f"a {type(predictor).__name__} (parameters go to the function it returns)"
        )


class LossGradsLogits(NamedTuple):
    """What one hand-derived backward pass gives: loss, parameter gradient, logits and aux."""

    loss: jax.Array
    grads: PyTree
    logits: jax.Array
    aux: Any
    prepared: _loss.Prepared  # the validated call, for metrics over the rows the loss counts


def loss_grads_and_logits(
    predictor: Predictor,
    params: PyTree,
    x: Any,
    labels: ArrayLike,
    loss_options: dict[str, Any],
    call_options: dict[str, Any],
    function: str = "value_and_grad",
    has_aux: bool = False,
) -> LossGradsLogits:
    """The one implementation behind :func:`value_and_grad`, :func:`grad` and the training step."""
    options = _options.merged(loss_options, call_options, function)
    if has_aux:
        logits, pullback, aux = jax.vjp(
            lambda p: logits_and_aux(predictor(p, x)), params, has_aux=True
        )
    else:
        logits, pullback = jax.vjp(lambda p: logits_only(predictor(p, x)), params)
        aux = None
    prepared = _loss.prepare(function, logits, labels, **options)
    loss, cotangent = _loss.loss_and_grad(prepared)
    (grads,) = pullback(cotangent.astype(jnp.asarray(logits).dtype))
    return LossGradsLogits(loss, grads, logits, aux, prepared)


def logits_only(out: Any) -> Any:
    """``out``, or a ``TypeError`` saying to pass ``has_aux=True`` when it is a tuple/list/dict."""
    if isinstance(out, (tuple, list, dict)):
        kind = type(out).__name__
        size = f" of {len(out)}" if isinstance(out, (tuple, list)) else ""
        raise TypeError(
            f"the predictor returned a {kind}{size} instead of one logits array; if it returns "
            "(logits, aux) (e.g. a flax model's updated batch_stats), pass has_aux=True"
        )
    return out


def logits_and_aux(out: Any) -> tuple[Any, Any]:
    """``(logits, aux)`` of a ``has_aux`` predictor's output, or a TypeError saying what it was."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        if isinstance(out, (tuple, list)):
            found = f"a {type(out).__name__} of {len(out)}"
        elif isinstance(out, jax.Array):
            found = f"one array of shape {out.shape}"
        else:
            found = f"a {type(out).__name__}"
        raise TypeError(f"with has_aux=True the predictor must return (logits, aux), found {found}")
    return out[0], out[1]


def grad(predictor: Predictor, *, has_aux: bool = False, **loss_options: Any) -> GradFn:
    """Hand-derived parameter gradient only; see :func:`value_and_grad`.

    Args:
        predictor: ``predictor(params, x) -> logits`` (``-> (logits, aux)`` with ``has_aux``).
        has_aux: Whether the predictor returns ``(logits, aux)``; ``f`` then returns
            ``(grads, aux)``, as ``jax.grad(..., has_aux=True)`` does.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``f(params, x, labels, **options) -> grads`` (or ``(grads, aux)``).
    """
    _options.check_option_names(loss_options, "grad", ("has_aux",))

    def grad_fn(params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> Any:
        out = loss_grads_and_logits(
            predictor, params, x, labels, loss_options, options, "grad", has_aux
        )
        return (out.grads, out.aux) if has_aux else out.grads

    return named_after(grad_fn, "grad", predictor)


def batched(per_example: Callable[[PyTree, Any], jax.Array]) -> Predictor:
    """Turns a per-example predictor (``x -> [L]``) into a batch one (``[B, ...] -> [B, L]``).

    Args:
        per_example: ``per_example(params, x_i) -> logits_i``.

    Returns:
        ``predictor(params, x) = jax.vmap(per_example, in_axes=(None, 0))(params, x)``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> h = jxent.batched(lambda w, x: w @ x)
        >>> h(jnp.ones((3, 2)), jnp.ones((5, 2))).shape
        (5, 3)
    """

    @functools.wraps(per_example)
    def predictor(params: PyTree, x: Any) -> jax.Array:
        return jax.vmap(per_example, in_axes=(None, 0))(params, x)

    return predictor
