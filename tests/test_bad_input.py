"""Bad input: a clear error eagerly, NaN (or a checkify error) under jit -- never a wrong number."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from jxent.predictors import linear

L = 4
LOGITS = jnp.arange(12.0).reshape(3, L) / 10.0


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (jnp.array([0, 4, 1]), {}, "labels[1] = 4, expected 0..3"),
        (jnp.array([0, 1, -1]), {}, "labels[2] = -1, expected 0..3"),
        (jnp.array([-100, 7, 1]), {"ignore_index": -100}, "labels[1] = 7, expected 0..3 or "),
    ],
)
def test_out_of_range_label_raises_eagerly_naming_position(labels, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        jxent.loss_and_logits_grad(LOGITS, labels, **kwargs)


def test_out_of_range_label_in_2d_batch_names_the_index_tuple():
    with pytest.raises(ValueError, match=re.escape(r"labels[(1, 0)] = 9")):
        jxent.softmax_cross_entropy(jnp.zeros((2, 2, L)), jnp.array([[0, 1], [9, 2]]))


def test_masked_out_of_range_label_is_allowed():
    """Padding with garbage labels under where=False is common; it must not raise or NaN."""
    y = jnp.array([0, 99, 1])
    loss, g = jxent.loss_and_logits_grad(LOGITS, y, where=jnp.array([True, False, True]))
    assert np.isfinite(loss)
    np.testing.assert_array_equal(g[1], 0.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_out_of_range_label_under_jit_is_nan_for_that_example_only(reduction):
    y_bad = jnp.array([0, 4, 1])
    y_good = jnp.array([0, 2, 1])
    f = jax.jit(lambda z, y: jxent.loss_and_logits_grad(z, y, reduction=reduction))
    loss, g = f(LOGITS, y_bad)
    _, g_good = f(LOGITS, y_good)
    assert np.all(np.isnan(g[1]))
    np.testing.assert_array_equal(g[np.array([0, 2])], g_good[np.array([0, 2])])
    if reduction == "none":
        assert np.isnan(loss[1])
        assert np.all(np.isfinite(loss[np.array([0, 2])]))
    else:
        assert np.isnan(loss)


def test_checked_raises_under_jit():
    params = linear.init(jax.random.key(0), 3, L)
    f = jxent.checked(jxent.value_and_grad(linear.apply))
    x = jnp.ones((3, 3))
    loss, _ = f(params, x, jnp.array([0, 1, 2]))
    assert np.isfinite(loss)
    # checkify.JaxRuntimeError subclasses ValueError, like the eager error.
    with pytest.raises(ValueError, match="flat position 2 has label 5"):
        f(params, x, jnp.array([0, 1, 5]))


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "error", "message"),
    [
        (LOGITS, jnp.array([0, 1]), {}, ValueError, "integer labels must have shape (3,)"),
        (LOGITS, jnp.ones((3, 3)), {}, ValueError, "must have the logits' shape (3, 4)"),
        (LOGITS, jnp.array([True, False, True]), {}, TypeError, "found dtype bool"),
        (LOGITS.astype(jnp.int32), jnp.array([0, 1, 2]), {}, TypeError, "floating dtype"),
        (LOGITS, jnp.array([0, 1, 2]), {"weights": jnp.ones(3)}, ValueError, "shape (4,)"),
        (LOGITS, jnp.array([0, 1, 2]), {"label_smoothing": 1.5}, ValueError, "[0.0, 1.0]"),
        (LOGITS, jnp.array([0, 1, 2]), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        (LOGITS, jnp.array([0, 1, 2]), {"z_loss": -1.0}, ValueError, "z_loss must lie"),
        (LOGITS, jnp.array([0, 1, 2]), {"logit_softcap": 0.0}, ValueError, "must be positive"),
        (LOGITS, jnp.array([0, 1, 2]), {"reduction": "avg"}, ValueError, "reduction must be"),
        (LOGITS, jnp.array([0, 1, 2]), {"where": jnp.ones(3)}, TypeError, "boolean mask"),
        (LOGITS, jnp.array([0, 1, 2]), {"where": jnp.ones(2, bool)}, ValueError, "shape (3,)"),
        (LOGITS, jnp.ones((3, L)), {"ignore_index": -100}, ValueError, "integer labels only"),
        (LOGITS, jnp.array([0, 1, 2]), {"axis": 2}, ValueError, "axis=2 is out of range"),
    ],
)
def test_bad_arguments_raise_with_what_was_expected(logits, labels, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        jxent.loss_and_logits_grad(logits, labels, **kwargs)


def test_shape_errors_also_raise_under_jit():
    """Shapes and dtypes are static, so these checks run at trace time inside jit too."""
    with pytest.raises(ValueError, match="integer labels must have shape"):
        jax.jit(jxent.softmax_cross_entropy)(LOGITS, jnp.array([0, 1]))


def test_unknown_option_is_rejected():
    with pytest.raises(
        TypeError,
        match=r"value_and_grad\(\) got an unknown loss option 'smoothing'; did you mean "
        r"'label_smoothing'",
    ):
        jxent.value_and_grad(linear.apply, smoothing=0.1)
    params = linear.init(jax.random.key(0), 3, L)
    with pytest.raises(TypeError, match="unknown loss option"):
        jxent.grad(linear.apply)(params, jnp.ones((3, 3)), jnp.array([0, 1, 2]), mask=None)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
@pytest.mark.parametrize("name", ["chunk_size", "vocab_block_size"])
def test_every_chunked_function_refuses_a_schedule_that_is_not_a_positive_int(name, bad):
    """0 once meant "the default" (``chunk_size or default``): now None does, 0 is an error."""
    x, w, y = jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.array([0, 1, 2, 3])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("vocab",))
    calls = [
        lambda **k: jxent.linear_cross_entropy(x, w, y, **k),
        lambda **k: jxent.vocab_parallel_linear_cross_entropy(x, w, y, mesh=mesh, **k),
        lambda **k: jxent.linear_cross_entropy_ggn_vector_product(x, w, y, (x, None, None), **k),
        lambda **k: jxent.linear_sample_labels(jax.random.key(0), x, w, **k),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"{name} must be a positive int or None, found"):
            call(**{name: bad})


def test_an_empty_batch_gives_empty_results_on_every_path():
    """No examples: a 0 mean, empty per-example results and zero parameter gradients."""
    x, y, w = jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32), jnp.ones((3, 5))
    h = jnp.zeros((0, 3))
    assert float(jxent.softmax_cross_entropy(x, y)) == 0.0
    assert jxent.softmax_cross_entropy(x, y, reduction="none").shape == (0,)
    assert jxent.logits_grad(x, y).shape == (0, 5)
    assert jxent.logits_hvp(x, y, x).shape == (0, 5)
    assert jxent.sample_labels(jax.random.key(0), x).shape == (0,)
    assert float(jxent.linear_cross_entropy(h, w, y)) == 0.0
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("vocab",))
    assert float(jxent.vocab_parallel_linear_cross_entropy(h, w, y, mesh=mesh)) == 0.0
    dh, dw = jax.grad(jxent.linear_cross_entropy, argnums=(0, 1))(h, w, y)
    assert dh.shape == (0, 3)
    assert not np.any(dw)
    gx, gw, _ = jxent.linear_cross_entropy_ggn_vector_product(h, w, y, (None, w, None))
    assert gx.shape == (0, 3)
    assert not np.any(gw)
    assert jxent.linear_sample_labels(jax.random.key(0), h, w).shape == (0,)
    loss, grads = jxent.value_and_grad(lambda p, x: x @ p)(w, h, y)
    assert float(loss) == 0.0
    assert not np.any(grads)


def test_counted_examples_whose_class_weights_sum_to_zero_give_nan_like_torch():
    """The weighted mean over a zero total weight is undefined: NaN (PyTorch), not the sum."""
    import torch
    import torch.nn.functional as F  # noqa: N812 (PyTorch's own name)

    logits, y = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]), jnp.array([0, 0])
    weights = jnp.array([0.0, 1.0, 1.0])
    for eps in (0.0, 0.3):
        want = F.cross_entropy(
            torch.tensor(np.asarray(logits)),
            torch.tensor([0, 0]),
            weight=torch.tensor(np.asarray(weights)),
            label_smoothing=eps,
        )
        assert np.isnan(want.item())
        opts = {"weights": weights, "label_smoothing": eps}
        assert np.isnan(float(jxent.softmax_cross_entropy(logits, y, **opts)))
        assert np.isnan(float(jxent.linear_cross_entropy(jnp.eye(2), logits, y, **opts)))
        assert np.all(np.isnan(jxent.logits_grad(logits, y, **opts)))
    # the sum is defined, and every example masked is still a mean of 0
    assert np.isfinite(
        float(jxent.softmax_cross_entropy(logits, y, weights=weights, reduction="sum"))
    )
    none = jnp.array([False, False])
    assert float(jxent.softmax_cross_entropy(logits, y, weights=weights, where=none)) == 0.0


def test_a_nan_logit_masked_out_per_logit_stays_out_also_with_a_soft_cap():
    x, mask, y = jnp.array([[1.0, 2.0, jnp.nan]]), jnp.array([[True, True, False]]), jnp.array([0])
    nan_tangent = jnp.array([[1.0, -1.0, jnp.nan]])
    for opts in ({}, {"logit_softcap": 5.0}):
        g = jxent.logits_grad(x, y, where=mask, **opts)
        assert np.all(np.isfinite(g))
        assert g[0, 2] == 0.0
        for curvature in ("hessian", "ggn"):
            hv = jxent.logits_hvp(x, y, nan_tangent, where=mask, curvature=curvature, **opts)
            assert np.all(np.isfinite(hv))
            assert hv[0, 2] == 0.0


def test_a_misspelled_factory_parameter_is_suggested_and_a_non_function_predictor_named():
    opt = optax.sgd(0.1)
    with pytest.raises(TypeError, match="did you mean 'microbatches'"):
        jxent.train.make_step(linear.apply, opt, microbatch=4)
    with pytest.raises(TypeError, match="did you mean 'has_aux'"):
        jxent.value_and_grad(linear.apply, has_au=True)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    for factory in (jxent.value_and_grad, jxent.grad, jxent.ggn_vector_product):
        with pytest.raises(TypeError, match=r"takes the predictor first.*found a dict"):
            factory(params)
    with pytest.raises(TypeError, match="takes the predictor first"):
        jxent.train.make_step(params, opt)
