"""The training step, the loop and the Sophia estimator (``jxent.train`` re-exports them).

``make_step`` builds ``step(state, x, labels) -> (state, metrics)`` around
:func:`jxent.value_and_grad`; with ``mesh=`` the batch is sharded over the mesh's ``"data"``
axis and the parameters replicated, with JAX's own sharding (XLA inserts the gradient
all-reduce). The same code runs on one device or many, and on several hosts once
``jax.distributed.initialize()`` has run on each (the mesh then spans ``jax.devices()``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jxent._curvature import gnb_diagonal
from jxent._loss import Prepared, prepare, prepare_problem, softmax_cross_entropy
from jxent._options import merged, reject_structural, require_scalar, split_static
from jxent._vjp import (
    Predictor,
    check_predictor,
    logits_and_aux,
    logits_only,
    loss_grads_and_logits,
)
from jxent.train import _linear_head, _microbatch
from jxent.train._linear_head import LinearHead
from jxent.train._microbatch import Totals

PyTree = Any
Metrics = dict[str, jax.Array]
DATA_AXIS = "data"


class TrainState(NamedTuple):
    """What a training step carries.

    Attributes:
        params: The parameters being trained.
        opt_state: The optimizer's state.
        step: Steps taken so far (int32 scalar).
        model_state: State the predictor updates but is not trained (flax ``batch_stats``,
            equinox ``State``), for ``make_step(..., has_aux=True)``; ``None`` otherwise.
        key: PRNG key from which each step's key is derived (dropout), or ``None``.
    """

    params: PyTree
    opt_state: optax.OptState
    step: jax.Array
    model_state: PyTree = None
    key: jax.Array | None = None


def init_state(
    params: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    model_state: PyTree = None,
    key: jax.Array | None = None,
) -> TrainState:
    """A fresh :class:`TrainState` for ``params`` and ``optimizer``.

    Args:
        params: Initial (float32 master) parameters.
        optimizer: An optax gradient transformation.
        model_state: Initial non-trained model state (e.g. flax ``variables["batch_stats"]``).
        key: PRNG key for per-step randomness (step ``i`` uses ``jax.random.fold_in(key, i)``).

    Returns:
        ``TrainState(params, optimizer.init(params), 0, model_state, key)`` holding copies.
    """
    # Copies: the step donates its state's buffers, which must not delete the caller's arrays.
    params, model_state = jax.tree.map(jnp.array, (params, model_state))
    key = None if key is None else key.copy()
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), model_state, key)


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

    def low_precision(params: PyTree, x: Any, *rest: Any) -> Any:
        # rest: the stateful form's model state and key (make_step(has_aux=True)), as given
        cast = _linear_head.cast_floating
        return predictor(cast(params, compute_dtype), cast(x, compute_dtype), *rest)

    return low_precision


def _global_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)) if leaves else jnp.zeros(())


def accuracy(
    logits: jax.Array, labels: jax.Array, **loss_options: Any
) -> tuple[jax.Array, jax.Array]:
    """Accuracy over exactly the examples the loss counts, along the loss's class axis.

    An example counts when the loss counts it: ``where`` true (per example), its label not
    ``ignore_index``, and (with a per-logit ``where``) at least one class left; the prediction is
    the argmax over the classes ``where`` leaves. The target of probability labels is their
    argmax. Class weights do not weight the accuracy (it is a count).

    Args:
        logits: Scores with classes along ``axis`` (flattened in order for a tuple).
        labels: Integer labels or probabilities, as for the loss.
        **loss_options: The loss's options (``axis``, ``where``, ``ignore_index``, ...).

    Returns:
        ``(accuracy, count)``: the fraction of counted examples predicted right (0 when none
        counts) and how many counted, both float32 scalars.
    """
    return accuracy_of(prepare("accuracy", logits, labels, **loss_options))


def accuracy_of(prepared: Prepared) -> tuple[jax.Array, jax.Array]:
    """:func:`accuracy` of a validated call (the step's own, not validated again)."""
    problem, scores = prepared.problem, prepared.logits
    counted = problem.counted_rows()
    if problem.class_mask is not None:
        scores = jnp.where(problem.class_mask, scores, -jnp.inf)
    labels = problem.rows.labels
    target = jnp.argmax(labels, axis=-1) if problem.config.soft else labels
    right = counted & (jnp.argmax(scores, axis=-1) == target)
    count = jnp.sum(counted).astype(jnp.float32)
    return jnp.sum(right).astype(jnp.float32) / jnp.maximum(count, 1.0), count


def _metrics_of(loss: jax.Array, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``loss``, ``accuracy``, ``count`` and, with a head, ``entropy`` and ``lse`` (means)."""
    count = sums["count"]
    per = jnp.maximum(count, 1.0)
    metrics = {"loss": loss, "accuracy": sums["right"] / per, "count": count}
    for name in ("entropy", "lse"):
        if name in sums:
            metrics[name] = sums[name] / per.astype(sums[name].dtype)
    return metrics


StepFn = Callable[..., tuple[TrainState, Metrics]]


def make_step(
    predictor: Predictor,
    optimizer: optax.GradientTransformation,
    *,
    head: LinearHead | None = None,
    has_aux: bool = False,
    mesh: Mesh | None = None,
    compute_dtype: Any = None,
    microbatches: int = 1,
    **loss_options: Any,
) -> StepFn:
    """A jitted training step that uses the hand-derived gradient.

    ``step(state, x, labels, **options) -> (state, metrics)``. Per-batch loss options go to the
    call (``step(state, x, labels, where=padding_mask)``) and override those given here; they
    are traced (one compilation for all batches of a shape), so ``axis``, ``reduction``,
    ``ignore_index`` and ``logit_softcap`` belong here, not in the call.

    With ``head=LinearHead(w=..., bias=...)`` the predictor returns the hidden states
    ``[..., D]`` in front of a linear head and the loss is :func:`jxent.linear_cross_entropy`
    of the hidden states flattened to ``[N, D]``, ``head.w(params)`` ``[D, L]`` and the labels
    (shaped like the hidden states without ``D``, flattened to ``[N]``): the ``[N, L]`` logits
    are never formed. The gradient is ``jax.value_and_grad`` of that, through the fused head's
    own hand-derived rule; tied embeddings (``w=lambda p: p["embed"].T``) get both of their
    uses' gradients. ``where`` is then a token mask shaped like the labels, and the fused
    head's ``chunk_size`` and ``vocab_block_size`` are options here too (not of the call).

    With ``has_aux=True`` the predictor is stateful and random: it is called as
    ``predictor(params, x, model_state, key) -> (logits, new_model_state)`` (hidden states
    with a head) with the state's ``model_state`` (flax ``batch_stats``, equinox ``State``)
    and a key for this step, ``jax.random.fold_in(state.key, state.step)`` (dropout); the step
    stores ``new_model_state`` in the returned state. Give both to :func:`init_state`.

    Args:
        predictor: ``predictor(params, x) -> logits`` (``-> hidden`` with ``head``), or the
            stateful form above.
        optimizer: An optax gradient transformation.
        head: A :class:`LinearHead`: train with the fused head on the predictor's hidden
            states. None: the predictor returns logits.
        has_aux: Whether the predictor is the stateful form.
        mesh: Optional mesh with a ``"data"`` axis (:func:`data_mesh`, ``jax.make_mesh``,
            ``Mesh``; other axes replicate): the batch is sharded along it, the state
            replicated (with a head, each device's fused head scans its own tokens). The batch
            size must divide evenly.
        compute_dtype: Run the predictor in this dtype (e.g. ``jnp.bfloat16``) with float32
            master parameters (a head's ``w`` and ``bias`` too); ``None`` computes in the
            parameters' dtype.
        microbatches: Split each batch into this many micro-batches, run one after the other
            (a ``lax.scan``: the memory of one micro-batch), and make one update from their
            summed gradients -- equal to the whole batch's update for every reduction and
            option: the mean divides by the whole batch's counted examples (class weights'
            total, z-term count), not by each micro-batch's (see ``_microbatch``). With
            ``has_aux``, the model state passes through the micro-batches in order and
            micro-batch ``j`` gets the key ``fold_in(step_key, j)``. Unlike
            ``optax.MultiSteps``, which averages the updates of ``k`` calls (each its own
            mean, so a micro-batch with few counted tokens weighs as much as a full one), this
            is one call per update.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`, or with ``head`` of
            :func:`jxent.linear_cross_entropy` (the reduction must be ``"mean"`` or
            ``"sum"``).

    Returns:
        ``step(state, x, labels, **options)``, jitted (the state's buffers donated); metrics
        are the batch's ``loss``, ``accuracy`` and ``count`` (over exactly the examples the loss
        counts, see :func:`accuracy`) and the gradient's global norm ``grad_norm``; with a
        head also ``entropy`` and ``lse``, the means over the counted tokens of the predicted
        distribution's entropy and of the log-sum-exp (from the fused pass's statistics).

    Raises:
        ValueError: ``reduction="none"``; ``microbatches`` not a positive int; (per call) a
            batch size not divisible by ``microbatches``, or on a mesh a micro-batch not
            divisible by the ``"data"`` axis; a mesh without a ``"data"`` axis; with a head,
            (per call) hidden states whose last dimension is not ``head.w(params)``'s ``D``,
            labels or ``where`` not shaped like the hidden states without ``D``.
        TypeError: A misspelled option (naming ``make_step`` and the closest option); a
            ``head`` that is not a :class:`LinearHead` of functions.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, jxent
        >>> from jxent.predictors import linear
        >>> opt = optax.sgd(0.1)
        >>> state = jxent.train.init_state(linear.init(jax.random.key(0), 3, 2), opt)
        >>> step = jxent.train.make_step(linear.apply, opt)
        >>> state, metrics = step(state, jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]))
        >>> int(state.step)
        1

        A tied-embedding language model: the predictor gives hidden states ``[B, T, D]``.

        >>> def hidden(params, tokens):
        ...     return jnp.tanh(params["embed"][tokens] @ params["mix"])
        >>> params = {"embed": jnp.ones((11, 4)) / 4, "mix": jnp.eye(4)}
        >>> tied = jxent.train.LinearHead(w=lambda params: params["embed"].T)
        >>> step = jxent.train.make_step(hidden, opt, head=tied, ignore_index=0)
        >>> tokens = jnp.array([[3, 5, 7, 0], [2, 4, 6, 8]])
        >>> state, metrics = step(jxent.train.init_state(params, opt), tokens, tokens)
        >>> sorted(metrics)
        ['accuracy', 'count', 'entropy', 'grad_norm', 'loss', 'lse']
        >>> int(metrics["count"])
        7
    """
    own = ("head", "has_aux", "mesh", "compute_dtype", "microbatches")
    _linear_head.check_options(loss_options, "make_step", own, head)
    check_predictor(predictor, "make_step")
    require_scalar(loss_options, "make_step")
    microbatches = _microbatch.check_count(microbatches)
    model = predictor if compute_dtype is None else mixed_precision(predictor, compute_dtype)

    def forward(params: PyTree, x: Any, model_state: PyTree, key: Any) -> tuple[Any, PyTree]:
        """``(scores, new model state)``: logits, or the head's hidden states."""
        if has_aux:
            return logits_and_aux(model(params, x, model_state, key))
        return logits_only(model(params, x)), model_state

    def batch_totals(params, x, labels, options, model_state, key) -> Totals:
        """Loss, gradient and the metrics' sums of one (micro-)batch, ``options`` merged."""
        if head is not None:
            run = functools.partial(forward, x=x, model_state=model_state, key=key)
            return _linear_head.totals(run, head, params, labels, options, compute_dtype, "step")
        out = loss_grads_and_logits(
            lambda p, x: model(p, x, model_state, key) if has_aux else model(p, x),
            params,
            x,
            labels,
            {},
            options,
            "step",
            has_aux,
        )
        acc, count = accuracy_of(out.prepared)
        new_state = out.aux if has_aux else model_state
        return Totals(out.loss, out.grads, {"right": acc * count, "count": count}, new_state)

    def whole_problem(params, first, labels, options, model_state, key):
        """The whole batch's problem from the first micro-batch's scores' shape."""
        run = functools.partial(forward, model_state=model_state, key=key)
        if head is not None:
            return _linear_head.whole_batch_problem(
                run, head, params, first, labels, options, microbatches, compute_dtype
            )
        shape = jax.eval_shape(lambda p, x: run(p, x)[0], params, first)
        full = jax.ShapeDtypeStruct((shape.shape[0] * microbatches, *shape.shape[1:]), shape.dtype)
        return prepare_problem("step", full, labels, **options)[0]

    def step(state: TrainState, x: Any, labels: Any, **call: Any) -> tuple[TrainState, Metrics]:
        options = merged(loss_options, call, "step")
        key = None
        if has_aux and state.key is not None:
            key = jax.random.fold_in(state.key, state.step)
        if microbatches == 1:
            totals = batch_totals(state.params, x, labels, options, state.model_state, key)
        else:
            totals = micro_totals(state, x, labels, options, key)
        updates, opt_state = optimizer.update(totals.grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state = totals.model_state if has_aux else state.model_state
        new = TrainState(params, opt_state, state.step + 1, model_state, state.key)
        metrics = _metrics_of(totals.loss, totals.sums)
        return new, metrics | {"grad_norm": _global_norm(totals.grads)}

    def micro_totals(state: TrainState, x, labels, options, key) -> Totals:
        rows = jnp.shape(labels)[0]
        _microbatch.check_divides(rows, microbatches)
        per_example, _ = _microbatch.per_example(options, rows)
        first = jax.tree.map(lambda a: a[0], _microbatch.split(x, microbatches))
        problem = whole_problem(state.params, first, labels, options, state.model_state, key)
        micro, denominator = _microbatch.micro_options(options, problem)

        def grad_fn(params: PyTree, part: tuple, model_state: PyTree, index: Any) -> Totals:
            x_j, labels_j, per_example_j = part
            sub_key = None if key is None else jax.random.fold_in(key, index)
            options_j = {**micro, **per_example_j}
            return batch_totals(params, x_j, labels_j, options_j, model_state, sub_key)

        batch = (x, labels, per_example)
        return _microbatch.accumulate(
            grad_fn, state.params, batch, microbatches, state.model_state, denominator
        )

    def reject_per_call(options: dict[str, Any]) -> None:
        reject_structural(options, "step")
        _linear_head.reject_per_call(options, "step")

    if mesh is None:
        jitted_step = jax.jit(step, donate_argnums=0)

        def checked_step(
            state: TrainState, x: Any, labels: Any, **options: Any
        ) -> tuple[TrainState, Metrics]:
            reject_per_call(options)
            return jitted_step(state, x, labels, **options)

        return checked_step
    return _on_mesh(step, mesh, microbatches, reject_per_call)


def _on_mesh(
    step: Callable[..., Any],
    mesh: Mesh,
    microbatches: int,
    reject_per_call: Callable[[dict[str, Any]], None],
) -> StepFn:
    """``step`` with the batch sharded over the mesh's ``"data"`` axis, the state replicated.

    Any mesh works: ``jax.make_mesh`` (Explicit axes), ``Mesh(...)`` (Auto); inputs already laid
    out so are not moved.
    """
    if DATA_AXIS not in mesh.shape:
        raise ValueError(
            f"mesh must have a {DATA_AXIS!r} axis to shard the batch over, found axes "
            f"{tuple(mesh.axis_names)}"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    shards = mesh.shape[DATA_AXIS]
    # No in_shardings: the inputs are placed below and jit follows them, which also covers
    # per-batch options (a `where` mask is sharded like the batch, a scalar replicated).
    jitted = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)

    def sharded_step(
        state: TrainState, x: Any, labels: Any, **options: Any
    ) -> tuple[TrainState, Metrics]:
        reject_per_call(options)
        rows = jnp.shape(labels)[0]
        _microbatch.check_divides(rows, microbatches)
        if (rows // microbatches) % shards:
            raise ValueError(
                f"the batch of {rows} examples in microbatches={microbatches} micro-batches of "
                f"{rows // microbatches} does not shard over the {shards} devices of mesh axis "
                f"{DATA_AXIS!r}: make each micro-batch a multiple of {shards}"
            )

        def place(a: Any) -> Any:
            per_example = jnp.ndim(a) > 0 and jnp.shape(a)[0] == rows
            return jax.device_put(a, batch if per_example else replicated)

        state = jax.device_put(state, replicated)
        x, labels = jax.device_put((x, labels), batch)
        return jitted(state, x, labels, **jax.tree.map(place, options))

    return sharded_step


def evaluate(
    predictor: Predictor,
    params: PyTree,
    x: Any,
    labels: Any,
    *,
    head: LinearHead | None = None,
    **loss_options: Any,
) -> dict[str, float]:
    """Loss and accuracy of ``predictor`` on a whole data set (one jitted call).

    The compiled function is cached by predictor, head, shapes and static options (``axis``,
    ``reduction``, ``ignore_index``, ``logit_softcap``, the head's ``chunk_size`` and options
    given as Python numbers; arrays such as ``where`` or ``weights`` are traced): calling
    ``evaluate`` again after every epoch does not recompile. Pass the same predictor (and head)
    object each time (a new ``lambda`` or ``functools.partial`` per call is a new function to
    JAX).

    Args:
        predictor: ``predictor(params, x) -> logits`` (``-> hidden`` with ``head``; for a
            stateful model: its inference mode, e.g.
            ``lambda p, x: model.apply({"params": p, **state}, x, train=False)``).
        params: Parameters.
        x: Inputs.
        labels: Integer labels or probabilities.
        head: A :class:`LinearHead`: the loss is :func:`jxent.linear_cross_entropy` of the
            predictor's hidden states, as in :func:`make_step`.
        **loss_options: Options of the loss; accuracy counts what the loss counts.

    Returns:
        ``{"loss": float, "accuracy": float, "count": float}``, with a head also ``entropy``
        and ``lse`` (means over the counted tokens).

    Raises:
        TypeError: A misspelled loss option; a ``head`` that is not a :class:`LinearHead`.
        ValueError: ``reduction="none"`` (one loss is reported), and what the loss raises for
            the labels and options.
    """
    _linear_head.check_options(loss_options, "evaluate", ("head",), head)
    require_scalar(loss_options, "evaluate")
    static, arrays = split_static(loss_options)
    scores = _evaluate_jit(predictor, head, static, params, x, labels, arrays)
    return {k: float(v) for k, v in scores.items()}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _evaluate_jit(
    predictor: Predictor,
    head: LinearHead | None,
    static: tuple[tuple[str, Any], ...],
    params: PyTree,
    x: Any,
    labels: Any,
    arrays: dict[str, Any],
) -> Metrics:
    options = {**dict(static), **arrays}
    if head is not None:
        run = lambda p: (logits_only(predictor(p, x)), None)  # noqa: E731
        loss, (stats, counted, _) = _linear_head.loss_and_stats(
            run, head, params, labels, options, None, "evaluate"
        )
        return _metrics_of(loss, _linear_head.sums_of(stats, counted))
    logits = logits_only(predictor(params, x))
    acc, count = accuracy(logits, labels, **options)
    loss = softmax_cross_entropy(logits, labels, **options)
    return {"loss": loss, "accuracy": acc, "count": count}


def fit(
    predictor: Predictor,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    data: tuple[Any, ...],
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    eval_data: tuple[Any, ...] | None = None,
    progress: bool = True,
    callbacks: Iterable[Callable[[dict[str, float]], None]] = (),
    mesh: Mesh | None = None,
    compute_dtype: Any = None,
    has_aux: bool = False,
    model_state: PyTree = None,
    eval_predictor: Callable[[PyTree, Any, PyTree], jax.Array] | None = None,
    microbatches: int = 1,
    head: LinearHead | None = None,
    **loss_options: Any,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains ``predictor`` with the hand-derived gradient: shuffled minibatches, per-epoch eval.

    Each epoch draws a permutation with ``jax.random.permutation(fold_in(key, epoch))`` and
    runs ``len(x) // batch_size`` full batches (the remainder of the permutation is skipped
    that epoch; it differs every epoch). The progress bar is tqdm's, when tqdm is installed
    (``pip install "jxent[demo]"``): it is small, pure Python and has no dependencies of its own.

    Args:
        predictor: ``predictor(params, x) -> logits``, or with ``has_aux`` the stateful form of
            :func:`make_step`, ``predictor(params, x, model_state, key) -> (logits, model_state)``.
        params: Initial parameters.
        optimizer: An optax gradient transformation.
        data: ``(x, labels)`` training arrays, or ``(x, labels, where)`` with a per-example mask
            (e.g. padding) shaped like integer labels; batches are drawn along the first axis.
        epochs: Number of passes over ``data``.
        batch_size: Examples per step.
        key: PRNG key for shuffling (and, folded with 1, the per-step keys of ``has_aux``).
        eval_data: Optional ``(x, labels)`` or ``(x, labels, where)`` evaluated after every epoch
            (one compilation, see :func:`evaluate`).
        progress: Show a progress bar.
        callbacks: Called with each epoch's history record.
        mesh: Data-parallel mesh, as for :func:`make_step`.
        compute_dtype: Mixed precision, as for :func:`make_step`.
        has_aux: The predictor is stateful and random (see :func:`make_step`).
        model_state: Its initial state (e.g. flax ``variables["batch_stats"]``).
        eval_predictor: With ``has_aux`` and ``eval_data``: inference mode,
            ``eval_predictor(params, x, model_state) -> logits`` (running averages, no dropout).
        microbatches: Each step's batch in this many micro-batches with one exact update, as
            for :func:`make_step`; ``batch_size`` must be a multiple of it.
        head: A :class:`LinearHead`: the predictor (and ``eval_predictor``) return hidden
            states and the loss is the fused head's, as for :func:`make_step`.
        **loss_options: Options of the loss.

    Returns:
        ``(params, history)`` -- ``((params, model_state), history)`` with ``has_aux`` -- and one
        record per epoch with ``epoch``, ``train_loss`` (mean over the epoch's steps),
        ``train_accuracy`` (over the epoch's counted examples), ``eval_loss``,
        ``eval_accuracy`` (with ``eval_data``), ``train_seconds`` (the epoch's steps),
        ``seconds`` (the whole epoch, evaluation included) and, in the first record,
        ``first_step_seconds`` (the first step, its compilation included).

    Raises:
        ValueError: ``batch_size`` larger than the data or not a multiple of ``microbatches``;
            ``has_aux`` with ``eval_data`` but no ``eval_predictor``.
    """
    for name, given in (("data", data), ("eval_data", eval_data)):
        if given is not None and len(given) not in (2, 3):
            raise ValueError(
                f"{name} must be (x, labels) or (x, labels, where), found {len(given)}"
            )
    if eval_predictor is not None and not has_aux:
        raise ValueError("eval_predictor is for has_aux=True; without it, eval uses the predictor")
    arrays = tuple(jnp.asarray(a) for a in data)
    steps = arrays[0].shape[0] // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {arrays[0].shape[0]} training examples"
        )
    _microbatch.check_divides(batch_size, _microbatch.check_count(microbatches))
    if has_aux and eval_data is not None and eval_predictor is None:
        raise ValueError(
            "fit(has_aux=True, eval_data=...) needs eval_predictor(params, x, model_state) -> "
            "logits: the model's inference mode (running statistics, no dropout)"
        )
    step = make_step(
        predictor,
        optimizer,
        has_aux=has_aux,
        mesh=mesh,
        compute_dtype=compute_dtype,
        microbatches=microbatches,
        head=head,
        **loss_options,
    )
    step_key = jax.random.fold_in(key, 1) if has_aux else None
    state = init_state(params, optimizer, model_state=model_state, key=step_key)
    bar = _progress(epochs * steps, progress)
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        order = jax.random.permutation(jax.random.fold_in(key, epoch), arrays[0].shape[0])
        sums = {"loss": 0.0, "right": 0.0, "count": 0.0}
        first_step = None
        for i in range(steps):
            batch = _batch(arrays, order[i * batch_size : (i + 1) * batch_size])
            state, metrics = step(state, *batch[:2], **batch[2])
            if epoch == 0 and i == 0:  # compilation happens here: timed apart from the rest
                jax.block_until_ready(metrics)
                first_step = time.perf_counter() - start
            sums["loss"] += metrics["loss"]
            sums["right"] += metrics["accuracy"] * metrics["count"]
            sums["count"] += metrics["count"]
            if bar is not None:
                bar.update(1)
        jax.block_until_ready(state)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(sums["loss"]) / steps,
            "train_accuracy": float(sums["right"]) / max(float(sums["count"]), 1.0),
            "train_seconds": time.perf_counter() - start,
        }
        if first_step is not None:
            record["first_step_seconds"] = first_step
        if eval_data is not None:
            scores = _eval(predictor, eval_predictor, state, eval_data, has_aux, head, loss_options)
            record["eval_loss"] = scores["loss"]
            record["eval_accuracy"] = scores["accuracy"]
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if bar is not None:
            short = {"train_loss": "loss", "train_accuracy": "acc", "eval_accuracy": "eval_acc"}
            bar.set_postfix({v: f"{record[k]:.4f}" for k, v in short.items() if k in record})
        for callback in callbacks:
            callback(record)
    if bar is not None:
        bar.close()
    return ((state.params, state.model_state) if has_aux else state.params), history


def _batch(arrays: tuple[jax.Array, ...], idx: jax.Array) -> tuple[Any, Any, dict[str, Any]]:
    """``(x, labels, options)`` of one batch; a third data array is the ``where`` mask."""
    options = {"where": arrays[2][idx]} if len(arrays) > 2 else {}
    return arrays[0][idx], arrays[1][idx], options


def _eval(
    predictor: Predictor,
    eval_predictor: Callable[..., jax.Array] | None,
    state: TrainState,
    eval_data: tuple[Any, ...],
    has_aux: bool,
    head: LinearHead | None,
    loss_options: dict[str, Any],
) -> dict[str, float]:
    options = dict(loss_options)
    if len(eval_data) > 2:
        options["where"] = eval_data[2]
    if has_aux:  # the model state is an argument, so the compiled evaluation is reused
        params_and_state = (state.params, state.model_state)
        head = None if head is None else _head_with_state(head)
        return evaluate(
            _with_state(eval_predictor), params_and_state, *eval_data[:2], head=head, **options
        )
    return evaluate(predictor, state.params, *eval_data[:2], head=head, **options)


@functools.cache
def _with_state(eval_predictor: Callable[..., jax.Array]) -> Predictor:
    """``(params, model_state), x -> logits``: one function object per eval_predictor."""

    def predictor(params_and_state: tuple[PyTree, PyTree], x: Any) -> jax.Array:
        return eval_predictor(params_and_state[0], x, params_and_state[1])

    return predictor


@functools.cache
def _head_with_state(head: LinearHead) -> LinearHead:
    """``head`` of ``(params, model_state)``: one head object per head, as :func:`_with_state`."""
    bias = None if head.bias is None else lambda ps: head.bias(ps[0])
    return LinearHead(w=lambda ps: head.w(ps[0]), bias=bias)


class GNBState(NamedTuple):
    """The key of :func:`gnb_estimator`'s next draw."""

    key: jax.Array


def gnb_estimator(
    predictor: Predictor, key: jax.Array, **options: Any
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia-G's Hessian-diagonal estimator as an optax transformation.

    For ``optax.contrib.sophia(..., hessian_diagonal_fn=gnb_estimator(predictor, key))``: its
    ``update(updates, state, params, x=batch_inputs)`` returns :func:`jxent.gnb_diagonal` of the
    mean loss on ``x`` (labels drawn from the model with a fresh key every call) and ignores
    ``updates``. Pass the batch's inputs to the optimizer's ``update`` as ``x=``; Sophia calls
    the estimator every ``update_interval`` steps.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        key: PRNG key of the label draws.
        **options: :func:`jxent.gnb_diagonal`'s options (``axis``, ``where``,
            ``logit_softcap``).

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Raises:
        ValueError: (at ``update``) ``params`` or ``x`` not given.

    References:
        Liu et al. 2023 (Sophia-G, Algorithm 2); ``optax.contrib.sophia``.
    """
    gnb = gnb_diagonal(predictor, **options)

    def init(params: PyTree) -> GNBState:
        del params
        return GNBState(key)

    def update(
        updates: PyTree, state: GNBState, params: PyTree = None, x: Any = None, **extra: Any
    ) -> tuple[PyTree, GNBState]:
        del updates, extra
        if params is None or x is None:
            raise ValueError("gnb_estimator's update needs params= and x= (the batch's inputs)")
        draw, nxt = jax.random.split(state.key)
        return gnb(params, x, draw), GNBState(nxt)

    return optax.GradientTransformationExtraArgs(init, update)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional: training works without a bar
        return None
    return tqdm(total=total, unit="step", desc="training")
