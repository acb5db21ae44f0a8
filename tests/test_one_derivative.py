"""One formula, one derivative: every path and autodiff mode against the plainly written loss.

Each test here was a silent wrong number (or a refusal) in some path: narrow integer label
dtypes, zero gradients for labels and class weights, two derivatives of one loss on masked rows,
forward mode refused, the soft cap un-masking -inf logits, options that could not be traced,
``checked`` depending on trace order, the where-guarded label derivative, the z-loss mean, and
optax's per-logit ``where`` / tuple ``axis``. The references are ``tests/_reference.py`` (a
loss written the textbook way, differentiated by jax in float64) and finite differences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from _reference import BF16_RTOL, reference_loss

INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def _close(a, b, rtol=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1e-300) if b.size else 1.0
    assert float(np.max(np.abs(a - b))) <= rtol * scale, (a, b)


# --- 1. Integer labels of every dtype give the int32 answer on every path -------------------


@pytest.mark.parametrize(
    "dtype",
    # int8 and uint8 (the narrowest, signed and not) in the default tier; the rest in the slow
    # tier (about 4 s each: the README command's time budget).
    [d if d in ("int8", "uint8") else pytest.param(d, marks=pytest.mark.slow) for d in INT_DTYPES],
)
def test_every_integer_label_dtype_gives_the_int32_answer(x64, dtype):
    num_classes = 300
    info = np.iinfo(dtype)
    values = [v for v in (0, 5, 127, 200, 256, 299) if v <= info.max]
    labels = jnp.asarray(np.array(values, dtype))
    logits = jax.random.normal(jax.random.key(0), (len(values), num_classes), jnp.float64)
    want_loss = reference_loss(logits, labels.astype(jnp.int32))
    want_grad = jax.grad(reference_loss)(logits, labels.astype(jnp.int32))
    _close(jxent.softmax_cross_entropy(logits, labels), want_loss)  # eagerly checked
    _close(jxent.logits_grad(logits, labels), want_grad)
    _close(jax.jit(jax.grad(jxent.softmax_cross_entropy))(logits, labels), want_grad)
    if dtype not in ("int8", "uint8", "uint16", "int64"):  # the compiled paths: one of a kind
        return
    _close(jxent.checked(jxent.softmax_cross_entropy)(logits, labels), want_loss)
    # The chunked path: x = I makes x @ w the logits.
    eye, w = jnp.eye(len(values), dtype=jnp.float64), logits
    f = functools.partial(jxent.linear_cross_entropy, chunk_size=2, vocab_block_size=64)
    loss, grad = jax.jit(jax.value_and_grad(f, argnums=1))(eye, w, labels)
    _close(loss, want_loss)
    _close(grad, want_grad)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "uint16"])
def test_ignore_index_the_dtype_cannot_hold_ignores_nothing(dtype):
    logits = jnp.zeros((2, 300))
    labels = jnp.array([3, 4], dtype)
    want = jxent.softmax_cross_entropy(logits, labels.astype(jnp.int32))
    got = jxent.softmax_cross_entropy(logits, labels, ignore_index=-100)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = jxent.linear_cross_entropy(jnp.eye(2), logits, labels, ignore_index=1000)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_issue_examples_for_narrow_dtypes():
    np.testing.assert_allclose(
        jxent.softmax_cross_entropy(jnp.zeros((1, 200)), jnp.array([5], jnp.int8)),
        np.log(200.0),
        rtol=1e-6,
    )
    g = jxent.logits_grad(jnp.zeros((1, 300)), jnp.array([0], jnp.uint8))
    np.testing.assert_allclose(g[0, [0, 256]], [-299 / 300, 1 / 300], rtol=1e-5)
    loss = jxent.linear_cross_entropy(
        jnp.ones((1, 1)), jnp.zeros((1, 300)), jnp.array([0], "uint8")
    )
    np.testing.assert_allclose(loss, np.log(300.0), rtol=1e-6)


# --- 2 and 8. Every floating input gets its true derivative --------------------------------


def _problem(key, soft, n=6, num_classes=5, dtype=jnp.float64):
    k = jax.random.split(key, 4)
    x = 2.0 * jax.random.normal(k[0], (n, num_classes), dtype)
    if soft:
        labels = jax.random.dirichlet(k[1], jnp.ones(num_classes, dtype), (n,))
        labels = labels.at[0, 2].set(0.0)  # a zero entry: its derivative is -log p, not 0
        labels = labels / labels.sum(-1, keepdims=True)
    else:
        labels = jax.random.randint(k[1], (n,), 0, num_classes)
    weights = jax.random.uniform(k[2], (num_classes,), dtype, 0.3, 2.0)
    return x, labels, weights


# label_smoothing and z_loss are always set (traced, differentiated); these vary the rest.
OPTION_SETS = [
    {},
    {"logit_softcap": 1.5, "label_smoothing": 0.1},
    {"where": jnp.array([True, False, True, True, True, True]), "z_loss": 0.1},
]


@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # "sum" is "none" with ones
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
def test_gradients_for_labels_weights_smoothing_and_z(x64, key, soft, reduction, opts):
    x, labels, weights = _problem(key, soft)
    eps, z = opts.get("label_smoothing", 0.1), opts.get("z_loss", 0.2)
    rest = {k: v for k, v in opts.items() if k not in ("label_smoothing", "z_loss")}
    ct = jnp.linspace(0.5, 2.0, x.shape[0]) if reduction == "none" else 1.0

    def ours(x, labels, weights, eps, z):
        out = jxent.softmax_cross_entropy(
            x, labels, reduction=reduction, weights=weights, label_smoothing=eps, z_loss=z, **rest
        )
        return jnp.sum(out * ct)

    def chunked(x, labels, weights, eps, z):
        out = jxent.linear_cross_entropy(
            jnp.eye(x.shape[0], dtype=x.dtype),
            x,
            labels,
            chunk_size=4,
            vocab_block_size=2,
            reduction=reduction,
            weights=weights,
            label_smoothing=eps,
            z_loss=z,
            **rest,
        )
        return jnp.sum(out * ct)

    def plain(x, labels, weights, eps, z):
        out = reference_loss(
            x, labels, reduction=reduction, weights=weights, label_smoothing=eps, z_loss=z, **rest
        )
        return jnp.sum(out * ct)

    argnums = (0, 1, 2, 3, 4) if soft else (0, 2, 3, 4)
    args = (x, labels, weights, jnp.asarray(eps), jnp.asarray(z))
    tangents = [jnp.ones_like(a) for i, a in enumerate(args) if i in argnums]

    def modes(fn, *args):
        """Reverse mode, and forward mode along ones (finite although some targets are 0)."""

        def along(*p):
            full = list(args)
            for i, v in zip(argnums, p):
                full[i] = v
            return fn(*full)

        primals = [a for i, a in enumerate(args) if i in argnums]
        return jax.grad(fn, argnums)(*args), jax.jvp(along, primals, tangents)[1]

    want = jax.jit(functools.partial(modes, plain))(*args)
    for fn in (ours, chunked):
        got = jax.jit(functools.partial(modes, fn))(*args)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            _close(g, r)


def test_zero_probability_label_entry_gets_minus_log_p():
    """The issue's example: d/dq_3 of -sum q log p is -log p_3 = 12.0001, not 1.3e-4."""
    logits = jnp.array([[10.0, 1.0, -2.0]])
    g = jax.grad(lambda q: jxent.softmax_cross_entropy(logits, q, reduction="sum"))(
        jnp.array([[0.0, 1.0, 0.0]])
    )
    want = -jax.nn.log_softmax(logits)
    np.testing.assert_allclose(g, want, rtol=1e-6)
    np.testing.assert_allclose(g[0, 2], 12.0001, rtol=1e-5)


def test_label_tangents_stay_finite_at_minus_inf_logits(x64):
    logits = jnp.array([[1.0, -jnp.inf, 0.5]])
    q = jnp.array([[0.3, 0.0, 0.7]])
    q_dot = jnp.array([[1.0, 0.0, -1.0]])
    _, tangent = jax.jvp(lambda q: jxent.softmax_cross_entropy(logits, q), (q,), (q_dot,))
    log_p = jax.nn.log_softmax(jnp.array([[1.0, 0.5]]))
    np.testing.assert_allclose(tangent, -(log_p[0, 0] - log_p[0, 1]), rtol=1e-12)


# --- 3. One derivative on masked rows of -inf logits ---------------------------------------


def test_masked_rows_of_minus_inf_have_zero_gradient_in_every_mode(x64):
    logits = jnp.array([[0.0, 1.0, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf], [1.0, 0.0, -1.0]])
    y, where = jnp.array([0, 1, 2]), jnp.array([True, False, True])
    f = functools.partial(jxent.softmax_cross_entropy, labels=y, where=where)
    hand = jxent.logits_grad(logits, y, where=where)
    auto = jax.grad(f)(logits)
    np.testing.assert_array_equal(auto[1], 0.0)
    _close(auto, hand, 1e-15)
    _close(auto, jax.grad(reference_loss)(jnp.where(where[:, None], logits, 0.0), y, where=where))
    assert np.all(np.isfinite(jax.hessian(f)(logits)))
    # Through a predictor every parameter gradient stays finite.
    w = jnp.ones((2, 3))
    h = lambda w: jnp.where(jnp.array([[True], [False], [True]]), jnp.ones((3, 2)) @ w, -jnp.inf)
    assert np.all(np.isfinite(jax.grad(lambda w: f(h(w)))(w)))


# --- 4. Forward mode, jacfwd, hessian, linearize and vmap of every public loss -------------


def _public_losses(reduction, labels, opts):
    def materialised(z):
        return jxent.softmax_cross_entropy(z, labels, reduction=reduction, **opts)

    def chunked(z):
        eye = jnp.eye(z.shape[0], dtype=z.dtype)
        return jxent.linear_cross_entropy(
            eye, z, labels, chunk_size=4, vocab_block_size=2, reduction=reduction, **opts
        )

    return {"softmax_cross_entropy": materialised, "linear_cross_entropy": chunked}


@pytest.mark.parametrize(
    "reduction",
    ["mean", pytest.param("none", marks=pytest.mark.slow)],  # time budget
)
@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
def test_jvp_jacfwd_hessian_linearize_vmap(x64, key, reduction, soft):
    x, labels, weights = _problem(key, soft)
    opts = {"weights": weights, "label_smoothing": 0.1, "z_loss": 0.05, "logit_softcap": 3.0}
    t = jax.random.normal(jax.random.fold_in(key, 9), x.shape, jnp.float64)

    def modes(fn, x, t):
        batch = jnp.stack([x, 0.5 * x])
        out = {
            "jvp": jax.jvp(fn, (x,), (t,))[1],
            "jacfwd": jax.jacfwd(fn)(x),
            "linearize": jax.linearize(fn, x)[1](t),
            "vmap": jax.vmap(fn)(batch),
            "vmap_grad": jax.vmap(jax.grad(lambda z: jnp.sum(fn(z))))(batch),
        }
        if reduction == "mean":
            out["hessian"] = jax.hessian(fn)(x)
            out["hvp"] = jax.jvp(jax.grad(fn), (x,), (t,))[1]
        return out

    def plain(z):
        return reference_loss(z, labels, reduction=reduction, **opts)

    want = jax.jit(functools.partial(modes, plain))(x, t)
    want["jacfwd"] = jax.jacrev(plain)(x)  # reverse mode of the reference: independent
    for fn in _public_losses(reduction, labels, opts).values():
        got = jax.jit(functools.partial(modes, fn))(x, t)
        for name in want:
            _close(got[name], want[name], 1e-9)


def test_wiring_jax_grad_of_the_loss_runs_the_hand_derived_gradient(x64, key):
    """Wiring, not agreement: both sides are jxent's rule (the independent leg is the test above,
    against ``jax.grad`` of the plain reference loss)."""
    x, labels, weights = _problem(key, False)
    opts = {"weights": weights, "label_smoothing": 0.2, "z_loss": 0.1, "logit_softcap": 2.0}
    auto = jax.grad(lambda z: jxent.softmax_cross_entropy(z, labels, **opts))(x)
    _close(auto, jxent.logits_grad(x, labels, **opts), 1e-15)


# --- 5. The soft cap keeps masked classes masked -------------------------------------------


@pytest.mark.parametrize("path", ["materialised", "chunked"])
def test_soft_cap_keeps_minus_inf_logits_masked(x64, path):
    logits = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf]])
    y = jnp.array([2])
    capped_ref = reference_loss(jnp.array([[0.0, 1.0]]), jnp.array([1]), logit_softcap=5.0)
    if path == "materialised":
        loss, g = jxent.loss_and_logits_grad(logits, y, logit_softcap=5.0)
    else:
        # Bias -inf (the usual way to mask a vocabulary in a head): also in padded rows.
        f = lambda b: jxent.linear_cross_entropy(
            jnp.ones((1, 1)), jnp.zeros((1, 4)), y, bias=b[0], logit_softcap=5.0, vocab_block_size=2
        )
        loss, g = jax.value_and_grad(f)(logits)
    _close(loss, capped_ref)
    np.testing.assert_array_equal(g[0, [1, 3]], 0.0)
    g_ref = jax.grad(reference_loss)(jnp.array([[0.0, 1.0]]), jnp.array([1]), logit_softcap=5.0)
    _close(g[0, [0, 2]], g_ref[0])


# --- 6. Traced label_smoothing and z_loss ---------------------------------------------------


def test_traced_smoothing_and_z_loss_schedule_under_jit(x64, key):
    x, labels, _ = _problem(key, False)
    f = jax.jit(lambda e, z: jxent.softmax_cross_entropy(x, labels, label_smoothing=e, z_loss=z))
    g = jax.jit(
        lambda e, z: jxent.linear_cross_entropy(
            jnp.eye(6), x, labels, label_smoothing=e, z_loss=z, chunk_size=4
        )
    )
    for eps, z in [(0.0, 0.0), (0.1, 1e-3), (0.4, 0.2)]:
        want = reference_loss(x, labels, label_smoothing=eps, z_loss=z)
        _close(f(eps, z), want)
        _close(g(eps, z), want)
    for bad in [(1.5, 0.0), (0.1, -1.0), (-0.1, 0.0)]:
        assert np.isnan(f(*bad))
        assert np.isnan(g(*bad))
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0.0, 1.0\], found 1.5"):
        jxent.softmax_cross_entropy(x, labels, label_smoothing=jnp.asarray(1.5))


# --- 7. checked does not depend on trace order -----------------------------------------------


def test_checked_raises_whatever_traced_the_helper_first():
    logits, bad, good = jnp.zeros((2, 3)), jnp.array([0, 3]), jnp.array([0, 2])
    helper = jax.jit(lambda z, y: jxent.softmax_cross_entropy(z, y, reduction="none"))
    assert np.isnan(helper(logits, bad)[1])  # traced outside checked first
    with pytest.raises(ValueError, match="label out of range: flat position 1 has label 3"):
        jxent.checked(lambda z, y: helper(z, y))(logits, bad)
    other = jax.jit(lambda z, y: jxent.softmax_cross_entropy(z, y, reduction="sum"))
    with pytest.raises(ValueError, match="label out of range"):
        jxent.checked(lambda z, y: other(z, y))(logits, bad)  # traced inside checked first
    assert np.isnan(other(logits, bad))  # ... and outside afterwards: the NaN policy
    np.testing.assert_allclose(other(logits, good), 2 * np.log(3.0), rtol=1e-6)


def test_checked_covers_the_chunked_loss_and_narrow_dtypes():
    f = jxent.checked(lambda x, w, y: jxent.linear_cross_entropy(x, w, y))
    x, w = jnp.ones((2, 1)), jnp.zeros((1, 200))
    np.testing.assert_allclose(f(x, w, jnp.array([5, 150], jnp.uint8)), np.log(200.0), rtol=1e-6)
    with pytest.raises(ValueError, match="has label 250"):
        f(x, w, jnp.array([5, 250], jnp.uint8))


# --- 9. The z-loss mean ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_z_loss_mean_is_invariant_to_the_scale_of_class_weights(scale):
    loss = jxent.softmax_cross_entropy(
        jnp.zeros((2, 4)), jnp.array([0, 1]), weights=jnp.full(4, scale), z_loss=1.0
    )
    np.testing.assert_allclose(loss, np.log(4) + np.log(4) ** 2, rtol=1e-6)  # 3.3081


# --- 10. optax's per-logit where and tuple axis; zero classes --------------------------------


def test_per_logit_where_matches_optax(x64, key):
    logits = jax.random.normal(key, (4, 6), jnp.float64)
    mask = jnp.array(
        [[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0]]
    )
    mask = mask.astype(bool)
    y = jnp.array([0, 5, 1, 3])  # every label's own class unmasked (or the row fully masked)
    q = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (4, 6))) * mask
    for labels, ref in (
        (y, optax.softmax_cross_entropy_with_integer_labels),
        (q, optax.softmax_cross_entropy),
    ):
        got = jxent.softmax_cross_entropy(logits, labels, where=mask, reduction="none")
        want = ref(logits, labels, where=mask)
        _close(got, want)
        g = jax.grad(jxent.softmax_cross_entropy)(logits, labels, where=mask)
        np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
        mean_over_counted = lambda z, labels, ref: jnp.sum(ref(z, labels, where=mask)) / 3
        g_ref = jax.grad(mean_over_counted)(logits, labels, ref)
        _close(g, g_ref)


def test_label_on_a_masked_class_is_an_infinite_loss_not_a_number():
    """optax returns lse(unmasked) - the masked logit; jxent says p_y = 0 (documented)."""
    logits, mask = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[True, False, True]])
    loss, g = jxent.loss_and_logits_grad(logits, jnp.array([1]), where=mask, reduction="none")
    assert loss[0] == jnp.inf
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("axis", [(1, 2), (2, 1), (-2, 1)])  # flattened in the order given
def test_tuple_axis_matches_optax(x64, key, axis):
    logits = jax.random.normal(key, (3, 2, 4, 5), jnp.float64)
    y = jnp.array([[0, 7, 3, 1, 2], [5, 6, 4, 0, 7], [1, 1, 1, 1, 1]])
    ref = functools.partial(optax.softmax_cross_entropy_with_integer_labels, labels=y, axis=axis)
    got = jxent.softmax_cross_entropy(logits, y, axis=axis, reduction="none")
    _close(got, ref(logits))
    g = jxent.logits_grad(logits, y, axis=axis, reduction="sum")
    _close(g, jax.grad(lambda z: jnp.sum(ref(z)))(logits))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: jxent.softmax_cross_entropy(jnp.zeros((5, 0)), jnp.zeros(5, int)),
            "at least one class",
        ),
        (
            lambda: jxent.linear_cross_entropy(
                jnp.ones((5, 2)), jnp.zeros((2, 0)), jnp.zeros(5, int)
            ),
            r"w must have at least one class \(column\), found shape \(2, 0\)",
        ),
        (
            lambda: jxent.softmax_cross_entropy(jnp.zeros((5, 3)), jnp.zeros(5, int), axis=(1, 1)),
            "names an axis twice",
        ),
        (
            lambda: jxent.softmax_cross_entropy(jnp.zeros((5, 3)), jnp.zeros(5, int), axis=1.0),
            "axis must be an int",
        ),
        (
            lambda: jxent.softmax_cross_entropy(
                jnp.zeros((5, 3)), jnp.zeros(5, int), where=jnp.ones((2,), bool)
            ),
            r"where must have the examples' shape \(5,\)",
        ),
    ],
)
def test_bad_axes_masks_and_empty_vocabularies_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# --- Found by trying to break it: bf16 gradients, zero class weights, tuple-axis order ------


@pytest.mark.parametrize("num_classes", [6, 64, 3000])  # one block, one ragged block, 2 blocks
def test_bf16_gradient_of_linear_cross_entropy_for_any_vocabulary(num_classes):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (16, 32)).astype(jnp.bfloat16)
    w = (jax.random.normal(k2, (32, num_classes)) / 6).astype(jnp.bfloat16)
    y = jnp.arange(16) % num_classes
    got = jax.jit(jax.grad(jxent.linear_cross_entropy, (0, 1)))(x, w, y)
    up = lambda a: a.astype(jnp.float32)
    want = jax.grad(lambda x, w: reference_loss(x @ w, y), (0, 1))(up(x), up(w))
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16
        _close(up(g), r, BF16_RTOL)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2}], ids=["plain", "smoothing"])
def test_hessian_with_respect_to_class_weights_one_of_them_zero(x64, opts):
    x = jnp.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]])
    y, cw = jnp.array([1, 2]), jnp.array([0.5, 0.0, 2.0])
    want = jax.hessian(lambda w: reference_loss(x, y, weights=w, **opts))(cw)
    got = jax.jit(jax.hessian(lambda w: jxent.softmax_cross_entropy(x, y, weights=w, **opts)))
    _close(got(cw), want, 1e-12)
    chunked = lambda w: jxent.linear_cross_entropy(jnp.eye(2), x, y, weights=w, **opts)
    _close(jax.jit(jax.hessian(chunked))(cw), want, 1e-12)
