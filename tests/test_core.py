"""Core: the hand-derived gradient equals jax.grad and float64 finite differences."""

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from _reference import (
    FD_RTOL,
    FLOAT32_RTOL,
    FLOAT64_RTOL,
    assert_tree_close,
    max_rel_error,
    reference_loss,
    scalar,
)
from jxent.predictors import embedding, linear, mlp

B, D, L = 6, 5, 4


def make_instance(name, key, dtype):
    k_p, k_x, _k_y, k_q = jax.random.split(key, 4)
    x = jax.random.normal(k_x, (B, D), dtype)
    if name == "linear":
        params = linear.init(k_p, D, L, dtype)
        # Non-zero biases so their gradient is not trivially tied to the weights'.
        params["b"] = jax.random.normal(k_q, (L,), dtype)
        return linear.apply, params, x
    if name == "mlp":
        return (
            functools.partial(mlp.apply, activation=jnp.tanh),
            mlp.init(k_p, [D, 7, 6, L], dtype),
            x,
        )
    return embedding.apply, embedding.init(k_p, D, L, 3, dtype), x


def make_labels(kind, key, dtype):
    if kind == "int":
        return jax.random.randint(key, (B,), 0, L)
    # Soft labels that do not sum to one exercise the p * sum(q) - q form.
    return jax.random.uniform(key, (B, L), dtype, 0.0, 1.0)


PREDICTORS = ["linear", "mlp", "embedding"]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("name", PREDICTORS)
@pytest.mark.parametrize("label_kind", ["int", "soft"])
@pytest.mark.parametrize(
    # "sum" is "none" summed: the slow tier (the README command's time budget)
    "reduction",
    [pytest.param(r, marks=pytest.mark.slow) if r == "sum" else r for r in REDUCTIONS],
)
def test_hand_gradient_equals_autodiff_and_finite_differences_f64(
    x64, key, name, label_kind, reduction
):
    apply, params, x = make_instance(name, key, jnp.float64)
    labels = make_labels(label_kind, jax.random.fold_in(key, 1), jnp.float64)

    loss, hand = jax.jit(jxent.value_and_grad(apply, reduction=reduction))(params, x, labels)

    def ref(p):
        return scalar(reference_loss, reduction)(apply(p, x), labels)

    expected_loss = jax.jit(lambda p: reference_loss(apply(p, x), labels, reduction=reduction))
    np.testing.assert_allclose(loss, expected_loss(params), rtol=1e-12)
    assert_tree_close(hand, jax.jit(jax.grad(ref))(params), FLOAT64_RTOL)
    assert_tree_close(hand, jxent.finite_difference_grad(ref, params), FD_RTOL)


@pytest.mark.parametrize("name", PREDICTORS)
@pytest.mark.parametrize("label_kind", ["int", "soft"])
def test_hand_gradient_equals_autodiff_f32(key, name, label_kind):
    apply, params, x = make_instance(name, key, jnp.float32)
    labels = make_labels(label_kind, jax.random.fold_in(key, 1), jnp.float32)
    hand = jax.jit(jxent.grad(apply))(params, x, labels)
    auto = jax.jit(jax.grad(lambda p: reference_loss(apply(p, x), labels)))(params)
    assert_tree_close(hand, auto, FLOAT32_RTOL)


def test_linear_closed_form_per_example(x64, key):
    """dJ/dtheta_k = mean_i (p_ik - 1{y_i = k}) x_i, written out with explicit loops."""
    apply, params, x = make_instance("linear", key, jnp.float64)
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float64)
    grads = jxent.grad(apply)(params, x, y)
    logits = np.asarray(x) @ np.asarray(params["w"]) + np.asarray(params["b"])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected_w = np.zeros((D, L))
    expected_b = np.zeros(L)
    for i in range(B):
        for k in range(L):
            coef = p[i, k] - (1.0 if int(y[i]) == k else 0.0)
            expected_w[:, k] += coef * np.asarray(x[i]) / B
            expected_b[k] += coef / B
    np.testing.assert_allclose(grads["w"], expected_w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grads["b"], expected_b, rtol=1e-12, atol=1e-15)


def _linear_instance(key):
    apply, params, x = make_instance("linear", key, jnp.float64)
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float64)
    p = jax.nn.softmax(apply(params, x))
    onehot = jax.nn.one_hot(y, L, dtype=jnp.float64)
    true = jax.grad(lambda q: reference_loss(apply(q, x), y))(params)
    return params, x, y, p, onehot, true


def test_sign_flip_mistake_is_detected(x64, key):
    """(1{y=l} - p) instead of (p - 1{y=l}): exactly -1 times jxent's (proven) gradient."""
    params, x, y, p, onehot, true = _linear_instance(key)
    hand = jxent.grad(linear.apply)(params, x, y)["w"]
    assert max_rel_error({"w": hand}, {"w": true["w"]}) < FLOAT64_RTOL
    wrong_w = x.T @ (onehot - p) / B
    assert max_rel_error({"w": wrong_w}, {"w": hand}) == pytest.approx(2.0, rel=1e-12)
    assert max_rel_error({"w": -wrong_w}, {"w": hand}) < FLOAT64_RTOL


def test_sum_over_classes_mistake_is_identically_zero(x64, key):
    """sum_l x (1{y=l} - p_l) = x (1 - sum_l p_l) = 0 for every example: no gradient at all."""
    params, x, y, p, onehot, true = _linear_instance(key)
    hand = jxent.grad(linear.apply)(params, x, y)["w"]
    assert max_rel_error({"w": hand}, {"w": true["w"]}) < FLOAT64_RTOL
    summed = jnp.einsum("bd,bl->d", x, onehot - p) / B  # one vector for all classes
    np.testing.assert_allclose(summed, 0.0, atol=1e-15)
    wrong_w = jnp.broadcast_to(summed[:, None], hand.shape)
    assert max_rel_error({"w": wrong_w}, {"w": hand}) == pytest.approx(1.0, abs=1e-12)


def test_float32_finite_differences_cannot_decide():
    """A float32 central difference with a naive step is as wrong as the bugs it should catch.

    Measured at the default key (see docs/derivation.md): with h = 1e-6 the float32 estimate is
    off by about as much as the gradient itself, so it cannot separate the correct gradient
    from a wrong one; float64 with h = 1e-5 is accurate to ~1e-10.
    """
    key = jax.random.key(0)
    with jax.enable_x64(True):
        params64, x64_, y, _, _, true = _linear_instance(key)
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params64)
    x32 = np.asarray(x64_, np.float32)
    y = np.asarray(y, np.int32)

    def loss32(p):
        return reference_loss(linear.apply(p, x32), y)

    fd32 = jxent.finite_difference_grad(loss32, params32, step=1e-6)
    true32 = jax.tree.map(lambda a: np.asarray(a, np.float32), true)
    err_fd32 = max_rel_error(fd32, true32)
    # The float32 check's own error is tens of percent of the gradient ...
    assert err_fd32 > 0.05, err_fd32
    # ... so it cannot tell the truth from a 10% scaling bug (error 0.1) at any tolerance
    # that would also pass the true gradient against it.
    scaled = jax.tree.map(lambda a: 1.1 * a, true32)
    assert max_rel_error(fd32, scaled) < 2 * err_fd32


def test_value_and_grad_uses_only_the_predictors_vjp(monkeypatch, key):
    apply, params, x = make_instance("mlp", key, jnp.float32)
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float32)
    expected = jax.grad(lambda p: reference_loss(apply(p, x), y))(params)

    calls = []
    real_vjp = jax.vjp

    def spy_vjp(fun, *primals):
        out, pullback = real_vjp(fun, *primals)
        calls.append(out.shape)
        return out, pullback

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff of the loss must not be used")

    monkeypatch.setattr(jax, "vjp", spy_vjp)
    for name in ("grad", "value_and_grad", "jvp", "linearize"):
        monkeypatch.setattr(jax, name, forbidden)
    _, grads = jxent.value_and_grad(apply)(params, x, y)
    # One VJP, and of the predictor (whose output is the [B, L] logits), not of a scalar loss.
    assert calls == [(B, L)]
    assert_tree_close(grads, expected, FLOAT32_RTOL)


def test_pullback_receives_the_hand_cotangent(key):
    """A predictor with its own custom_vjp sees exactly p - onehot(y), scaled by 1/B."""
    seen = []

    @jax.custom_vjp
    def identity_logits(z):
        return z

    def fwd(z):
        return z, None

    def bwd(_, g):
        seen.append(g)
        return (g,)

    identity_logits.defvjp(fwd, bwd)
    z = jax.random.normal(key, (B, L))
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float32)
    jxent.grad(lambda p, _: identity_logits(p))(z, None, y)
    expected = (jax.nn.softmax(z) - jax.nn.one_hot(y, L)) / B
    np.testing.assert_allclose(seen[0], expected, rtol=1e-6, atol=1e-7)


class Params(NamedTuple):
    layer: dict
    scale: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
    w: jax.Array
    b: jax.Array


def test_any_pytree_of_params(x64, key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = (
        Params({"w": jax.random.normal(k1, (D, L), jnp.float64)}, jnp.array(1.5)),
        [Box(jax.random.normal(k2, (L, L), jnp.float64), jnp.zeros(L, jnp.float64))],
    )

    def apply(p, x):
        first, (box,) = p
        return jnp.tanh(x @ first.layer["w"]) * first.scale @ box.w + box.b[None, :]

    x = jax.random.normal(k3, (B, D), jnp.float64)
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float64)
    hand = jxent.grad(apply)(params, x, y)
    assert_tree_close(hand, jax.grad(lambda p: reference_loss(apply(p, x), y))(params), 1e-10)


def test_batched_per_example_predictor(x64, key):
    _, params, x = make_instance("linear", key, jnp.float64)
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float64)
    per_example = jxent.batched(lambda p, xi: xi @ p["w"] + p["b"])  # 1-D: no promotion
    assert per_example(params, x).shape == (B, L)
    assert_tree_close(
        jxent.grad(per_example)(params, x, y), jxent.grad(linear.apply)(params, x, y), 1e-14
    )


def test_reduction_none_rows_are_per_example_gradients(x64, key):
    logits = jax.random.normal(key, (B, L), jnp.float64)
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float64)
    rows = jxent.logits_grad(logits, y, reduction="none")
    per_example = jax.vmap(
        jax.grad(lambda z, yi: reference_loss(z[None], yi[None], reduction="sum"))
    )(logits, y)
    np.testing.assert_allclose(rows, per_example, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(jxent.logits_grad(logits, y), per_example / B, rtol=1e-12)


def test_loss_and_grad_match_the_separate_functions(key):
    logits = jax.random.normal(key, (B, L))
    y = make_labels("int", jax.random.fold_in(key, 1), jnp.float32)
    loss, g = jxent.loss_and_logits_grad(logits, y)
    np.testing.assert_allclose(loss, reference_loss(logits, y), rtol=1e-6)
    np.testing.assert_allclose(g, jax.grad(reference_loss)(logits, y), rtol=1e-5, atol=1e-7)
    # The separately compiled entry points (the custom_jvp loss, the gradient alone) agree.
    np.testing.assert_allclose(jxent.softmax_cross_entropy(logits, y), loss, rtol=1e-6)
    np.testing.assert_allclose(jxent.logits_grad(logits, y), g, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("label_kind", ["int", "soft"])
def test_class_axis_can_be_anywhere(x64, key, label_kind):
    logits = jax.random.normal(key, (3, L, 2), jnp.float64)  # classes on axis 1
    last = jnp.moveaxis(logits, 1, -1)
    if label_kind == "int":
        y = jax.random.randint(jax.random.fold_in(key, 1), (3, 2), 0, L)
        y_last = y
    else:
        y_last = jax.random.uniform(jax.random.fold_in(key, 1), (3, 2, L), jnp.float64)
        y = jnp.moveaxis(y_last, -1, 1)
    loss, g = jxent.loss_and_logits_grad(logits, y, axis=1)
    loss_last, g_last = jxent.loss_and_logits_grad(last, y_last)
    np.testing.assert_allclose(loss, loss_last, rtol=1e-14)
    np.testing.assert_allclose(g, jnp.moveaxis(g_last, -1, 1), rtol=1e-14)
    np.testing.assert_allclose(
        g, jax.grad(lambda z: reference_loss(jnp.moveaxis(z, 1, -1), y_last))(logits), rtol=1e-12
    )


def test_cli_help_and_module_entry_point():
    script = str(Path(sys.executable).parent / "jxent")  # the venv's console script
    for cmd in ([script, "--help"], [sys.executable, "-m", "jxent", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "demo" in out.stdout
        assert "check" in out.stdout
