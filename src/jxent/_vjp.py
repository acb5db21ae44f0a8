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
from typing import Any, Protocol

import jax
from jax.typing import ArrayLike

from jxent import _options
from jxent._loss import loss_and_logits_grad

PyTree = Any
Predictor = Callable[[PyTree, Any], jax.Array]


class ValueAndGradFn(Protocol):
    """``f(params, x, labels, **options) -> (loss, grads)``."""

    def __call__(
        self, params: PyTree, x: Any, labels: ArrayLike, **options: Any
    ) -> tuple[jax.Array, PyTree]: ...


def value_and_grad(predictor: Predictor, **loss_options: Any) -> ValueAndGradFn:
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

    Args:
        predictor: ``predictor(params, x) -> logits``, a pure JAX function of a parameter pytree.
            Logits have classes along ``axis``.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``f(params, x, labels, **options) -> (loss, grads)``, ``grads`` shaped like ``params``.
        Wrap it in ``jax.jit``; that is the intended use.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> f = jax.jit(jxent.value_and_grad(linear.apply))
        >>> loss, grads = f(params, jnp.ones((2, 4)), jnp.array([0, 2]))
        >>> grads["w"].shape
        (4, 3)
    """
    _options.check_option_names(loss_options, "value_and_grad")

    @functools.wraps(predictor)
    def value_and_grad_fn(
        params: PyTree, x: Any, labels: ArrayLike, **options: Any
    ) -> tuple[jax.Array, PyTree]:
        loss, grads, _ = loss_grads_and_logits(predictor, params, x, labels, loss_options, options)
        return loss, grads

    return value_and_grad_fn


def loss_grads_and_logits(
    predictor: Predictor,
    params: PyTree,
    x: Any,
    labels: ArrayLike,
    loss_options: dict[str, Any],
    call_options: dict[str, Any],
) -> tuple[jax.Array, PyTree, jax.Array]:
    """The one implementation behind :func:`value_and_grad` and the training step."""
    _options.check_option_names(call_options, "value_and_grad")
    logits, pullback = jax.vjp(lambda p: predictor(p, x), params)
    loss, cotangent = loss_and_logits_grad(logits, labels, **{**loss_options, **call_options})
    (grads,) = pullback(cotangent)
    return loss, grads, logits


def grad(predictor: Predictor, **loss_options: Any) -> Callable[..., PyTree]:
    """Hand-derived parameter gradient only; see :func:`value_and_grad`.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``f(params, x, labels, **options) -> grads``.
    """
    value_and_grad_fn = value_and_grad(predictor, **loss_options)

    @functools.wraps(predictor)
    def grad_fn(params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> PyTree:
        return value_and_grad_fn(params, x, labels, **options)[1]

    return grad_fn


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
