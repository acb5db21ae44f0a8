r"""Training a model whose head is linear: the fused loss in the step, no ``[N, L]`` logits.

The predictor returns hidden states :math:`h \in \mathbb{R}^{\dots \times D}`, the
:class:`LinearHead` says where the head's :math:`W \in \mathbb{R}^{D \times L}` (and bias) sit
in the parameters -- its own weights, or the transposed embedding table of a tied model -- and
each (micro-)batch's loss is

.. math::

    J(\theta) = \operatorname{linear\_cross\_entropy}\big(h(\theta, x),\; W(\theta),\; y\big),
    \qquad \nabla_\theta J = \mathrm{VJP}_{h}(G W^\top) + \mathrm{VJP}_{W}(h^\top G),

with ``jax.value_and_grad`` over the whole: :func:`jxent.linear_cross_entropy` is a
``custom_jvp`` whose rule is the hand-derived :math:`G` (its ``dx`` and ``dW`` formed chunk by
chunk), so autodiff only carries them through the predictor and through ``head.w``. Tied
embeddings get both contributions (the embedding lookup's and the head's) summed by JAX. The
hidden states ``[..., D]`` are flattened to ``[N, D]``, the labels (and a ``where`` token mask)
shaped like the hidden states without ``D`` to ``[N]``. The per-token statistics of the same
pass (``return_stats=True``) give the accuracy, the mean entropy and the mean log-sum-exp
without logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._head import linear_cross_entropy
from jxent._loss import prepare_problem
from jxent._options import check_option_names
from jxent._problem import Problem
from jxent.train._microbatch import Totals

PyTree = Any
# The fused head's schedule: static, given to the factory (make_step, fit, evaluate).
SCHEDULE_OPTIONS = ("chunk_size", "vocab_block_size")


@dataclasses.dataclass(frozen=True)
class LinearHead:
    r"""Where a model's linear head :math:`z = h W + b` sits in its parameters.

    Give it to :func:`jxent.train.make_step`, :func:`~jxent.train.fit` or
    :func:`~jxent.train.evaluate` as ``head=`` with a predictor that returns the hidden states
    ``[..., D]`` in front of the head: the step then trains with
    :func:`jxent.linear_cross_entropy` and never forms the ``[N, L]`` logits.

    Attributes:
        w: ``w(params) -> [D, L]``, the output projection: ``lambda p: p["head"]`` for the
            head's own weights, ``lambda p: p["embed"].T`` for embeddings tied to the input
            table ``[L, D]`` (the gradient then adds both uses).
        bias: ``bias(params) -> [L]``, or None for a head without one.

    Examples:
        >>> import jxent
        >>> tied = jxent.train.LinearHead(w=lambda params: params["embed"].T)
        >>> tied.bias is None
        True
    """

    w: Callable[[PyTree], jax.Array]
    bias: Callable[[PyTree], jax.Array] | None = None

    def arrays(self, params: PyTree, compute_dtype: Any = None) -> tuple[jax.Array, Any]:
        """``(w, bias)`` of ``params``, cast to ``compute_dtype`` when given (mixed precision)."""
        w = jnp.asarray(self.w(params))
        bias = None if self.bias is None else jnp.asarray(self.bias(params))
        if compute_dtype is None:
            return w, bias
        return cast_floating((w, bias), compute_dtype)


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """``tree`` with its floating leaves cast to ``dtype`` (the others as they are)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def check_head(head: Any, function: str) -> None:
    """Raises ``TypeError`` naming ``head=`` when it is not a usable :class:`LinearHead`."""
    if not isinstance(head, LinearHead):
        raise TypeError(
            f"{function}(head=...) takes a jxent.train.LinearHead(w=lambda params: ..., "
            f"bias=None), found a {type(head).__name__}"
        )
    if not callable(head.w):
        raise TypeError(
            f"{function}(head=...): head.w must be a function of the parameters giving the "
            f"[D, L] projection (e.g. lambda params: params['embed'].T), found "
            f"{type(head.w).__name__}"
        )
    if head.bias is not None and not callable(head.bias):
        raise TypeError(
            f"{function}(head=...): head.bias must be None or a function of the parameters "
            f"giving the [L] bias, found {type(head.bias).__name__}"
        )


def check_options(
    options: dict[str, Any], function: str, parameters: tuple[str, ...], head: Any
) -> None:
    """The loss options of a factory: the schedule's only with a head, no ``axis`` with one."""
    if head is None:
        for name in SCHEDULE_OPTIONS:
            if name in options:
                raise TypeError(
                    f"{function}() got {name}=, an option of the fused head: give "
                    f"{function}(..., head=jxent.train.LinearHead(...)) and a predictor that "
                    "returns hidden states"
                )
        check_option_names(options, function, parameters)
        return
    check_head(head, function)
    rest = {k: v for k, v in options.items() if k not in SCHEDULE_OPTIONS}
    check_option_names(rest, function, parameters + SCHEDULE_OPTIONS)
    if "axis" in rest:
        raise TypeError(
            f"{function}(head=...) has no axis option: the classes are w's columns and the "
            "hidden states' last axis is D"
        )


def reject_per_call(options: dict[str, Any], function: str) -> None:
    """The schedule belongs to the factory, as the structural options do (before ``jit``)."""
    for name in SCHEDULE_OPTIONS:
        if name in options:
            raise TypeError(
                f"{name}= shapes the compiled {function}: give it to the factory "
                f"(make_step(..., head=..., {name}=...)), not to the call"
            )


def examples_problem(
    hidden: Any,
    w: Any,
    labels: ArrayLike,
    options: dict[str, Any],
    function: str,
) -> tuple[Problem, jax.Array, jax.Array | None]:
    """Validates the head's inputs by shape; returns ``(problem, labels [N], where [N])``.

    ``hidden`` and ``w`` may be arrays or ``jax.ShapeDtypeStruct`` (the micro-batched step
    knows the whole batch's shapes before any forward pass). The problem is the loss's own
    (:func:`jxent._loss.prepare_problem` of ``[N, L]`` scores): its counted tokens and
    denominators are the fused head's.
    """
    if len(w.shape) != 2:
        raise ValueError(
            f"{function}(head=...): head.w(params) must give w of shape [D, L], found shape "
            f"{tuple(w.shape)}"
        )
    if len(hidden.shape) < 2 or hidden.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{function}(head=...): the predictor must return hidden states [..., D] with "
            f"D = {w.shape[0]}, the rows of head.w(params) of shape {tuple(w.shape)}; found "
            f"hidden states of shape {tuple(hidden.shape)}"
        )
    labels = jnp.asarray(labels)
    examples = tuple(hidden.shape[:-1])
    num_tokens, num_classes = math.prod(examples), w.shape[1]
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    if labels.shape != ((*examples, num_classes) if soft else examples):
        raise ValueError(
            f"{function}(head=...): labels must be shaped like the hidden states without D, "
            f"{examples} (or {(*examples, num_classes)} for probabilities), for hidden states "
            f"of shape {tuple(hidden.shape)}; found labels of shape {labels.shape}"
        )
    labels = labels.reshape(num_tokens, num_classes) if soft else labels.reshape(num_tokens)
    options = {k: v for k, v in options.items() if k not in SCHEDULE_OPTIONS}
    where = options.pop("where", None)
    if where is not None:
        if jnp.shape(where) != examples:
            raise ValueError(
                f"{function}(head=...): where must be a token mask shaped like the labels' "
                f"tokens, {examples}, found {jnp.shape(where)} (a per-logit mask needs the "
                "logits, which the fused head never forms)"
            )
        where = jnp.reshape(where, (num_tokens,))
    scores = jax.ShapeDtypeStruct(
        (num_tokens, num_classes), jnp.promote_types(hidden.dtype, w.dtype)
    )
    problem, _ = prepare_problem(function, scores, labels, where=where, **options)
    return problem, labels, where


def loss_and_stats(
    forward: Callable[[PyTree], tuple[jax.Array, PyTree]],
    head: LinearHead,
    params: PyTree,
    labels: ArrayLike,
    options: dict[str, Any],
    compute_dtype: Any,
    function: str,
) -> tuple[jax.Array, tuple[Any, jax.Array, PyTree]]:
    """``(loss, (stats, counted, aux))`` of one batch: the function ``make_step`` differentiates.

    ``forward(params) -> (hidden, aux)``: the predictor on the batch (``aux`` the new model
    state of a stateful one, else None).
    """
    hidden, aux = forward(params)
    w, bias = head.arrays(params, compute_dtype)
    hidden = jnp.asarray(hidden)
    problem, flat_labels, where = examples_problem(hidden, w, labels, options, function)
    rest = {k: v for k, v in options.items() if k != "where"}
    loss, stats = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        w,
        flat_labels,
        bias=bias,
        where=where,
        return_stats=True,
        **rest,
    )
    return loss, (stats, problem.counted_rows(), aux)


def sums_of(stats: Any, counted: jax.Array) -> dict[str, jax.Array]:
    """The metrics' sums over the counted tokens: right, count, entropy and log-sum-exp."""
    f32 = jnp.float32
    return {
        "right": jnp.sum(stats.correct & counted).astype(f32),
        "count": jnp.sum(counted).astype(f32),
        "entropy": jnp.sum(jnp.where(counted, stats.entropy, 0.0)),
        "lse": jnp.sum(jnp.where(counted, stats.lse, 0.0)),
    }


def totals(
    forward: Callable[[PyTree], tuple[jax.Array, PyTree]],
    head: LinearHead,
    params: PyTree,
    labels: ArrayLike,
    options: dict[str, Any],
    compute_dtype: Any,
    function: str,
) -> Totals:
    """Loss, gradient (``jax.value_and_grad`` through the fused head) and sums of one batch."""
    (loss, (stats, counted, aux)), grads = jax.value_and_grad(loss_and_stats, 2, has_aux=True)(
        forward, head, params, labels, options, compute_dtype, function
    )
    return Totals(loss, grads, sums_of(stats, counted), aux)


def whole_batch_problem(
    forward: Callable[[PyTree, Any], Any],
    head: LinearHead,
    params: PyTree,
    first: Any,
    labels: ArrayLike,
    options: dict[str, Any],
    microbatches: int,
    compute_dtype: Any,
) -> Problem:
    """The problem of the whole batch, from a micro-batch's hidden states' shape (traced only)."""
    hidden = jax.eval_shape(lambda p, x: jnp.asarray(forward(p, x)[0]), params, first)
    w = jax.eval_shape(lambda p: head.arrays(p, compute_dtype)[0], params)
    whole = jax.ShapeDtypeStruct((hidden.shape[0] * microbatches, *hidden.shape[1:]), hidden.dtype)
    return examples_problem(whole, w, labels, options, "step")[0]
