r"""The classic hand-derivation mistakes for softmax regression, as gradient functions.

Used by ``jxent check --demo-mistakes`` to show what the checker says about each. Each returns
``{"w": [D, L], "b": [L]}`` for :data:`jxent.predictors.linear` with a mean loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Grads = dict[str, jax.Array]


def _residual(params: Grads, x: jax.Array, labels: jax.Array) -> jax.Array:
    logits = x @ params["w"] + params["b"][None, :]
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) - jax.nn.softmax(logits)


def sign_flipped(params: Grads, x: jax.Array, labels: jax.Array) -> Grads:
    r""":math:`x\,(\mathbb{1}\{y=k\} - p_k)`: the gradient of :math:`+\log p_y`."""
    r = _residual(params, x, labels)
    return {"w": x.T @ r / x.shape[0], "b": jnp.mean(r, axis=0)}


def summed_over_classes(params: Grads, x: jax.Array, labels: jax.Array) -> Grads:
    r""":math:`\sum_l x(\mathbb{1}\{y=l\} - p_l)`, one vector for every class: identically 0."""
    r = jnp.sum(_residual(params, x, labels), axis=-1, keepdims=True)
    w = x.T @ r / x.shape[0]
    return {
        "w": jnp.broadcast_to(w, params["w"].shape),
        "b": jnp.broadcast_to(jnp.mean(r), params["b"].shape),
    }


def sum_not_mean(params: Grads, x: jax.Array, labels: jax.Array) -> Grads:
    r""":math:`\sum_i x_i (p_i - \operatorname{onehot}(y_i))`, for a mean loss: B times too big."""
    r = -_residual(params, x, labels)
    return {"w": x.T @ r, "b": jnp.sum(r, axis=0)}


MISTAKES: dict[str, Callable[[Grads, jax.Array, jax.Array], Grads]] = {
    "sign flipped: x (1{y=k} - p_k)": sign_flipped,
    "summed over classes: sum_l x (1{y=l} - p_l)": summed_over_classes,
    "sum instead of mean: sum_i x_i (p_ik - 1{y_i=k})": sum_not_mean,
}
