r"""Exact gradient accumulation: ``k`` micro-batches whose update is the whole batch's.

The mean over a batch is not the mean of its micro-batches' means when they count different
numbers of examples (``where``, ``ignore_index``, class weights). The ``"mean"`` loss is

.. math::

    J = \frac{\sum_i m_i\,ce_i}{D_{ce}} + z\,\frac{\sum_i m_i \operatorname{lse}_i^2}{D_z},
    \qquad D_{ce} = \sum_i m_i n_i, \quad D_z = \sum_i m_i,

(:math:`m_i` counted, :math:`n_i` the target's class weight), so each micro-batch computes the
``"sum"`` loss with the z coefficient :math:`z D_{ce}/D_z`, and the sum of their gradients is
divided once by :math:`D_{ce}` -- both denominators taken over the whole batch, from the labels
and masks alone (no forward pass). ``"sum"`` needs neither. Micro-batch ``j`` holds examples
``j, j + k, j + 2k, ...``: with the batch sharded over devices, every device keeps its share of
every micro-batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _kernel
from jxent._options import Arrays, Config
from jxent._problem import Problem

PyTree = Any


def check_count(microbatches: Any) -> int:
    """``microbatches`` as a positive int, or a ValueError naming it."""
    integral = isinstance(microbatches, numbers.Integral) and not isinstance(microbatches, bool)
    if not integral or microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, found {microbatches!r}")
    return int(microbatches)  # np.int64 too


def check_divides(batch_size: int, microbatches: int) -> None:
    """The batch must split into equal micro-batches."""
    if batch_size % microbatches:
        raise ValueError(
            f"the batch of {batch_size} examples does not split into microbatches={microbatches} "
            "equal micro-batches: make the batch size a multiple of microbatches"
        )


def split(tree: PyTree, microbatches: int) -> PyTree:
    """``[B, ...] -> [k, B/k, ...]``, micro-batch ``j`` holding examples ``j, j + k, ...``."""

    def one(a: jax.Array) -> jax.Array:
        a = jnp.asarray(a)
        a = a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:])
        return jnp.moveaxis(a, 1, 0)

    return jax.tree.map(one, tree)


def mean_denominators(
    labels: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    weights: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""The ``"mean"`` loss's denominators over a whole batch, for exact gradient accumulation.

    .. math::

        D_{ce} = \sum_i m_i n_i, \qquad D_z = \sum_i m_i,

    :math:`m_i` whether example :math:`i` counts (``where``, ``ignore_index``), :math:`n_i` its
    target's class weight (integer labels with ``weights``; else 1). The batch's mean loss is
    the sum over its micro-batches of the ``reduction="sum"`` loss with ``z_loss`` scaled by
    :math:`D_{ce}/D_z`, divided by :math:`D_{ce}` -- and so are its gradients. As
    ``jxent.train.make_step(..., microbatches=k)`` does it; this is for hand-written loops
    (``jxent.linear_cross_entropy`` over micro-batches of tokens: docs/sharded.md).

    Args:
        labels: Integer class indices (any shape: the examples) or probabilities (classes on
            ``axis``, as given to the loss).
        axis: The class axis (or axes) of probability labels, as given to the loss.
        weights: Class weights ``[L]`` as given to the loss, or None.
        where: Boolean mask of the examples (the labels' shape without the class axes), or
            None. A per-logit mask needs the logits: ``make_step(..., microbatches=k)`` takes
            it.
        ignore_index: As given to the loss, or None.

    Returns:
        ``(ce_denominator, z_denominator)``, float32 scalars (float64 under x64): 1 when no
        example counts; ``ce_denominator`` NaN when examples count but their class weights sum
        to 0 (the loss is NaN then too, as in PyTorch).

    Raises:
        ValueError: ``where`` not shaped like the examples.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> jxent.train.mean_denominators(jnp.array([0, 2, -100, 1]), ignore_index=-100,
        ...                               weights=jnp.array([1.0, 2.0, 3.0]))
        (Array(6., dtype=float32), Array(3., dtype=float32))
    """
    labels = jnp.asarray(labels)
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    shape = labels.shape
    if soft:
        axes = {a % labels.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        shape = tuple(d for i, d in enumerate(labels.shape) if i not in axes)
    if where is not None and jnp.shape(where) != shape:
        raise ValueError(
            f"where must be shaped like the examples, {shape} for labels of shape "
            f"{labels.shape}, found {jnp.shape(where)}"
        )
    counted = jnp.ones(shape, bool) if where is None else jnp.asarray(where, bool)
    counted = counted.reshape(-1)
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(float))
    # The loss's own problem, without logits: only the rows and the class weights matter.
    num_classes = jnp.iinfo(jnp.int32).max if weights is None else jnp.shape(weights)[0]
    config = Config("mean", num_classes, soft, ignore_index, has_weights=weights is not None)
    if soft:
        rows = _kernel.Rows(labels, counted, jnp.zeros_like(counted))
    else:
        rows = _kernel.integer_rows(config, labels.reshape(-1), counted)
    class_weights = jnp.ones((1,), dtype) if weights is None else jnp.asarray(weights, dtype)
    options = Arrays(class_weights, jnp.zeros((), dtype), jnp.zeros((), dtype))
    return Problem(config, rows, options).mean_denominators()


class Totals(NamedTuple):
    """What a batch, or the micro-batches added up, give the step (the carry of their scan)."""

    loss: jax.Array  # the loss; in the scan, the sum of the micro-batches' "sum" losses
    grads: PyTree
    sums: dict[str, jax.Array]  # counts and sums over the counted examples, for the metrics
    model_state: PyTree


def per_example(options: dict[str, Any], rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(per-example options, the rest)``: a mask with the batch's leading axis splits with it.

    One that broadcasts (``[1, L]``) stays whole, as do the other options.
    """
    split_ = {
        k: v
        for k, v in options.items()
        if k == "where" and jnp.ndim(v) > 0 and jnp.shape(v)[0] == rows
    }
    return split_, {k: v for k, v in options.items() if k not in split_}


def micro_options(options: dict[str, Any], problem: Problem) -> tuple[dict[str, Any], Any]:
    """``(options of each micro-batch, denominator of the sum)`` for the whole batch's loss.

    ``problem`` is the whole batch's (built from the scores' shape); with ``"sum"`` the options
    stay and the denominator is None.
    """
    if options.get("reduction", "mean") == "sum":
        return options, None
    ce_denominator, z_denominator = problem.mean_denominators()
    micro = {**options, "reduction": "sum"}
    if "z_loss" in options:
        micro["z_loss"] = jnp.asarray(options["z_loss"]) * ce_denominator / z_denominator
    return micro, ce_denominator


def accumulate(
    grad_fn: Callable[..., Totals],
    params: PyTree,
    batch: PyTree,
    microbatches: int,
    model_state: PyTree,
    denominator: jax.Array | None,
) -> Totals:
    """Runs ``grad_fn`` on each micro-batch in a ``lax.scan`` and adds up what it returns.

    ``grad_fn(params, batch_j, model_state, index) -> Totals`` of micro-batch ``j`` (its loss
    with the micro-batch options of :func:`micro_options`), ``batch_j`` the ``j``-th of
    :func:`split` of ``batch``; the model state passes through the micro-batches in order. The
    summed loss and gradients are divided by ``denominator`` (None: ``"sum"``, left as is).
    """
    parts = split(batch, microbatches)

    def body(totals: Totals, inputs: tuple) -> tuple[Totals, None]:
        part, index = inputs
        out = grad_fn(params, part, totals.model_state, index)
        added = jax.tree.map(jnp.add, (totals.loss, totals.grads, totals.sums), out[:3])
        return Totals(*added, out.model_state), None

    first = jax.tree.map(lambda a: a[0], parts)
    shapes = jax.eval_shape(lambda p: grad_fn(p, first, model_state, 0)[:3], params)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    init = Totals(*zeros, model_state)
    totals, _ = lax.scan(body, init, (parts, jnp.arange(microbatches)))
    if denominator is None:
        return totals
    grads = jax.tree.map(lambda g: (g / denominator).astype(g.dtype), totals.grads)
    return totals._replace(grads=grads, loss=totals.loss / denominator)
