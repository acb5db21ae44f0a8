"""Second order: the hand-derived Hessian and GGN products against plainly written references.

References, all in float64 and none calling jxent's curvature code:
- the exact Hessian product: ``jax.jvp(jax.grad(reference_loss))``;
- the GGN: the reference loss split as CE(s) + Z(r), with s the (capped) scores and r = lse(s)
  each example's log-sum-exp, both convex in their own argument; the GGN is the Jacobian of
  (s, r) transposed, the Hessian of CE and Z in between, the Jacobian again;
- for predictors: the dense ``J_h^T H J_h`` assembled from ``jax.jacfwd`` of the predictor, and
  finite differences of jxent's own gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jxent
from _reference import FD_RTOL, assert_tree_close, reference_loss
from jxent.predictors import embedding, linear, mlp

B, L = 6, 5
ROWS = jnp.array([True, False, True, True, True, True])
# A far-negative logit instead of -inf for a masked class in the reference: 0 * log p stays 0.
MASK_OFFSET = -1e30


def _problem(key, soft, dtype=jnp.float64):
    k = jax.random.split(key, 4)
    x = 2.0 * jax.random.normal(k[0], (B, L), dtype)
    x = x.at[1:3].add(-6.0)  # rows whose log-sum-exp is negative: z-loss curvature is indefinite
    if soft:
        labels = jax.random.dirichlet(k[1], jnp.ones(L, dtype), (B,))
    else:
        labels = jax.random.randint(k[1], (B,), 0, L).at[4].set(2)  # row 4: ignore_index below
    v = jax.random.normal(k[2], (B, L), dtype)
    weights = jax.random.uniform(k[3], (L,), dtype, 0.3, 2.0)
    return x, labels, v, weights


# Every option alone and in pairs; "weights" is replaced by the drawn class weights.
OPTION_SETS = [
    {},
    {"weights": True},
    {"label_smoothing": 0.1},
    {"z_loss": 0.3},
    {"logit_softcap": 1.5},
    {"where": ROWS},
    {"ignore_index": 2},
    {"logit_softcap": 1.5, "z_loss": 0.3},
    {"weights": True, "label_smoothing": 0.2},
    {"where": ROWS, "z_loss": 0.1, "weights": True},
    {"logit_softcap": 2.0, "label_smoothing": 0.1, "ignore_index": 2},
    {"class_mask": True, "z_loss": 0.2},
    {"weights": True, "label_smoothing": 0.1, "z_loss": 0.2, "logit_softcap": 3.0, "where": ROWS},
]


def _ids(opts):
    return "+".join(opts) or "plain"


def _with_label_kinds(option_sets):
    """(opts, soft) pairs; ignore_index takes integer labels only (its refusal: test_options)."""
    return [
        pytest.param(o, soft, id=f"{_ids(o)}-{'soft' if soft else 'int'}")
        for o in option_sets
        for soft in (False, True)
        if not (soft and "ignore_index" in o)
    ]


def _options(opts, weights, soft):
    """The jxent options and, for a per-logit mask, the mask."""
    opts = dict(opts)
    if opts.pop("weights", False):
        opts["weights"] = weights
    class_mask = None
    if opts.pop("class_mask", False):
        class_mask = jnp.ones((B, L), bool).at[0, 1].set(False).at[3, 4].set(False)
        opts["where"] = class_mask
    return opts, class_mask


class Reference:
    """The loss written plainly; its exact Hessian product and its GGN product."""

    def __init__(self, labels, reduction, opts, class_mask):
        self.labels, self.reduction, self.class_mask = labels, reduction, class_mask
        self.cap = opts.get("logit_softcap")
        self.z = opts.get("z_loss", 0.0)
        skip = ("logit_softcap", "z_loss", "where")
        self.ce_opts = {k: v for k, v in opts.items() if k not in skip}
        self.where = None if class_mask is not None else opts.get("where")
        self.rows = jnp.ones((B,), bool) if self.where is None else self.where
        if opts.get("ignore_index") is not None:
            self.rows = self.rows & (labels != opts["ignore_index"])

    def scores(self, x):
        s = x if self.cap is None else self.cap * jnp.tanh(x / self.cap)
        return s if self.class_mask is None else s + jnp.where(self.class_mask, 0.0, MASK_OFFSET)

    def ce(self, s):
        loss = reference_loss(
            s, self.labels, reduction=self.reduction, where=self.where, **self.ce_opts
        )
        return jnp.sum(loss)

    def zterm(self, r):
        r2 = jnp.where(self.rows, r**2, 0.0)
        if self.reduction == "mean":
            return self.z * jnp.sum(r2) / jnp.maximum(jnp.sum(self.rows), 1)
        return self.z * jnp.sum(r2)

    def outputs(self, x):
        s = self.scores(x)
        return s, jax.nn.logsumexp(s, axis=-1)

    def loss(self, x):
        s, r = self.outputs(x)
        return self.ce(s) + self.zterm(r)

    def hvp(self, x, v):
        return jax.jvp(jax.grad(self.loss), (x,), (v,))[1]

    def ggn(self, x, v):
        (s, r), (s_dot, r_dot) = jax.jvp(self.outputs, (x,), (v,))
        hs = jax.jvp(jax.grad(self.ce), (s,), (s_dot,))[1]
        hr = jax.jvp(jax.grad(self.zterm), (r,), (r_dot,))[1]
        return jax.vjp(self.outputs, x)[1]((hs, hr))[0]


def _with_reductions(option_sets):
    """Every set with "mean"; "sum" and "none" for the plain, the per-logit-mask and the all-options
    sets, the rest of them in the slow tier."""
    out = []
    for p in _with_label_kinds(option_sets):
        opts, soft = p.values
        for reduction in ("mean", "sum", "none"):
            edges = (option_sets[0], option_sets[-2], option_sets[-1])
            slow = reduction != "mean" and opts not in edges
            marks = [pytest.mark.slow] if slow else []
            out.append(pytest.param(opts, soft, reduction, id=f"{p.id}-{reduction}", marks=marks))
    return out


@pytest.mark.parametrize(("opts", "soft", "reduction"), _with_reductions(OPTION_SETS))
def test_logits_hvp_and_ggn_match_the_plain_loss(x64, key, opts, soft, reduction):
    x, labels, v, weights = _problem(key, soft)
    opts, class_mask = _options(opts, weights, soft)
    if soft and class_mask is not None:  # no target mass on a masked class (that loss is +inf)
        labels = labels * class_mask
        labels = labels / labels.sum(-1, keepdims=True)
    ref = Reference(labels, reduction, opts, class_mask)
    want = jax.jit(lambda x, v: {"hessian": ref.hvp(x, v), "ggn": ref.ggn(x, v)})(x, v)
    for curvature in ("hessian", "ggn"):
        got = jxent.logits_hvp(x, labels, v, reduction=reduction, curvature=curvature, **opts)
        assert_tree_close(got, want[curvature], 1e-11)


def test_the_ggn_leaves_out_exactly_the_cap_and_lse_terms(x64, key):
    """Where the Hessian is indefinite (z-loss at lse < 0) the GGN is not: the test can fail."""
    x, labels, _, _ = _problem(key, False)
    opts = {"z_loss": 2.0}
    dense = {
        c: jax.vmap(lambda e, c=c: jxent.logits_hvp(x, labels, e, curvature=c, **opts))(
            jnp.eye(B * L).reshape(-1, B, L)
        ).reshape(B * L, B * L)
        for c in ("hessian", "ggn")
    }
    eig = {c: np.linalg.eigvalsh(np.asarray(m)) for c, m in dense.items()}
    assert eig["hessian"][0] < -1e-3 * eig["hessian"][-1]
    assert eig["ggn"][0] > -1e-14 * eig["ggn"][-1]


def test_wiring_jvp_of_grad_of_every_public_loss_runs_the_hand_derived_product(x64, key):
    """Wiring for the materialised loss (``logits_hvp`` is the same rule; its independent leg is
    ``test_logits_hvp_and_ggn_match_the_plain_loss``); agreement for the chunked one, against
    the plain loss of ``x @ w + b``."""
    x, labels, v, weights = _problem(key, False)
    opts = {"weights": weights, "label_smoothing": 0.1, "z_loss": 0.2, "logit_softcap": 2.0}
    want = jxent.logits_hvp(x, labels, v, **opts)
    loss = functools.partial(jxent.softmax_cross_entropy, labels=labels, **opts)
    assert_tree_close(jax.jvp(jax.grad(loss), (x,), (v,))[1], want, 1e-13)
    assert_tree_close(
        jax.hessian(loss)(x).reshape(B * L, B * L) @ v.reshape(-1), want.ravel(), 1e-13
    )
    # The chunked loss's Hessian product along (x, w) is the exact one of x @ w + b.
    h, w, b = x[:, :4], jnp.linspace(-1.0, 1.0, 4 * L).reshape(4, L), jnp.arange(L) / L
    h_dot, w_dot = v[:, :4], jnp.cos(w)

    def chunked(h, w):
        return jxent.linear_cross_entropy(
            h, w, labels, bias=b, chunk_size=4, vocab_block_size=2, **opts
        )

    def plain(h, w):
        return reference_loss(h @ w + b[None, :], labels, **opts)

    got = jax.jvp(jax.grad(chunked, argnums=(0, 1)), (h, w), (h_dot, w_dot))[1]
    ref = jax.jvp(jax.grad(plain, argnums=(0, 1)), (h, w), (h_dot, w_dot))[1]
    assert_tree_close(got, ref, 1e-12)


# --- predictors -----------------------------------------------------------------------------

PREDICTORS = {
    "linear": (lambda k: linear.init(k, 3, L, jnp.float64), linear.apply),
    # relu's second derivative is 0: the tanh MLP covers the same code with predictor curvature.
    "mlp": (lambda k: mlp.init(k, [3, 4, L], jnp.float64), mlp.apply),
    "mlp_tanh": (
        lambda k: mlp.init(k, [3, 4, L], jnp.float64),
        functools.partial(mlp.apply, activation=jnp.tanh),
    ),
    "embedding": (lambda k: embedding.init(k, 3, L, 4, jnp.float64), embedding.apply),
}
PREDICTOR_OPTIONS = [
    {},
    {"reduction": "none", "ignore_index": 2, "logit_softcap": 1.5},
    {"weights": True, "label_smoothing": 0.1, "z_loss": 0.2, "logit_softcap": 3.0, "where": ROWS},
]


def _setup(key, name, soft, opts):
    init, apply = PREDICTORS[name]
    k = jax.random.split(key, 4)
    params = init(k[0])
    x = jax.random.normal(k[1], (B, 3), jnp.float64)
    _, labels, _, weights = _problem(k[2], soft)
    v = jax.tree.map(lambda a: jax.random.normal(k[3], a.shape, a.dtype), params)
    return params, apply, x, labels, v, _options(opts, weights, soft)


def _predictor_grid():
    """Every predictor with every option set; in the default tier the linear predictor with all
    of them and the others with the all-options set (the rest: the slow tier, time budget)."""
    out = []
    for name in PREDICTORS:
        for case in _with_label_kinds(PREDICTOR_OPTIONS):
            opts, soft = case.values
            quick = name == "linear" or (name != "mlp" and opts is PREDICTOR_OPTIONS[-1])
            marks = [] if quick else [pytest.mark.slow]
            out.append(pytest.param(name, opts, soft, marks=marks, id=f"{name}-{case.id}"))
    return out


@pytest.mark.parametrize(("name", "opts", "soft"), _predictor_grid())
def test_predictor_products_match_dense_references(x64, key, name, opts, soft):
    params, apply, x, labels, v, (opts, _) = _setup(key, name, soft, opts)
    reduction = opts.pop("reduction", "mean")
    ref = Reference(labels, reduction, opts, None)
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def references(params, v):
        hvp = jax.jvp(jax.grad(lambda p: ref.loss(apply(p, x))), (params,), (v,))[1]
        # The dense GGN: J^T H J with J from jacfwd of the predictor, H the logits GGN matrix.
        jac = jax.jacfwd(lambda f: apply(unravel(f), x))(flat).reshape(B * L, -1)
        logits = apply(params, x)
        basis = jnp.eye(B * L).reshape(-1, B, L)
        h = jax.vmap(lambda e: ref.ggn(logits, e))(basis).reshape(B * L, B * L)
        return hvp, unravel(jac.T @ h @ jac @ ravel_pytree(v)[0])

    want_hvp, want_ggn = references(params, v)
    hvp = jax.jit(jxent.hessian_vector_product(apply, reduction=reduction, **opts))
    ggn = jax.jit(jxent.ggn_vector_product(apply, reduction=reduction, **opts))
    assert_tree_close(hvp(params, x, labels, v), want_hvp, 1e-11)
    assert_tree_close(ggn(params, x, labels, v), want_ggn, 1e-11)
    # Central differences of jxent's own gradient along v: O(h^2) = 1e-8 relative.
    grad = jax.jit(jxent.grad(apply, reduction=reduction, **opts))
    step = 1e-4
    moved = [jax.tree.map(lambda p, t, s=s: p + s * step * t, params, v) for s in (1, -1)]
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * step), *(grad(m, x, labels) for m in moved))
    assert_tree_close(hvp(params, x, labels, v), fd, FD_RTOL)


@pytest.mark.parametrize("name", PREDICTORS)
def test_ggn_is_symmetric_and_positive_semidefinite(x64, key, name):
    opts = PREDICTOR_OPTIONS[2]
    params, apply, x, labels, _, (opts, _) = _setup(key, name, False, opts)
    flat, unravel = ravel_pytree(params)
    ggn = jxent.ggn_vector_product(apply, **opts)
    hvp = jxent.hessian_vector_product(apply, **opts)

    @functools.partial(jax.jit, static_argnums=0)
    def dense(product):
        column = lambda e: ravel_pytree(product(params, x, labels, unravel(e)))[0]
        return jax.vmap(column)(jnp.eye(flat.size))

    g, h = np.asarray(dense(ggn)), np.asarray(dense(hvp))
    scale = np.abs(g).max()
    np.testing.assert_allclose(g, g.T, rtol=0, atol=1e-13 * scale)  # <e_i, G e_j> = <G e_i, e_j>
    assert np.linalg.eigvalsh(g)[0] >= -1e-13 * scale
    np.testing.assert_allclose(h, h.T, rtol=0, atol=1e-12 * np.abs(h).max())
    u, w = np.random.default_rng(0).normal(size=(2, flat.size))
    assert abs(u @ g @ w - w @ g @ u) <= 1e-13 * np.abs(g).sum()


def test_products_under_vmap_and_with_has_aux(x64, key):
    params, apply, x, labels, v, (opts, _) = _setup(key, "embedding", False, {})
    vs = jax.tree.map(lambda a: jnp.stack([a, -2.0 * a, jnp.cos(a)]), v)
    for make in (jxent.ggn_vector_product, jxent.hessian_vector_product):
        f = make(apply)
        batched = jax.jit(jax.vmap(f, in_axes=(None, None, None, 0)))(params, x, labels, vs)
        for i in range(3):
            one = f(params, x, labels, jax.tree.map(lambda a, i=i: a[i], vs))
            assert_tree_close(jax.tree.map(lambda a, i=i: a[i], batched), one, 1e-13)
        aux_f = make(lambda p, x: (apply(p, x), {"n": x.shape[0]}), has_aux=True)
        product, aux = aux_f(params, x, labels, v)
        assert aux == {"n": B}
        assert_tree_close(product, f(params, x, labels, v), 0.0)


def test_bad_tangents_and_options_are_named(x64, key):
    params, apply, x, labels, v, _ = _setup(key, "linear", False, {})
    x32 = jnp.ones((2, L))
    with pytest.raises(ValueError, match=r"tangents must have the logits' shape \(2, 5\)"):
        jxent.logits_hvp(x32, jnp.array([0, 1]), jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="tangents must have a floating dtype"):
        jxent.logits_hvp(x32, jnp.array([0, 1]), jnp.ones((2, L), jnp.int32))
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn', found 'fisher'"):
        jxent.logits_hvp(x32, jnp.array([0, 1]), x32, curvature="fisher")
    for make in (jxent.ggn_vector_product, jxent.hessian_vector_product):
        with pytest.raises(TypeError, match=f"{make.__name__}\\(\\) got an unknown loss option"):
            make(apply, label_smothing=0.1)
        with pytest.raises(ValueError, match=r"v\['w'\] must have the shape of params\['w'\]"):
            make(apply)(params, x, labels, {"w": jnp.ones((2, 2)), "b": v["b"]})
        with pytest.raises(ValueError, match="v must have the structure of params"):
            make(apply)(params, x, labels, [v["w"]])
        with pytest.raises(TypeError, match="pass has_aux=True"):
            make(lambda p, x: (apply(p, x), 0))(params, x, labels, v)


# --- the chunked GGN product of the linear head ------------------------------------------------

HEAD_OPTIONS = [
    {},
    {"reduction": "none", "ignore_index": 2, "z_loss": 0.2},
    {"reduction": "sum", "weights": True, "label_smoothing": 0.1, "logit_softcap": 2.0},
    {"weights": True, "z_loss": 0.1, "logit_softcap": 3.0, "where": True},
]


def _head(key, soft, dtype=jnp.float64, n=13, d=4, num_classes=11):
    k = jax.random.split(key, 8)
    x, w_dot = (jax.random.normal(k[i], s, dtype) for i, s in ((0, (n, d)), (1, (d, num_classes))))
    w = jax.random.normal(k[2], (d, num_classes), dtype)
    bias, b_dot = (jax.random.normal(k[i], (num_classes,), dtype) for i in (3, 4))
    x_dot = jax.random.normal(k[5], (n, d), dtype)
    if soft:
        labels = jax.random.dirichlet(k[6], jnp.ones(num_classes, dtype), (n,))
    else:
        labels = jax.random.randint(k[6], (n,), 0, num_classes)
    weights = jax.random.uniform(k[7], (num_classes,), dtype, 0.3, 2.0)
    return (x, w, bias), (x_dot, w_dot, b_dot), labels, weights


def _head_options(opts, weights, n=13):
    opts = dict(opts)
    if opts.pop("weights", False):
        opts["weights"] = weights
    if opts.pop("where", False):
        opts["where"] = jnp.arange(n) % 4 != 1
    return opts


def _materialised_head_ggn(primals, tangents, labels, opts):
    """The GGN product of x @ w + b through jxent.ggn_vector_product (proven above)."""
    head = lambda p, _: p[0] @ p[1] + p[2][None, :]
    return jxent.ggn_vector_product(head, **opts)(primals, None, labels, tangents)


# ragged: 13 tokens in chunks of 4 (one padded), 11 classes in blocks of 3 (one of 2); one block
@pytest.mark.parametrize(("chunk_size", "vocab_block_size"), [(4, 3), (5, 11)])
@pytest.mark.parametrize(("opts", "soft"), _with_label_kinds(HEAD_OPTIONS))
def test_chunked_head_ggn_equals_the_materialised_one(
    x64, key, opts, soft, chunk_size, vocab_block_size
):
    primals, tangents, labels, weights = _head(key, soft)
    opts = _head_options(opts, weights)
    want = _materialised_head_ggn(primals, tangents, labels, opts)
    got = jax.jit(
        lambda p, t: jxent.linear_cross_entropy_ggn_vector_product(
            p[0],
            p[1],
            labels,
            t,
            bias=p[2],
            chunk_size=chunk_size,
            vocab_block_size=vocab_block_size,
            **opts,
        )
    )(primals, tangents)
    assert_tree_close(got, want, 1e-12)


def test_chunked_head_ggn_with_missing_tangents_and_no_bias(x64, key):
    (x, w, _), (x_dot, w_dot, _), labels, _ = _head(key, False)
    head = lambda p, _: p[0] @ p[1]
    want = jxent.ggn_vector_product(head)((x, w), None, labels, (jnp.zeros_like(x), w_dot))
    got = jxent.linear_cross_entropy_ggn_vector_product(x, w, labels, (None, w_dot, None))
    assert got[2] is None
    assert_tree_close(got[:2], want, 1e-12)
    want = jxent.ggn_vector_product(head)((x, w), None, labels, (x_dot, jnp.zeros_like(w)))
    got = jxent.linear_cross_entropy_ggn_vector_product(x, w, labels, [x_dot, None, None])
    assert_tree_close(got[:2], want, 1e-12)


def test_bf16_products_are_computed_in_float32(key):
    """bf16 in, float32 inside: equal to the float32 product of the same (rounded) inputs."""
    from _reference import BF16_RTOL

    primals, tangents, labels, _ = _head(key, False, jnp.float32, num_classes=40)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (primals, tangents))
    up = jax.tree.map(lambda a: a.astype(jnp.float32), bf16)
    opts = {"z_loss": 1e-2, "logit_softcap": 5.0}
    got = jxent.linear_cross_entropy_ggn_vector_product(
        bf16[0][0], bf16[0][1], labels, bf16[1], bias=bf16[0][2], vocab_block_size=16, **opts
    )
    assert [g.dtype for g in got] == [jnp.bfloat16] * 3
    want = _materialised_head_ggn(up[0], up[1], labels, opts)
    assert_tree_close(jax.tree.map(lambda a: a.astype(jnp.float32), got), want, BF16_RTOL)
    z, z_dot = up[0][0] @ up[0][1], up[1][0] @ up[0][1]
    got = jxent.logits_hvp(z.astype(jnp.bfloat16), labels, z_dot.astype(jnp.bfloat16), **opts)
    assert got.dtype == jnp.bfloat16
    want = jxent.logits_hvp(
        z.astype(jnp.bfloat16).astype(jnp.float32),
        labels,
        z_dot.astype(jnp.bfloat16).astype(jnp.float32),
        **opts,
    )
    assert_tree_close(got.astype(jnp.float32), want, BF16_RTOL)


def test_bad_head_tangents_are_named(key):
    (x, w, bias), (x_dot, w_dot, b_dot), labels, _ = _head(key, False, jnp.float32)
    f = jxent.linear_cross_entropy_ggn_vector_product
    with pytest.raises(TypeError, match=r"tangents must be a triple \(x_dot, w_dot, b_dot\)"):
        f(x, w, labels, (x_dot, w_dot))
    with pytest.raises(ValueError, match=r"w_dot must have shape \(4, 11\), found \(11, 4\)"):
        f(x, w, labels, (x_dot, w_dot.T, None))
    with pytest.raises(ValueError, match="b_dot must be None when there is no bias"):
        f(x, w, labels, (x_dot, w_dot, b_dot))
    with pytest.raises(TypeError, match="x_dot must have a floating dtype"):
        f(x, w, labels, (x_dot.astype(jnp.int32), None, None), bias=bias)


def test_integer_parameter_leaves_and_tangent_dtypes(key):
    """An integer leaf gets a float0 tangent and product (as jax.jvp does); a floating tangent of
    another dtype than its parameter is refused by name."""
    params = {"w": jax.random.normal(key, (2, 3)), "n": jnp.array(2)}
    apply = lambda p, x: jnp.tanh(x @ p["w"]) * p["n"]
    x, y = jax.random.normal(key, (4, 2)), jnp.array([0, 1, 2, 0])
    v = {"w": jnp.ones((2, 3)), "n": np.zeros((), jax.dtypes.float0)}
    float_only = lambda w, x: apply({"w": w, "n": 2}, x)
    for make in (jxent.ggn_vector_product, jxent.hessian_vector_product):
        got = make(apply)(params, x, y, v)
        assert got["n"].dtype == jax.dtypes.float0
        assert_tree_close(got["w"], make(float_only)(params["w"], x, y, v["w"]), 1e-6)
        bad = {"w": v["w"].astype(jnp.bfloat16), "n": v["n"]}
        with pytest.raises(TypeError, match=r"v\['w'\] must have the dtype of params\['w'\]"):
            make(apply)(params, x, y, bad)
