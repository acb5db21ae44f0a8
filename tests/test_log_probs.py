"""Per-token log-probs, entropy, lse and argmax (materialised and fused), and return_stats.

Every value and derivative is compared, in float64, with the fields written plainly from their
definitions on materialised logits (``jax.nn.log_softmax``, ``-sum p log p``) differentiated by
``jax.grad``/``jax.jvp``, and with central finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from _reference import BF16_RTOL, FD_RTOL, FLOAT64_RTOL, assert_tree_close
from _scripts import run_script


def plain_fields(z, y, *, temperature=1.0, cap=None, where=None, class_mask=None):
    """``(log_prob, entropy, lse, argmax)`` written from their definitions; 0 where masked."""
    if cap is not None:
        z = cap * jnp.tanh(z / cap)
    s = z / temperature
    if class_mask is not None:
        s = jnp.where(class_mask, s, -jnp.inf)
    log_p = jax.nn.log_softmax(s, axis=-1)
    p = jnp.exp(log_p)
    # -p log p is 0 where p is; the inner where keeps -inf out of the gradient's other branch.
    entropy = -jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)
    lse = jax.nn.logsumexp(s, axis=-1)
    mask = jnp.ones(y.shape, bool) if where is None else where
    safe = jnp.where(mask, y, 0)
    log_prob = jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    fields = (log_prob, entropy, lse)
    return (*(jnp.where(mask, v, 0.0) for v in fields), jnp.argmax(s, axis=-1))


def head_inputs(key, n=37, d=6, num_classes=23):
    k = jax.random.split(key, 5)
    x = jax.random.normal(k[0], (n, d), jnp.float64)
    w = jax.random.normal(k[1], (d, num_classes), jnp.float64)
    b = jax.random.normal(k[2], (num_classes,), jnp.float64)
    y = jax.random.randint(k[3], (n,), 0, num_classes)
    where = jax.random.bernoulli(k[4], 0.8, (n,))
    return x, w, b, y, where


def weighted(fields_fn, cotangents):
    """A scalar of the three differentiable fields with fixed random cotangents."""

    def scalar(*args):
        out = fields_fn(*args)
        return sum(jnp.sum(c * v) for c, v in zip(cotangents, out[:3], strict=True))

    return scalar


SCHEDULES = [  # default; ragged chunks and blocks; one of each
    (None, None),
    (8, 5),
    pytest.param(64, 100, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("chunk_size", "vocab_block_size"), SCHEDULES)
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("temperature", [pytest.param(1.0, marks=pytest.mark.slow), 0.7])
def test_linear_log_probs_values_and_gradients_match_the_plain_fields(
    x64, key, chunk_size, vocab_block_size, cap, temperature
):
    x, w, b, y, where = head_inputs(key)
    y = jnp.where(jnp.arange(y.shape[0]) == 3, -100, y)  # an ignored token
    counted = where & (y != -100)
    sched = {"chunk_size": chunk_size, "vocab_block_size": vocab_block_size}

    def fused(x, w, b, t):
        return jxent.linear_log_probs(
            x, w, y, bias=b, temperature=t, logit_softcap=cap, where=where, ignore_index=-100,
            **sched,
        )  # fmt: skip

    def plain(x, w, b, t):
        return plain_fields(x @ w + b[None], y, temperature=t, cap=cap, where=counted)

    out, ref = fused(x, w, b, temperature), plain(x, w, b, temperature)
    assert_tree_close(tuple(out[:3]), tuple(ref[:3]), 1e-12)
    np.testing.assert_array_equal(out.argmax, ref[3])
    assert out.argmax.dtype == jnp.int32
    cot = jax.random.normal(jax.random.key(1), (3, x.shape[0]), jnp.float64)
    argnums = (0, 1, 2, 3)
    grads = jax.grad(weighted(fused, cot), argnums)(x, w, b, temperature)
    expected = jax.grad(weighted(plain, cot), argnums)(x, w, b, temperature)
    assert_tree_close(grads, expected, FLOAT64_RTOL)
    assert float(jnp.max(jnp.abs(grads[0][~counted]))) == 0.0  # no gradient where masked
    tangents = (jax.random.normal(jax.random.key(2), x.shape, jnp.float64), 0.3 * w, b, 0.2)
    _, jvp = jax.jvp(lambda *a: tuple(fused(*a)[:3]), (x, w, b, temperature), tangents)
    _, jvp_ref = jax.jvp(lambda *a: plain(*a)[:3], (x, w, b, temperature), tangents)
    assert_tree_close(jvp, jvp_ref, FLOAT64_RTOL)


def test_linear_log_probs_gradient_matches_finite_differences(x64, key):
    x, w, b, y, where = head_inputs(key, n=9, d=3, num_classes=11)
    cot = jax.random.normal(jax.random.key(1), (3, x.shape[0]), jnp.float64)

    def f(x, t):
        return jxent.linear_log_probs(
            x, w, y, bias=b, temperature=t, logit_softcap=3.0, where=where, vocab_block_size=4
        )

    dx, dt = jax.grad(weighted(f, cot), (0, 1))(x, 0.8)
    scalar, h = weighted(f, cot), 1e-6
    for i, j in [(0, 0), (4, 2), (8, 1)]:
        e = jnp.zeros_like(x).at[i, j].set(h)
        fd = (scalar(x + e, 0.8) - scalar(x - e, 0.8)) / (2 * h)
        assert abs(float(dx[i, j]) - float(fd)) <= FD_RTOL * max(1.0, abs(float(fd)))
    fd_t = (scalar(x, 0.8 + h) - scalar(x, 0.8 - h)) / (2 * h)
    assert abs(float(dt) - float(fd_t)) <= FD_RTOL * max(1.0, abs(float(fd_t)))


def test_second_derivatives_of_linear_log_probs(x64, key):
    """Forward over reverse (a Hessian-vector product) through the transposed tangent map."""
    x, w, b, y, _ = head_inputs(key, n=11, d=4, num_classes=13)
    cot = jax.random.normal(jax.random.key(1), (3, x.shape[0]), jnp.float64)

    def fused(x, w):
        return jxent.linear_log_probs(x, w, y, bias=b, temperature=0.9, vocab_block_size=5)

    def plain(x, w):
        return plain_fields(x @ w + b[None], y, temperature=0.9)

    v = (jnp.ones_like(x), 0.5 * w)
    hvp = jax.jvp(jax.grad(weighted(fused, cot), (0, 1)), (x, w), v)[1]
    expected = jax.jvp(jax.grad(weighted(plain, cot), (0, 1)), (x, w), v)[1]
    assert_tree_close(hvp, expected, 1e-9)


def test_linear_log_probs_under_jit_and_vmap(x64, key):
    x, w, b, y, _ = head_inputs(key)
    ws = jnp.stack([w, 2 * w])  # a stack of heads

    def one(w):
        return jxent.linear_log_probs(x, w, y, bias=b, temperature=0.5).log_prob

    got = jax.jit(jax.vmap(one))(ws)
    expected = jnp.stack([plain_fields(x @ v + b[None], y, temperature=0.5)[0] for v in ws])
    assert_tree_close(got, expected, 1e-12)


def test_argmax_is_the_first_of_ties_across_blocks(x64):
    x = jnp.ones((3, 1), jnp.float64)
    w = jnp.array([[0.0, 2.0, 1.0, 2.0, 2.0, 0.0, 2.0]])  # the max 2 at columns 1, 3, 4, 6
    for block in (1, 2, 3, 7):
        out = jxent.linear_log_probs(x, w, jnp.zeros(3, jnp.int32), vocab_block_size=block)
        np.testing.assert_array_equal(out.argmax, [1, 1, 1])


def test_materialised_log_probs_match_the_plain_fields_on_any_axis(x64, key):
    k = jax.random.split(key, 4)
    z = 3 * jax.random.normal(k[0], (4, 7, 5), jnp.float64)  # classes on axis 1
    y = jax.random.randint(k[1], (4, 5), 0, 7)
    class_mask = jax.random.bernoulli(k[2], 0.8, (4, 7, 5)).at[:, 0].set(True)
    y = jnp.where(jnp.take_along_axis(class_mask, y[:, None], axis=1)[:, 0], y, 0)
    moved, mask_moved = jnp.moveaxis(z, 1, -1), jnp.moveaxis(class_mask, 1, -1)

    def mine(z, t):
        return jxent.log_probs(z, y, axis=1, temperature=t, logit_softcap=2.0, where=class_mask)

    def plain(z, t):
        z = jnp.moveaxis(z, 1, -1)
        return plain_fields(z, y, temperature=t, cap=2.0, class_mask=mask_moved)

    out, ref = mine(z, 1.3), plain(z, 1.3)
    assert_tree_close(tuple(out[:3]), tuple(ref[:3]), 1e-12)
    np.testing.assert_array_equal(out.argmax, ref[3])
    cot = jax.random.normal(k[3], (3, 4, 5), jnp.float64)
    grads = jax.grad(weighted(mine, cot), (0, 1))(z, 1.3)
    assert_tree_close(grads, jax.grad(weighted(plain, cot), (0, 1))(z, 1.3), FLOAT64_RTOL)
    assert moved.shape == (4, 5, 7)


def test_masked_and_ignored_tokens_are_zero_with_no_gradient(x64, key):
    x, w, b, y, _ = head_inputs(key, n=6)
    where = jnp.array([True, False, True, True, True, True])
    y = y.at[2].set(-1)
    x = x.at[1].set(jnp.nan)  # padding may hold anything where it does not count

    def f(x, w):
        out = jxent.linear_log_probs(x, w, y, where=where, ignore_index=-1)
        return out.log_prob.sum() + out.entropy.sum() + out.lse.sum()

    out = jxent.linear_log_probs(x, w, y, where=where, ignore_index=-1)
    for field in out[:3]:
        assert float(field[1]) == 0.0
        assert float(field[2]) == 0.0
    dx, dw = jax.grad(f, (0, 1))(x, w)
    assert float(jnp.max(jnp.abs(dx[1:3]))) == 0.0
    assert bool(jnp.all(jnp.isfinite(dx)))
    assert bool(jnp.all(jnp.isfinite(dw)))  # x^T G: the padding row's NaN must not reach dW


def test_bad_labels_and_temperatures_raise_eagerly_and_are_nan_under_jit(key):
    x, w = jnp.ones((4, 3)), jnp.zeros((3, 5))
    y = jnp.array([0, 1, 2, 5])
    with pytest.raises(ValueError, match="label"):
        jxent.linear_log_probs(x, w, y)
    nan = jax.jit(lambda y: jxent.linear_log_probs(x, w, y).log_prob)(y)
    assert bool(jnp.isnan(nan[3]))
    assert not bool(jnp.isnan(nan[0]))
    good = jnp.array([0, 1, 2, 4])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            jxent.linear_log_probs(x, w, good, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            jxent.log_probs(x @ w, good, temperature=bad)
    traced = jax.jit(lambda t: jxent.linear_log_probs(x, w, good, temperature=t).log_prob)(0.0)
    assert bool(jnp.all(jnp.isnan(traced)))
    with pytest.raises(ValueError, match="temperature must be a scalar"):
        jxent.linear_log_probs(x, w, good, temperature=jnp.ones(2))
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        jxent.linear_log_probs(x, w, jnp.full((4, 5), 0.2))
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        jxent.log_probs(x @ w, jnp.full((4, 5), 0.2))
    with pytest.raises(TypeError, match=r"unexpected keyword"):
        jxent.linear_log_probs(x, w, good, temprature=2.0)


def test_bfloat16_log_prob_is_float32_and_within_bfloat16_rounding(x64, key):
    x, w, _, y, _ = head_inputs(key, n=64, d=16, num_classes=300)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    x64_, w64 = xb.astype(jnp.float64), wb.astype(jnp.float64)
    exact = plain_fields(x64_ @ w64, y, temperature=0.8)[0]
    out = jxent.linear_log_probs(xb, wb, y, temperature=0.8, vocab_block_size=128)
    assert out.log_prob.dtype == jnp.float32
    # The logits are accumulated in float32 from the same bf16 inputs: float32 rounding only.
    assert_tree_close(out.log_prob.astype(jnp.float64), exact, 1e-5)
    dx = jax.grad(lambda x: jxent.linear_log_probs(x, wb, y).log_prob.sum())(xb)
    assert dx.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: plain_fields(x @ w64, y)[0].sum())(x64_)
    assert_tree_close(dx.astype(jnp.float64), ref, BF16_RTOL)


@pytest.mark.parametrize("reduction", ["mean", pytest.param("none", marks=pytest.mark.slow)])
@pytest.mark.parametrize("soft", [False, True])
def test_return_stats_come_from_the_same_pass_and_leave_the_loss_alone(x64, key, reduction, soft):
    x, w, b, y, where = head_inputs(key)
    labels = jax.nn.softmax(x @ w[:, ::-1]) if soft else y
    opts = {"bias": b, "where": where, "z_loss": 1e-3, "reduction": reduction}
    opts |= {"chunk_size": 8, "vocab_block_size": 5}

    def total(x, **k):
        return jnp.sum(jxent.linear_cross_entropy(x, w, labels, **opts, **k)[0] if k else
                       jxent.linear_cross_entropy(x, w, labels, **opts))  # fmt: skip

    loss, stats = jxent.linear_cross_entropy(x, w, labels, return_stats=True, **opts)
    assert_tree_close(loss, jxent.linear_cross_entropy(x, w, labels, **opts), 1e-14)
    z = x @ w + b[None]
    ref = plain_fields(z, y, where=where)
    label = jnp.argmax(labels, -1) if soft else y
    assert_tree_close((stats.lse, stats.entropy), (ref[2], ref[1]), 1e-12)
    np.testing.assert_array_equal(stats.argmax, ref[3])
    np.testing.assert_array_equal(stats.correct, where & (ref[3] == label))
    assert_tree_close(stats.z_term, jnp.where(where, 1e-3 * ref[2] ** 2, 0.0), 1e-12)
    grads = jax.grad(lambda x: total(x, return_stats=True))(x)
    assert_tree_close(grads, jax.grad(total)(x), 1e-14)
    # The materialised loss gives the same statistics.
    sm_opts = {k: v for k, v in opts.items() if k not in ("bias", "chunk_size", "vocab_block_size")}
    sm_loss, sm_stats = jxent.softmax_cross_entropy(z, labels, return_stats=True, **sm_opts)
    assert_tree_close(sm_loss, loss, 1e-12)
    floats = ("lse", "entropy", "z_term")
    assert_tree_close(
        [sm_stats._asdict()[f] for f in floats], [stats._asdict()[f] for f in floats], 1e-12
    )
    np.testing.assert_array_equal(sm_stats.argmax, stats.argmax)
    np.testing.assert_array_equal(sm_stats.correct, stats.correct)


def test_return_stats_must_be_a_bool():
    x, w, y = jnp.ones((2, 3)), jnp.zeros((3, 4)), jnp.array([0, 1])
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        jxent.linear_cross_entropy(x, w, y, return_stats="yes")
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        jxent.softmax_cross_entropy(x @ w, y, return_stats=1)


@pytest.fixture(scope="module")
def on_8_devices():
    return run_script("log_probs_sharded.py", devices=8)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "tokens_auto",
        "tokens_explicit",
        "vocab_parallel_1d",
        "vocab_parallel_2d",  # tokens over "data", classes over "vocab"
        "return_stats_vocab_parallel",  # the argmax merged across vocabulary shards
    ],
)
def test_on_8_devices_equal_the_plain_fields_on_one(on_8_devices, case):
    result = on_8_devices[case]
    assert not isinstance(result, str), result  # a message: it raised
    assert result["error"] <= 1e-12
    assert result["argmax_differs"] == 0


@pytest.mark.parametrize(
    ("function", "misspelled", "meant"),
    [
        ("linear_cross_entropy", "label_smothing", "label_smoothing"),
        ("linear_log_probs", "temprature", "temperature"),
        ("linear_distillation_loss", "diverence", "divergence"),
        ("log_probs", "ignore_idx", "ignore_index"),
    ],
)
def test_misspelled_options_are_named_with_the_one_meant(function, misspelled, meant):
    x, w, y = jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.array([0, 1])
    args = {
        "linear_distillation_loss": (x, w, x, w),
        "log_probs": (x @ w, y),
    }.get(function, (x, w, y))
    with pytest.raises(TypeError, match=f"{misspelled!r}; did you mean {meant!r}"):
        getattr(jxent, function)(*args, **{misspelled: 1})


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_padding_reaches_no_gradient_of_the_cross_entropy_or_the_ggn(reduction):
    x = jax.random.normal(jax.random.key(0), (4, 3)).at[1].set(jnp.nan)  # row 1: padding
    w, y = jax.random.normal(jax.random.key(1), (3, 6)), jnp.array([0, 5, 2, 5])
    where = jnp.array([True, False, True, True])

    def loss(x, w):
        return jnp.sum(jxent.linear_cross_entropy(x, w, y, where=where, reduction=reduction))

    for g in jax.grad(loss, (0, 1))(x, w):
        assert bool(jnp.all(jnp.isfinite(g)))
    v = (jnp.ones_like(x), jnp.ones_like(w), None)
    ggn = jxent.linear_cross_entropy_ggn_vector_product(x, w, y, v, where=where)
    for g in jax.tree.leaves(ggn):
        assert bool(jnp.all(jnp.isfinite(g)))
