"""Fused distillation between two linear heads against the divergences written plainly.

The reference forms both heads' logits, takes ``log_softmax`` of each at the temperature and
writes each divergence from its definition (Liger Kernel's generalised JSD, its beta 0 and 1 the
forward and reverse KL); it is differentiated by ``jax.grad``/``jax.jvp`` in float64 and by
central finite differences.
"""

import jax
import jax.numpy as jnp
import pytest

import jxent
from _reference import FD_RTOL, FLOAT64_RTOL, assert_tree_close
from _scripts import run_script


def plain_distillation(
    x, w, b, tx, tw, tb, y, where, *, divergence, beta, temperature, hard_weight, scaling,
    reduction,
):  # fmt: skip
    """The loss from its definition on materialised logits."""
    log_q = jax.nn.log_softmax((x @ w + b[None]) / temperature)
    log_p = jax.nn.log_softmax((tx @ tw + tb[None]) / temperature)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        d = jnp.sum(p * (log_p - log_q), axis=-1)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        d = jnp.sum(q * (log_q - log_p), axis=-1)
    else:
        log_m = jnp.log(beta * p + (1 - beta) * q)
        d = beta * jnp.sum(p * (log_p - log_m), -1) + (1 - beta) * jnp.sum(q * (log_q - log_m), -1)
    loss = (1 - hard_weight) * (temperature**2 if scaling else 1.0) * d
    if hard_weight:
        log_s = jax.nn.log_softmax(x @ w + b[None])
        safe = jnp.where(where, y, 0)
        loss = loss - hard_weight * jnp.take_along_axis(log_s, safe[:, None], axis=1)[:, 0]
    loss = jnp.where(where, loss, 0.0)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    return total if reduction == "sum" else total / jnp.maximum(jnp.sum(where), 1)


def heads(key, n=37, d=6, dt=5, num_classes=23):
    k = jax.random.split(key, 8)
    f = jnp.float64
    x, w = jax.random.normal(k[0], (n, d), f), jax.random.normal(k[1], (d, num_classes), f)
    b = jax.random.normal(k[2], (num_classes,), f)
    tx, tw = jax.random.normal(k[3], (n, dt), f), jax.random.normal(k[4], (dt, num_classes), f)
    tb = jax.random.normal(k[5], (num_classes,), f)
    y = jax.random.randint(k[6], (n,), 0, num_classes)
    where = jax.random.bernoulli(k[7], 0.8, (n,))
    return (x, w, b, tx, tw, tb), y, where


CASES = [  # divergence, beta
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


@pytest.mark.parametrize(("divergence", "beta"), CASES)
@pytest.mark.parametrize(
    ("temperature", "hard_weight", "scaling"), [(1.0, 0.0, False), (2.0, 0.3, True)]
)
@pytest.mark.parametrize(
    ("chunk_size", "vocab_block_size"),
    [pytest.param(None, None, marks=pytest.mark.slow), (8, 5)],  # ragged chunks and blocks
)
@pytest.mark.parametrize("reduction", ["mean", pytest.param("none", marks=pytest.mark.slow)])
def test_value_and_gradients_match_the_plain_divergence(
    x64, key, divergence, beta, temperature, hard_weight, scaling, chunk_size, vocab_block_size,
    reduction,
):  # fmt: skip
    args, y, where = heads(key)
    y = jnp.where(jnp.arange(y.shape[0]) == 2, -1, y)  # an ignored token
    counted = where & (y != -1)
    opts = {"divergence": divergence, "beta": beta, "temperature": temperature}
    ref_opts = opts | {"hard_weight": hard_weight, "scaling": scaling, "reduction": reduction}
    opts |= {"hard_weight": hard_weight, "temperature_scaling": scaling, "reduction": reduction}
    opts |= {"chunk_size": chunk_size, "vocab_block_size": vocab_block_size}

    def fused(x, w, b, tx, tw, tb):
        return jxent.linear_distillation_loss(
            x, w, tx, tw, bias=b, teacher_bias=tb, labels=y, where=where, ignore_index=-1,
            teacher_gradient=True, **opts,
        )  # fmt: skip

    def plain(*a):
        return plain_distillation(*a, y, counted, **ref_opts)

    assert_tree_close(fused(*args), plain(*args), 1e-12)
    cot = jnp.linspace(0.5, 1.5, y.shape[0]) if reduction == "none" else 1.0
    argnums = tuple(range(6))
    grads = jax.grad(lambda *a: jnp.sum(cot * fused(*a)), argnums)(*args)
    expected = jax.grad(lambda *a: jnp.sum(cot * plain(*a)), argnums)(*args)
    assert_tree_close(grads, expected, FLOAT64_RTOL)


def test_the_teacher_gets_no_gradient_by_default(x64, key):
    (x, w, b, tx, tw, tb), _, _ = heads(key)

    def loss(x, tx, tw):
        return jxent.linear_distillation_loss(x, w, tx, tw, divergence="jsd")

    dx, dtx, dtw = jax.grad(loss, (0, 1, 2))(x, tx, tw)
    assert float(jnp.max(jnp.abs(dx))) > 0
    assert float(jnp.max(jnp.abs(dtx))) == 0.0
    assert float(jnp.max(jnp.abs(dtw))) == 0.0


def test_forward_mode_and_finite_differences(x64, key):
    (x, w, b, tx, tw, tb), y, where = heads(key, n=9, d=3, dt=4, num_classes=11)
    opts = {"divergence": "jsd", "beta": 0.3, "temperature": 1.5, "vocab_block_size": 4}

    def fused(x, tw):
        return jxent.linear_distillation_loss(x, w, tx, tw, teacher_gradient=True, **opts)

    def plain(x, tw):
        return plain_distillation(
            x, w, jnp.zeros(11), tx, tw, jnp.zeros(11), y, jnp.ones(9, bool), divergence="jsd",
            beta=0.3, temperature=1.5, hard_weight=0.0, scaling=False, reduction="mean",
        )  # fmt: skip

    tangents = (jnp.ones_like(x), 0.5 * tw)
    _, jvp = jax.jvp(fused, (x, tw), tangents)
    _, expected = jax.jvp(plain, (x, tw), tangents)
    assert_tree_close(jvp, expected, FLOAT64_RTOL)
    dx = jax.grad(fused)(x, tw)
    h = 1e-6
    for i, j in [(0, 0), (5, 2), (8, 1)]:
        e = jnp.zeros_like(x).at[i, j].set(h)
        fd = (fused(x + e, tw) - fused(x - e, tw)) / (2 * h)
        assert abs(float(dx[i, j] - fd)) <= FD_RTOL * max(1.0, abs(float(fd)))


def test_micro_batches_with_sum_equal_the_whole_batch_mean(x64, key):
    (x, w, b, tx, tw, tb), y, where = heads(key, n=40)
    opts = {"divergence": "reverse_kl", "labels": y, "hard_weight": 0.2, "where": where}

    def loss(x, reduction):
        return jxent.linear_distillation_loss(x, w, tx, tw, reduction=reduction, **opts)

    whole, whole_grad = jax.value_and_grad(lambda x: loss(x, "mean"))(x)
    count = jnp.sum(where)
    total, grad = 0.0, jnp.zeros_like(x)
    for part in jnp.split(jnp.arange(40), 4):  # four micro-batches, summed, whole count

        def micro(xp, part=part):
            o = opts | {"labels": y[part], "where": where[part]}
            return jxent.linear_distillation_loss(
                xp, w, tx[part], tw, reduction="sum", **o
            ) / count  # fmt: skip

        value, g = jax.value_and_grad(micro)(x[part])
        total, grad = total + value, grad.at[part].add(g)
    assert_tree_close(total, whole, 1e-12)
    assert_tree_close(grad, whole_grad, 1e-12)


def test_classes_outside_both_softmaxes_and_empty_batches(x64, key):
    (x, w, b, tx, tw, tb), _, _ = heads(key, n=8)
    masked = b.at[3].set(-jnp.inf)  # a class neither head can produce
    for divergence in ("forward_kl", "reverse_kl", "jsd"):

        def fused(x, divergence=divergence):
            return jxent.linear_distillation_loss(
                x, w, tx, tw, bias=masked, teacher_bias=masked, divergence=divergence
            )

        def plain(x, divergence=divergence):
            keep = jnp.arange(23) != 3
            return plain_distillation(
                x, w[:, keep], b[keep], tx, tw[:, keep], tb[keep] * 0 + masked[keep],
                jnp.zeros(8, jnp.int32), jnp.ones(8, bool), divergence=divergence, beta=0.5,
                temperature=1.0, hard_weight=0.0, scaling=False, reduction="mean",
            )  # fmt: skip

        assert bool(jnp.isfinite(fused(x)))
        assert_tree_close(jax.grad(fused)(x), jax.grad(plain)(x), FLOAT64_RTOL)
    nothing = jnp.zeros(8, bool)
    loss, dx = jax.value_and_grad(
        lambda x: jxent.linear_distillation_loss(x, w, tx, tw, where=nothing)
    )(x)
    assert float(loss) == 0.0
    assert float(jnp.max(jnp.abs(dx))) == 0.0


def test_bad_arguments_raise_naming_them():
    x, w, tx, tw = jnp.ones((4, 3)), jnp.zeros((3, 5)), jnp.ones((4, 2)), jnp.zeros((2, 5))
    f = jxent.linear_distillation_loss
    with pytest.raises(ValueError, match="must share the vocabulary"):
        f(x, w, tx, jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match="teacher_x has 3 tokens but x has 4"):
        f(x, w, jnp.ones((3, 2)), tw)
    with pytest.raises(ValueError, match="divergence must be one of"):
        f(x, w, tx, tw, divergence="kl")
    with pytest.raises(ValueError, match=r"beta must be a number in \[0.0, 1.0\]"):
        f(x, w, tx, tw, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        f(x, w, tx, tw, temperature=0.0)
    with pytest.raises(ValueError, match="needs labels"):
        f(x, w, tx, tw, hard_weight=0.5)
    with pytest.raises(TypeError, match="labels must be integer"):
        f(x, w, tx, tw, labels=jnp.full((4, 5), 0.2), hard_weight=0.5)
    with pytest.raises(ValueError, match=r"teacher_x is \[N, D\] = \(4, 2\) but teacher_w"):
        f(x, w, tx, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(5,\)"):
        f(x, w, tx, tw, teacher_bias=jnp.zeros(4))
    with pytest.raises(ValueError, match="ignore_index=-1 needs labels"):
        f(x, w, tx, tw, ignore_index=-1)
    with pytest.raises(TypeError, match="temperature_scaling must be a bool"):
        f(x, w, tx, tw, temperature_scaling="yes")


@pytest.fixture(scope="module")
def on_8_devices():
    return run_script("distill_sharded.py", devices=8)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "tokens_auto-forward_kl",
        "tokens_explicit-jsd",
        "vocab_parallel_1d-reverse_kl",
        "vocab_parallel_1d-jsd",
        "vocab_parallel_2d-forward_kl",
    ],
)
def test_on_8_devices_equal_the_plain_divergence_on_one(on_8_devices, case):
    result = on_8_devices[case]
    assert not isinstance(result, str), result  # a message: it raised
    assert result <= 1e-12


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_nan_padding_in_either_head_reaches_no_gradient(divergence):
    k = jax.random.split(jax.random.key(7), 4)
    x, w = jax.random.normal(k[0], (5, 3)).at[2].set(jnp.nan), jax.random.normal(k[1], (3, 7))
    tx, tw = jax.random.normal(k[2], (5, 6)).at[2].set(jnp.nan), jax.random.normal(k[3], (6, 7))
    where, labels = jnp.array([True, True, False, True, True]), jnp.zeros(5, jnp.int32)

    def loss(x, w, tx, tw):
        return jxent.linear_distillation_loss(
            x, w, tx, tw, where=where, divergence=divergence, labels=labels, hard_weight=0.3,
            teacher_gradient=True,
        )  # fmt: skip

    assert bool(jnp.isfinite(loss(x, w, tx, tw)))
    for g in jax.grad(loss, (0, 1, 2, 3))(x, w, tx, tw):
        assert bool(jnp.all(jnp.isfinite(g)))
