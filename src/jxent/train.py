"""Training with the hand-derived gradient: a jitted optax step, data parallel, and a plain loop.

``make_step`` builds ``step(state, x, labels) -> (state, metrics)`` around
:func:`jxent.value_and_grad`; with ``mesh=`` the batch is sharded over the mesh's ``"data"``
axis and the parameters replicated, with JAX's own sharding (XLA inserts the gradient
all-reduce). The same code runs on one device or many, and on several hosts once
``jax.distributed.initialize()`` has run on each (the mesh then spans ``jax.devices()``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jxent._loss import softmax_cross_entropy
from jxent._options import check_option_names
from jxent._vjp import Predictor, loss_grads_and_logits

PyTree = Any
Metrics = dict[str, jax.Array]
DATA_AXIS = "data"


class TrainState(NamedTuple):
    """What a training step carries: parameters, optimizer state and the step count."""

    params: PyTree
    opt_state: optax.OptState
    step: jax.Array


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` for ``params`` and ``optimizer``.

    Args:
        params: Initial (float32 master) parameters.
        optimizer: An optax gradient transformation.

    Returns:
        ``TrainState(params, optimizer.init(params), 0)`` holding a copy of ``params``.
    """
    # A copy: the step donates its state's buffers, which must not delete the caller's arrays.
    params = jax.tree.map(jnp.array, params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def data_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named ``"data"`` over ``devices`` (all of ``jax.devices()`` by default)."""
    return Mesh(np.asarray(list(jax.devices() if devices is None else devices)), (DATA_AXIS,))


def mixed_precision(predictor: Predictor, compute_dtype: Any) -> Predictor:
    """Runs ``predictor`` with parameters and inputs cast to ``compute_dtype`` (e.g. bfloat16).

    The float32 master parameters stay float32: the cast's VJP returns float32 gradients, and
    the loss and logits gradient are computed in float32 by :func:`jxent.loss_and_logits_grad`.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        compute_dtype: The dtype to compute the predictor in.

    Returns:
        The wrapped predictor.
    """

    def cast(tree: PyTree) -> PyTree:
        return jax.tree.map(
            lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            tree,
        )

    def low_precision(params: PyTree, x: Any) -> jax.Array:
        return predictor(cast(params), cast(x))

    return low_precision


def _global_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)) if leaves else jnp.zeros(())


def _metrics(loss: jax.Array, grads: PyTree, logits: jax.Array, labels: jax.Array) -> Metrics:
    predicted = jnp.argmax(logits, axis=-1)
    target = labels if jnp.issubdtype(labels.dtype, jnp.integer) else jnp.argmax(labels, -1)
    return {
        "loss": loss,
        "accuracy": jnp.mean((predicted == target).astype(jnp.float32)),
        "grad_norm": _global_norm(grads),
    }


def make_step(
    predictor: Predictor,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    compute_dtype: Any = None,
    **loss_options: Any,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jitted training step that uses the hand-derived gradient.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        optimizer: An optax gradient transformation.
        mesh: Optional mesh with a ``"data"`` axis (see :func:`data_mesh`): the batch is
            sharded along it, the state replicated. The batch size must divide evenly.
        compute_dtype: Run the predictor in this dtype (e.g. ``jnp.bfloat16``) with float32
            master parameters; ``None`` computes in the parameters' dtype.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad` (the reduction must be
            ``"mean"`` or ``"sum"``).

    Returns:
        ``step(state, x, labels) -> (state, metrics)``, jitted; metrics are the batch's
        ``loss``, ``accuracy`` and the gradient's global norm ``grad_norm``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, jxent
        >>> from jxent.predictors import linear
        >>> opt = optax.sgd(0.1)
        >>> state = jxent.train.init_state(linear.init(jax.random.key(0), 3, 2), opt)
        >>> step = jxent.train.make_step(linear.apply, opt)
        >>> state, metrics = step(state, jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]))
        >>> int(state.step)
        1
    """
    check_option_names(loss_options, "make_step")
    if loss_options.get("reduction", "mean") == "none":
        raise ValueError("make_step needs a scalar loss: reduction 'mean' or 'sum'")
    model = predictor if compute_dtype is None else mixed_precision(predictor, compute_dtype)

    def step(state: TrainState, x: jax.Array, labels: jax.Array) -> tuple[TrainState, Metrics]:
        loss, grads, logits = loss_grads_and_logits(
            model, state.params, x, labels, loss_options, {}
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), _metrics(loss, grads, logits, labels)

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    jitted = jax.jit(
        step,
        in_shardings=(replicated, batch, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )

    def sharded_step(
        state: TrainState, x: jax.Array, labels: jax.Array
    ) -> tuple[TrainState, Metrics]:
        return jitted(jax.device_put(state, replicated), x, labels)

    return sharded_step


def evaluate(
    predictor: Predictor, params: PyTree, x: jax.Array, labels: jax.Array, **loss_options: Any
) -> dict[str, float]:
    """Loss and accuracy of ``predictor`` on a whole data set (one jitted call).

    Args:
        predictor: ``predictor(params, x) -> logits``.
        params: Parameters.
        x: Inputs.
        labels: Integer labels or probabilities.
        **loss_options: Options of the loss.

    Returns:
        ``{"loss": float, "accuracy": float}``.
    """
    run = _evaluator(predictor, loss_options)
    return {k: float(v) for k, v in run(params, x, labels).items()}


def _evaluator(predictor: Predictor, opts: dict[str, Any]) -> Callable[..., Metrics]:
    @jax.jit
    def run(params: PyTree, x: jax.Array, labels: jax.Array) -> Metrics:
        logits = predictor(params, x)
        metrics = _metrics(softmax_cross_entropy(logits, labels, **opts), {}, logits, labels)
        del metrics["grad_norm"]
        return metrics

    return run


def fit(
    predictor: Predictor,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    data: tuple[Any, Any],
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    eval_data: tuple[Any, Any] | None = None,
    progress: bool = True,
    callbacks: Iterable[Callable[[dict[str, float]], None]] = (),
    mesh: Mesh | None = None,
    compute_dtype: Any = None,
    **loss_options: Any,
) -> tuple[PyTree, list[dict[str, float]]]:
    """Trains ``predictor`` with the hand-derived gradient: shuffled minibatches, per-epoch eval.

    Each epoch draws a permutation with ``jax.random.permutation(fold_in(key, epoch))`` and
    runs ``len(x) // batch_size`` full batches (the remainder of the permutation is skipped
    that epoch; it differs every epoch). The progress bar is tqdm's, when tqdm is installed
    (``pip install "jxent[demo]"``): it is small, pure Python and has no dependencies of its own.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        params: Initial parameters.
        optimizer: An optax gradient transformation.
        data: ``(x, labels)`` training arrays.
        epochs: Number of passes over ``data``.
        batch_size: Examples per step.
        key: PRNG key for shuffling.
        eval_data: Optional ``(x, labels)`` evaluated after every epoch.
        progress: Show a progress bar.
        callbacks: Called with each epoch's history record.
        mesh: Data-parallel mesh, as for :func:`make_step`.
        compute_dtype: Mixed precision, as for :func:`make_step`.
        **loss_options: Options of the loss.

    Returns:
        ``(params, history)``: trained parameters and one record per epoch with ``epoch``,
        ``train_loss``, ``train_accuracy`` (means over the epoch's steps), ``eval_loss``,
        ``eval_accuracy`` (with ``eval_data``), ``train_seconds`` (the epoch's steps),
        ``seconds`` (the whole epoch, evaluation included) and, in the first record,
        ``first_step_seconds`` (the first step, its compilation included).
    """
    x, labels = jnp.asarray(data[0]), jnp.asarray(data[1])
    steps = x.shape[0] // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0]} training examples")
    step = make_step(predictor, optimizer, mesh=mesh, compute_dtype=compute_dtype, **loss_options)
    state = init_state(params, optimizer)
    run_eval = _evaluator(predictor, loss_options)
    bar = _progress(epochs * steps, progress)
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        order = jax.random.permutation(jax.random.fold_in(key, epoch), x.shape[0])
        sums = {"loss": 0.0, "accuracy": 0.0}
        first_step = None
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            state, metrics = step(state, x[idx], labels[idx])
            if epoch == 0 and i == 0:  # compilation happens here: timed apart from the rest
                jax.block_until_ready(metrics)
                first_step = time.perf_counter() - start
            for name in sums:
                sums[name] += metrics[name]
            if bar is not None:
                bar.update(1)
        jax.block_until_ready(state)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(sums["loss"]) / steps,
            "train_accuracy": float(sums["accuracy"]) / steps,
            "train_seconds": time.perf_counter() - start,
        }
        if first_step is not None:
            record["first_step_seconds"] = first_step
        if eval_data is not None:
            scores = run_eval(state.params, *eval_data)
            record["eval_loss"] = float(scores["loss"])
            record["eval_accuracy"] = float(scores["accuracy"])
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if bar is not None:
            short = {"train_loss": "loss", "train_accuracy": "acc", "eval_accuracy": "eval_acc"}
            bar.set_postfix({v: f"{record[k]:.4f}" for k, v in short.items() if k in record})
        for callback in callbacks:
            callback(record)
    if bar is not None:
        bar.close()
    return state.params, history


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional: training works without a bar
        return None
    return tqdm(total=total, unit="step", desc="training")


__all__ = [
    "TrainState",
    "data_mesh",
    "evaluate",
    "fit",
    "init_state",
    "make_step",
    "mixed_precision",
]
