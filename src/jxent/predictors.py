r"""Built-in predictors: pure ``init(key, ...) -> params`` and ``apply(params, x) -> logits``.

* :data:`linear` -- softmax regression, :math:`h_l(x) = \theta_l^\top x + b_l`; params
  ``{"w": [D, L], "b": [L]}`` (column ``l`` of ``w`` is :math:`\theta_l`).
* :data:`mlp` -- a multilayer perceptron of any depth and width; params a list of ``(w, b)``
  tuples; the activation is an argument of ``apply``.
* :data:`embedding` -- class scores that share parameters: :math:`h_l(x) = e_l^\top f_W(x)` with
  a shared encoder :math:`f_W(x) = \tanh(x W + c)` and one embedding :math:`e_l` per class; params
  ``{"encoder": {"w", "b"}, "classes": [L, K]}``. Every logit depends on ``W``.

Each is a :class:`Predictor` named tuple, so ``linear.apply`` is the predictor itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


class Predictor(NamedTuple):
    """An ``init``/``apply`` pair of pure functions."""

    init: Callable[..., Any]
    apply: Callable[..., jax.Array]


def _dense(key: jax.Array, fan_in: int, fan_out: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    # LeCun-normal weights keep the logits O(1) at any width.
    w = jax.random.normal(key, (fan_in, fan_out), dtype) / jnp.sqrt(fan_in).astype(dtype)
    return w, jnp.zeros((fan_out,), dtype)


def _affine(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    # Explicit broadcast of the bias, so code run with jax_numpy_rank_promotion="raise" works.
    y = x @ w
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def linear_init(
    key: jax.Array, in_features: int, num_classes: int, dtype: Any = jnp.float32
) -> dict[str, jax.Array]:
    """Initial parameters of softmax regression.

    Args:
        key: PRNG key.
        in_features: Input dimension ``D``.
        num_classes: Number of classes ``L``.
        dtype: Parameter dtype.

    Returns:
        ``{"w": [D, L], "b": [L]}``.
    """
    w, b = _dense(key, in_features, num_classes, dtype)
    return {"w": w, "b": b}


def linear_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    r"""Logits :math:`x W + b` of softmax regression, ``[B, D] -> [B, L]``."""
    return _affine(x, params["w"], params["b"])


def mlp_init(
    key: jax.Array, sizes: Sequence[int], dtype: Any = jnp.float32
) -> list[tuple[jax.Array, jax.Array]]:
    """Initial parameters of an MLP with layer sizes ``sizes`` (input, hidden..., classes).

    Args:
        key: PRNG key.
        sizes: ``[D, H_1, ..., H_k, L]``; at least two entries.
        dtype: Parameter dtype.

    Returns:
        A list of ``(w, b)`` tuples, one per layer.
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least input and output sizes, found {list(sizes)}")
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        _dense(k, fan_in, fan_out, dtype)
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(
    params: Sequence[tuple[jax.Array, jax.Array]],
    x: jax.Array,
    activation: Activation = jax.nn.relu,
) -> jax.Array:
    """Logits of the MLP: ``activation`` between layers, none after the last.

    Args:
        params: From :func:`mlp_init`.
        x: Inputs ``[B, D]``.
        activation: Elementwise nonlinearity; bind another with ``functools.partial``.

    Returns:
        Logits ``[B, L]``.
    """
    *hidden, (w_out, b_out) = params
    for w, b in hidden:
        x = activation(_affine(x, w, b))
    return _affine(x, w_out, b_out)


def embedding_init(
    key: jax.Array, in_features: int, num_classes: int, dim: int, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Initial parameters of the shared-encoder, class-embedding predictor.

    Args:
        key: PRNG key.
        in_features: Input dimension ``D``.
        num_classes: Number of classes ``L``.
        dim: Embedding dimension ``K``.
        dtype: Parameter dtype.

    Returns:
        ``{"encoder": {"w": [D, K], "b": [K]}, "classes": [L, K]}``.
    """
    k_enc, k_cls = jax.random.split(key)
    w, b = _dense(k_enc, in_features, dim, dtype)
    classes = jax.random.normal(k_cls, (num_classes, dim), dtype) / jnp.sqrt(dim).astype(dtype)
    return {"encoder": {"w": w, "b": b}, "classes": classes}


def embedding_apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
    r"""Logits :math:`h_l(x) = e_l^\top \tanh(x W + c)`, ``[B, D] -> [B, L]``."""
    features = jnp.tanh(_affine(x, params["encoder"]["w"], params["encoder"]["b"]))
    return features @ params["classes"].T


linear = Predictor(linear_init, linear_apply)
mlp = Predictor(mlp_init, mlp_apply)
embedding = Predictor(embedding_init, embedding_apply)

__all__ = ["Predictor", "embedding", "linear", "mlp"]
