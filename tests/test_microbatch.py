"""Exact micro-batching: ``microbatches=k`` makes the whole batch's update, for every option.

Two legs: the micro-batched step equals the one-batch step (the accumulation is exact), and its
gradient equals ``jax.grad`` of the plainly written reference loss on the whole batch (which
shares no code with jxent). The 8-device mesh cases run in ``tests/scripts/sharded.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from _reference import reference_loss
from jxent.predictors import mlp

B, F, C = 24, 6, 5
OPTIONS = {
    "plain": {},
    "weights_smoothing_z": {
        "weights": np.array([1.0, 2.0, 0.5, 3.0, 1.5]),
        "label_smoothing": 0.1,
        "z_loss": 1e-2,
    },
    "ignore_index_weights": {"ignore_index": -100, "weights": np.array([1.0, 2.0, 0.5, 3.0, 1.5])},
}


def _batch(key, soft=False):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (B, F), jnp.float64)
    if soft:
        return x, jax.nn.softmax(jax.random.normal(ky, (B, C), jnp.float64))
    y = jax.random.randint(ky, (B,), 0, C)
    return x, y.at[::5].set(-100)  # ignored where ignore_index=-100, else relabelled below


def _sgd_grads(params, new_params):
    """SGD(1) updates are minus the gradient."""
    return jax.tree.map(lambda p, q: p - q, params, new_params)


@pytest.mark.parametrize(
    "reduction",
    ["mean", pytest.param("sum", marks=pytest.mark.slow)],  # time budget: sum slow
)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_microbatched_step_equals_whole_batch_and_the_plain_loss(x64, key, name, reduction):
    options = OPTIONS[name]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp.init(key, [F, 8, C]))
    x, y = _batch(jax.random.fold_in(key, 1))
    if "ignore_index" not in options:
        y = jnp.abs(y) % C
    # Micro-batch j holds examples j, j + k, ...: with k = 3 they count 6, 4 and 1 example.
    where = jnp.isin(jnp.arange(B), jnp.array([0, 3, 6, 9, 12, 15, 1, 4, 7, 10, 2]))
    opt = optax.sgd(1.0)
    whole = jxent.train.make_step(mlp.apply, opt, reduction=reduction, **options)
    s1, m1 = whole(jxent.train.init_state(params, opt), x, y, where=where)
    for k in (3, 4):
        micro = jxent.train.make_step(
            mlp.apply, opt, reduction=reduction, microbatches=k, **options
        )
        sk, mk = micro(jxent.train.init_state(params, opt), x, y, where=where)
        for a, b in zip(jax.tree.leaves(sk.params), jax.tree.leaves(s1.params)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        for metric in ("loss", "accuracy", "count", "grad_norm"):
            np.testing.assert_allclose(mk[metric], m1[metric], rtol=1e-12, err_msg=metric)
    # independent leg: jax.grad of the plain loss over the whole batch
    plain = jax.grad(
        lambda p: reference_loss(mlp.apply(p, x), y, where=where, reduction=reduction, **options)
    )(params)
    for a, b in zip(jax.tree.leaves(_sgd_grads(params, sk.params)), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_microbatched_probability_labels_and_per_batch_options(x64, key):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp.init(key, [F, 8, C]))
    x, q = _batch(jax.random.fold_in(key, 1), soft=True)
    where = jnp.arange(B) % 5 != 0
    opt = optax.sgd(1.0)
    z = jnp.asarray(3e-2)  # a traced per-call option, scaled for the micro-batches
    whole = jxent.train.make_step(mlp.apply, opt, label_smoothing=0.2)
    micro = jxent.train.make_step(mlp.apply, opt, label_smoothing=0.2, microbatches=6)
    s1, _ = whole(jxent.train.init_state(params, opt), x, q, where=where, z_loss=z)
    s6, _ = micro(jxent.train.init_state(params, opt), x, q, where=where, z_loss=z)
    for a, b in zip(jax.tree.leaves(s6.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_optax_multisteps_differs_where_microbatching_does_not(x64, key):
    """docs/sharded.md's claim: averaging micro-batch means (optax.MultiSteps) is not the mean."""
    params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp.init(key, [F, 8, C]))
    x, y = _batch(jax.random.fold_in(key, 1))
    y = jnp.abs(y) % C
    where = jnp.arange(B) < 15  # first half 12 counted, second half 3
    opt = optax.sgd(1.0)
    s1, _ = jxent.train.make_step(mlp.apply, opt)(
        jxent.train.init_state(params, opt), x, y, where=where
    )
    multi = optax.MultiSteps(opt, 2)
    step = jxent.train.make_step(mlp.apply, multi)
    state = jxent.train.init_state(params, multi)
    for half in (slice(0, 12), slice(12, 24)):
        state, _ = step(state, x[half], y[half], where=where[half])
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s1.params))
    )
    assert gap > 1e-3


def test_fit_with_microbatches_matches_fit_without(key):
    params = mlp.init(key, [F, 8, C])
    x = jax.random.normal(jax.random.fold_in(key, 1), (48, F))
    y = jax.random.randint(jax.random.fold_in(key, 2), (48,), 0, C)
    kwargs = dict(epochs=2, batch_size=16, key=jax.random.key(3), progress=False)
    p1, h1 = jxent.train.fit(mlp.apply, params, optax.sgd(0.5), (x, y), **kwargs)
    p4, h4 = jxent.train.fit(mlp.apply, params, optax.sgd(0.5), (x, y), microbatches=4, **kwargs)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32, summed in another order
    np.testing.assert_allclose(h4[-1]["train_loss"], h1[-1]["train_loss"], rtol=1e-5)


def test_microbatch_errors_name_both_sizes(key):
    params = mlp.init(key, [F, 8, C])
    opt = optax.sgd(0.1)
    step = jxent.train.make_step(mlp.apply, opt, microbatches=5)
    with pytest.raises(ValueError, match=r"batch of 24 examples .* microbatches=5"):
        step(jxent.train.init_state(params, opt), jnp.ones((24, F)), jnp.zeros((24,), int))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="microbatches must be a positive int"):
            jxent.train.make_step(mlp.apply, opt, microbatches=bad)
    with pytest.raises(ValueError, match=r"batch of 10 examples .* microbatches=4"):
        jxent.train.fit(
            mlp.apply,
            params,
            opt,
            (jnp.ones((40, F)), jnp.zeros((40,), int)),
            epochs=1,
            batch_size=10,
            key=key,
            microbatches=4,
            progress=False,
        )


def test_stateful_predictor_threads_its_state_through_the_micro_batches(key):
    """has_aux with microbatches: the state passes through the k micro-batches in order."""
    params = mlp.init(key, [F, 8, C])
    x = jax.random.normal(jax.random.fold_in(key, 1), (B, F))
    y = jax.random.randint(jax.random.fold_in(key, 2), (B,), 0, C)

    def predictor(p, x, count, step_key):
        return mlp.apply(p, x), count + 1

    opt = optax.sgd(0.5)
    states = []
    for k in (1, 4):
        step = jxent.train.make_step(predictor, opt, has_aux=True, microbatches=k)
        init = jxent.train.init_state(params, opt, model_state=jnp.zeros(()), key=key)
        states.append(step(init, x, y)[0])
    assert float(states[0].model_state) == 1.0
    assert float(states[1].model_state) == 4.0
    for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(states[0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_per_logit_mask_that_broadcasts_stays_whole(x64, key):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp.init(key, [F, 8, C]))
    x, y = _batch(jax.random.fold_in(key, 1))
    y = jnp.abs(y) % (C - 1)  # no label on the masked class
    mask = jnp.ones((1, C), bool).at[0, C - 1].set(False)  # [1, C]: every example alike
    opt = optax.sgd(1.0)
    whole, _ = jxent.train.make_step(mlp.apply, opt)(
        jxent.train.init_state(params, opt), x, y, where=mask
    )
    micro, _ = jxent.train.make_step(mlp.apply, opt, microbatches=3)(
        jxent.train.init_state(params, opt), x, y, where=mask
    )
    for a, b in zip(jax.tree.leaves(micro.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_mean_denominators_for_probability_labels_on_any_axis_and_bad_masks(x64):
    q = jnp.full((2, 3, 5), 1 / 3)  # [B, C, H] probabilities, classes on axis 1
    where = jnp.arange(10).reshape(2, 5) % 3 != 0
    ce, count = jxent.train.mean_denominators(q, axis=1, where=where)
    assert float(ce) == float(count) == float(jnp.sum(where))
    assert float(jxent.train.mean_denominators(q, axis=1)[1]) == 10.0
    with pytest.raises(ValueError, match=r"where must be shaped like the examples, \(2, 5\)"):
        jxent.train.mean_denominators(q, axis=1, where=jnp.ones((2, 3), bool))
    step = jxent.train.make_step(mlp.apply, optax.sgd(0.1), microbatches=np.int64(2))
    assert callable(step)  # a NumPy integer is an integer
