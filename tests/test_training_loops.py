"""Training loops as users write them: stateful/random predictors (flax, equinox), true
signatures, metrics that count what the loss counts, per-batch masks, and evaluation that
compiles once. References: ``jax.value_and_grad(..., has_aux=True)`` of the plainly written loss,
and accuracies counted with numpy."""

import functools
import inspect
import itertools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from _reference import reference_loss
from jxent.predictors import linear, mlp


class Net(nn.Module):
    """Dense -> BatchNorm -> relu -> Dropout -> Dense: running statistics and a dropout key."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(5)(x)


NET = Net()


def flax_train(params, x, batch_stats, key):
    """The stateful form make_step takes: (params, x, model_state, key) -> (logits, state)."""
    logits, updates = NET.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": key},
    )
    return logits, updates["batch_stats"]


def flax_eval(params, x, batch_stats):
    return NET.apply({"params": params, "batch_stats": batch_stats}, x, train=False)


def flax_problem(dtype=jnp.float32):
    k_init, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k_x, (4, 32, 8), dtype)  # 4 batches of 32
    y = jax.random.randint(k_y, (4, 32), 0, 5)
    variables = NET.init(k_init, x[0], train=False)
    return variables["params"], variables["batch_stats"], x, y


# --- 1. has_aux ------------------------------------------------------------------------------


def test_value_and_grad_has_aux_matches_jax_with_a_flax_batchnorm_dropout_model(x64):
    params, stats, x, y = flax_problem(jnp.float64)
    key = jax.random.key(7)

    def predictor(p, xb):
        return flax_train(p, xb, stats, key)

    (loss, new_stats), grads = jxent.value_and_grad(predictor, has_aux=True)(params, x[0], y[0])

    def plain(p):
        logits, aux = predictor(p, x[0])
        return reference_loss(logits, y[0]), aux

    (want_loss, want_stats), want = jax.value_and_grad(plain, has_aux=True)(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), new_stats, want_stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), grads, want)
    g, aux = jxent.grad(predictor, has_aux=True)(params, x[0], y[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), g, want)
    assert jax.tree.structure(aux) == jax.tree.structure(want_stats)


@pytest.mark.slow  # the README command's time budget; the has_aux gradient test stays there
def test_make_step_trains_a_flax_batchnorm_dropout_model_like_a_plain_loop():
    params, stats, x, y = flax_problem()
    # SGD, not Adam: Adam turns the rounding noise of gradients that are zero in exact
    # arithmetic (the bias before BatchNorm) into full-size steps of either sign.
    opt = optax.sgd(0.1)
    key = jax.random.key(3)
    step = jxent.train.make_step(flax_train, opt, has_aux=True, label_smoothing=0.1)
    state = jxent.train.init_state(params, opt, model_state=stats, key=key)
    losses, seen_stats = [], [stats]
    for i in range(4):
        state, metrics = step(state, x[i], y[i])
        losses.append(float(metrics["loss"]))
        seen_stats.append(jax.tree.map(np.asarray, state.model_state))  # the step donates it
    # The reference: jax.value_and_grad(has_aux=True) of the plain loss, the same per-step keys.
    p, s, o = params, stats, opt.init(params)
    for i in range(4):
        k = jax.random.fold_in(key, i)

        def plain(q, s=s, k=k, i=i):
            logits, new = flax_train(q, x[i], s, k)
            return reference_loss(logits, y[i], label_smoothing=0.1), new

        (loss, s), g = jax.value_and_grad(plain, has_aux=True)(p)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        updates, o = opt.update(g, o, p)
        p = optax.apply_updates(p, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state.params, p
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state.model_state, s)
    # the running statistics move every step
    means = [np.asarray(t["BatchNorm_0"]["mean"]) for t in seen_stats]
    assert all(not np.allclose(a, b) for a, b in itertools.pairwise(means))


def test_fit_with_has_aux_returns_the_model_state_and_evaluates_in_inference_mode():
    params, stats, x, y = flax_problem()
    xs, ys = x.reshape(-1, 8), y.reshape(-1)
    (p, s), history = jxent.train.fit(
        flax_train,
        params,
        optax.adam(1e-2),
        (xs, ys),
        epochs=3,
        batch_size=32,
        key=jax.random.key(0),
        eval_data=(xs, ys),
        has_aux=True,
        model_state=stats,
        eval_predictor=flax_eval,
        progress=False,
    )
    assert not np.allclose(s["BatchNorm_0"]["var"], stats["BatchNorm_0"]["var"])
    logits = flax_eval(p, xs, s)
    np.testing.assert_allclose(history[-1]["eval_loss"], reference_loss(logits, ys), rtol=1e-5)
    want_acc = np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(ys))
    np.testing.assert_allclose(history[-1]["eval_accuracy"], want_acc, rtol=1e-6)
    with pytest.raises(ValueError, match="eval_predictor"):
        jxent.train.fit(
            flax_train, params, optax.sgd(0.1), (xs, ys), epochs=1, batch_size=32,
            key=jax.random.key(0), eval_data=(xs, ys), has_aux=True, model_state=stats,
            progress=False,
        )  # fmt: skip


class EqxNet(eqx.Module):
    """An equinox model with BatchNorm (eqx.nn.State) and Dropout, vmapped over the batch."""

    layers: tuple
    norm: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = (eqx.nn.Linear(8, 16, key=k1), eqx.nn.Linear(16, 5, key=k2))
        self.norm = eqx.nn.BatchNorm(16, axis_name="batch", momentum=0.9, mode="batch")
        self.drop = eqx.nn.Dropout(0.3)

    def __call__(self, x, state, key):
        h, state = self.norm(self.layers[0](x), state)
        return self.layers[1](self.drop(jax.nn.relu(h), key=key)), state


def test_equinox_stateful_model_with_has_aux_matches_jax(x64):
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(1), (16, 8), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 5)
    key = jax.random.key(3)

    def predictor(p, xb):
        net = eqx.combine(p, static)
        keys = jax.random.split(key, xb.shape[0])
        logits, new = jax.vmap(net, in_axes=(0, None, 0), out_axes=(0, None), axis_name="batch")(
            xb, state, keys
        )
        return logits, new

    (loss, new_state), grads = jxent.value_and_grad(predictor, has_aux=True)(params, x, y)

    def plain(p):
        logits, new = predictor(p, x)
        return reference_loss(logits, y), new

    (want_loss, _), want = jax.value_and_grad(plain, has_aux=True)(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert isinstance(new_state, eqx.nn.State)


def test_a_tuple_without_has_aux_is_a_clear_error():
    params = linear.init(jax.random.key(0), 3, 4)
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])

    def two(p, x):
        return linear.apply(p, x), linear.apply(p, x)

    with pytest.raises(TypeError, match=r"returned a tuple of 2 .*pass has_aux=True"):
        jxent.value_and_grad(two)(params, x, y)
    with pytest.raises(TypeError, match="returned a tuple of 2"):
        jax.jit(jxent.grad(two))(params, x, y)
    # every entry point that takes a predictor says the same
    with pytest.raises(TypeError, match=r"returned a tuple of 2 .*pass has_aux=True"):
        jxent.train.evaluate(two, params, x, y)
    with pytest.raises(TypeError, match=r"returned a tuple of 2 .*pass has_aux=True"):
        jxent.check_grads(jxent.grad(linear.apply), two, params, x, y)
    with pytest.raises(
        TypeError, match=r"must return \(logits, aux\), found one array of shape \(2, 4\)"
    ):
        jxent.value_and_grad(linear.apply, has_aux=True)(params, x, y)

    def stateless(p, x, model_state, key):
        return linear.apply(p, x)

    with pytest.raises(TypeError, match="must return"):
        jxent.train.make_step(stateless, optax.sgd(0.1), has_aux=True)(
            jxent.train.init_state(params, optax.sgd(0.1)), x, y
        )


# --- 2. true signatures ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")  # labels: no output
@pytest.mark.parametrize("make", [jxent.value_and_grad, jxent.grad])
def test_returned_functions_report_their_true_signature(make):
    f = make(mlp.apply)
    assert list(inspect.signature(f).parameters) == ["params", "x", "labels", "options"]
    assert f.__name__ == f"{make.__name__}(mlp_apply)"
    params = mlp.init(jax.random.key(0), [3, 4, 5])
    x, y = jnp.ones((6, 3)), jnp.arange(6) % 5
    want = make(mlp.apply, reduction="sum")(params, x, y)
    got = jax.jit(f, static_argnames=("reduction",))(params, x, y, reduction="sum")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    got = jax.jit(f, donate_argnames=("labels",))(params, x, jnp.arange(6) % 5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, make(mlp.apply)(params, x, y)
    )
    got = eqx.filter_jit(f)(params, x, labels=y)  # binds labels by name
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, make(mlp.apply)(params, x, y)
    )


# --- 3. metrics count what the loss counts; per-batch options --------------------------------


def _numpy_accuracy(logits, labels, counted):
    right = (np.argmax(np.asarray(logits), -1) == np.asarray(labels)) & np.asarray(counted)
    return right.sum() / max(np.asarray(counted).sum(), 1)


def test_accuracy_ignores_ignored_and_masked_examples():
    params = linear.init(jax.random.key(0), 3, 4)
    x = jax.random.normal(jax.random.key(1), (10, 3))
    logits = linear.apply(params, x)
    predicted = np.asarray(jnp.argmax(logits, -1))
    # 6 counted examples all right; 4 ignored ones wrong: the accuracy is 1, not 0.6
    y = np.where(np.arange(10) < 6, predicted, (predicted + 1) % 4)
    y_ignored = np.where(np.arange(10) < 6, y, -100)
    opt = optax.sgd(0.0)
    state = jxent.train.init_state(params, opt)
    _, m = jxent.train.make_step(linear.apply, opt, ignore_index=-100)(state, x, y_ignored)
    assert float(m["accuracy"]) == 1.0
    assert float(m["count"]) == 6
    # the same through a per-batch `where`, given to the step call
    state = jxent.train.init_state(params, opt)
    where = jnp.arange(10) < 6
    _, m = jxent.train.make_step(linear.apply, opt)(state, x, jnp.asarray(y), where=where)
    assert float(m["accuracy"]) == 1.0
    np.testing.assert_allclose(m["loss"], reference_loss(logits, jnp.asarray(y), where=where), 1e-6)
    scores = jxent.train.evaluate(linear.apply, params, x, jnp.asarray(y), where=where)
    assert scores == {
        "loss": pytest.approx(float(m["loss"]), rel=1e-6),
        "accuracy": 1.0,
        "count": 6.0,
    }


def test_accuracy_along_the_class_axis_of_a_segmentation_layout():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))  # [B, C, H, W]
    labels = jax.random.randint(jax.random.key(1), (2, 3, 4), 0, 5)
    acc, count = jxent.train.accuracy(logits, labels, axis=1, ignore_index=0)
    counted = np.asarray(labels) != 0
    want = _numpy_accuracy(np.moveaxis(np.asarray(logits), 1, -1), labels, counted)
    np.testing.assert_allclose(acc, want, rtol=1e-6)
    assert float(count) == counted.sum()
    # a step on a per-pixel classifier (1x1 convolution) with the class axis at 1
    w = jax.random.normal(jax.random.key(2), (5, 6))
    x = jax.random.normal(jax.random.key(3), (2, 6, 3, 4))

    def conv1x1(p, xb):
        return jnp.einsum("cd,bdhw->bchw", p, xb)

    opt = optax.sgd(0.0)
    _, m = jxent.train.make_step(conv1x1, opt, axis=1)(jxent.train.init_state(w, opt), x, labels)
    want = _numpy_accuracy(
        np.moveaxis(np.asarray(conv1x1(w, x)), 1, -1), labels, np.ones((2, 3, 4), bool)
    )
    np.testing.assert_allclose(m["accuracy"], want, rtol=1e-6)


def test_accuracy_with_probability_labels_and_a_per_logit_mask():
    logits = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    probs = jnp.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8], [0.7, 0.2, 0.1]])
    # class 0 masked out for every row: predictions 1, 1, 1 (row 2's tie goes to the first);
    # targets (argmax of probabilities) 1, 2, 0
    where = jnp.array([[False, True, True]])
    acc, count = jxent.train.accuracy(logits, probs, where=where)
    np.testing.assert_allclose(acc, 1 / 3)
    assert float(count) == 3


def test_evaluate_compiles_once_for_repeated_calls():
    params = mlp.init(jax.random.key(0), [3, 4, 5])
    x, y = jnp.ones((6, 3)), jnp.arange(6) % 5
    jxent.train.evaluate(mlp.apply, params, x, y, label_smoothing=0.1, where=x[:, 0] > 0)
    size = jxent.train._training._evaluate_jit._cache_size()
    for epoch in range(3):  # new parameters and masks every "epoch": one compilation in all
        params = jax.tree.map(lambda a: a * 0.9, params)
        mask = jnp.arange(6) != epoch
        jxent.train.evaluate(mlp.apply, params, x, y, label_smoothing=0.1, where=mask)
    assert jxent.train._training._evaluate_jit._cache_size() == size


def test_fit_takes_a_padding_mask_with_the_data():
    params = linear.init(jax.random.key(0), 3, 4)
    x = jax.random.normal(jax.random.key(1), (64, 3))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 4)
    where = jnp.arange(64) % 4 != 0  # every 4th example is padding
    y_pad = jnp.where(where, y, 999)  # padding labels out of range: must never be read
    opt = optax.sgd(0.0)  # no update: the history is the initial model's
    _, history = jxent.train.fit(
        linear.apply, params, opt, (x, y_pad, where), epochs=1, batch_size=16,
        key=jax.random.key(0), eval_data=(x, y_pad, where), progress=False,
    )  # fmt: skip
    logits = linear.apply(params, x)
    np.testing.assert_allclose(
        history[0]["eval_loss"], reference_loss(logits, y, where=where), 1e-6
    )
    want = _numpy_accuracy(logits, y, where)
    np.testing.assert_allclose(history[0]["train_accuracy"], want, rtol=1e-6)
    np.testing.assert_allclose(history[0]["eval_accuracy"], want, rtol=1e-6)


# --- 5. misspelled options name the function called ------------------------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: jxent.value_and_grad(mlp.apply, label_smothing=0.1), "value_and_grad"),
        (lambda: jxent.grad(mlp.apply, label_smothing=0.1), "grad"),
        (lambda: jxent.train.make_step(mlp.apply, optax.sgd(1.0), label_smothing=0.1), "make_step"),
        (
            lambda: jxent.softmax_cross_entropy(
                jnp.ones((1, 2)), jnp.array([0]), label_smothing=0.1
            ),
            "softmax_cross_entropy",
        ),
    ],
)
def test_misspelled_option_names_the_function_and_the_closest_option(call, name):
    with pytest.raises(
        TypeError,
        match=rf"^{name}\(\) got an unknown loss option 'label_smothing'; "
        r"did you mean 'label_smoothing'\?",
    ):
        call()


# --- what a new user tried next ------------------------------------------------------------


def test_stateful_step_in_bfloat16_passes_state_and_key_through():
    params, stats, x, y = flax_problem()
    opt = optax.sgd(0.1)
    step = jxent.train.make_step(flax_train, opt, has_aux=True, compute_dtype=jnp.bfloat16)
    state = jxent.train.init_state(params, opt, model_state=stats, key=jax.random.key(0))
    state, metrics = step(state, x[0], y[0])
    assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # float32 master parameters
    assert not np.allclose(state.model_state["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])


def test_misplaced_and_ignored_arguments_are_errors():
    params = linear.init(jax.random.key(0), 3, 4)
    x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    opt = optax.sgd(0.1)
    step = jxent.train.make_step(linear.apply, opt)
    for name, value in [
        ("axis", 1),
        ("ignore_index", 3),
        ("logit_softcap", 5.0),
        ("reduction", "sum"),
    ]:
        with pytest.raises(TypeError, match=rf"{name}= shapes the compiled step: give it to"):
            step(jxent.train.init_state(params, opt), x, y, **{name: value})
    with pytest.raises(ValueError, match=r"evaluate needs one loss: .* found .none."):
        jxent.train.evaluate(linear.apply, params, x, y, reduction="none")
    fit = functools.partial(
        jxent.train.fit, linear.apply, params, opt, epochs=1, batch_size=4,
        key=jax.random.key(0), progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"data must be \(x, labels\) or \(x, labels, where\)"):
        fit((x, y, y > 0, y))
    with pytest.raises(ValueError, match="eval_predictor is for has_aux=True"):
        fit((x, y), eval_data=(x, y), eval_predictor=lambda p, x, s: linear.apply(p, x))
    with pytest.raises(TypeError, match="logits must be one array, found a tuple"):
        jxent.softmax_cross_entropy((x, x), y)
