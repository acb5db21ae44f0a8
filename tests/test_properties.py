"""Property-based tests: random shapes, label kinds, option values and extreme logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent
from _reference import reference_loss


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 5))
    classes = draw(st.integers(2, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    soft = draw(st.booleans())
    with jax.enable_x64(True):
        return _build(draw, batch, classes, seed, magnitude, soft)


def _build(draw, batch, classes, seed, magnitude, soft):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    logits = magnitude * jax.random.normal(k1, (batch, classes), jnp.float64)
    if soft:
        labels = jax.random.dirichlet(k2, jnp.ones(classes, jnp.float64), (batch,))
    else:
        labels = jax.random.randint(k2, (batch,), 0, classes)
    opts = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    if draw(st.booleans()):
        opts["weights"] = jax.random.uniform(k3, (classes,), jnp.float64, 0.1, 3.0)
    if draw(st.booleans()):
        opts["where"] = jax.random.bernoulli(k4, 0.7, (batch,))
    opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    opts["z_loss"] = draw(st.sampled_from([0.0, 1e-4, 0.5]))
    opts["logit_softcap"] = draw(st.sampled_from([None, 0.5, 30.0]))
    return logits, labels, opts


@settings(max_examples=20, deadline=None)
@given(problems())
def test_hand_gradient_matches_autodiff_everywhere(problem):
    logits, labels, opts = problem
    with jax.enable_x64(True):
        # Jitted as a whole: eager op-by-op dispatch compiles every op for every new shape.
        loss, g = jax.jit(functools.partial(jxent.loss_and_logits_grad, **opts))(logits, labels)
        ref_loss = functools.partial(reference_loss, labels=labels, **opts)
        expected = jax.jit(jax.grad(lambda z: jnp.sum(ref_loss(z))))(logits)
        ref = jax.jit(ref_loss)(logits)
    assert np.all(np.isfinite(loss))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(loss, ref, rtol=1e-9, atol=1e-9)
    # Relative to the largest entry, with a floor at the O(1) scale of a softmax gradient:
    # entries like 1e-40 (deep in a soft cap's flat tail) are zero for every practical purpose.
    scale = max(float(np.max(np.abs(expected))), 1.0)
    assert float(np.max(np.abs(g - expected))) <= 1e-9 * scale


@settings(max_examples=15, deadline=None)
@given(problems())
def test_rows_sum_to_zero_and_loss_is_nonnegative(problem):
    """For normalised targets without z-loss: sum_l (p_l - t_l) = 0 and -sum t log p >= 0."""
    logits, labels, opts = problem
    opts = {**opts, "z_loss": 0.0, "reduction": "none"}
    opts.pop("weights", None)
    with jax.enable_x64(True):
        run = jax.jit(functools.partial(jxent.loss_and_logits_grad, **opts))
        loss, g = (np.asarray(a) for a in run(logits, labels))
    assert np.all(loss >= -1e-12)
    if opts["logit_softcap"] is None:  # the cap's chain factor reweights the entries
        np.testing.assert_allclose(np.sum(g, axis=-1), 0.0, atol=1e-12)
