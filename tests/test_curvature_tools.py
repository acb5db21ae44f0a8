"""Curvature tools: label sampling, diagonal estimators, Lanczos spectra, ``jxent curvature``.

Statistical tests run at fixed seeds (deterministic) with thresholds from the draws' own
standard errors or a chi-square test; exact quantities are compared in float64 with the dense
matrices assembled from the (separately proven) curvature products.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

import jxent
from _reference import assert_tree_close
from jxent.predictors import embedding, linear, mlp

# A p-value below this fails a goodness-of-fit test. The seeds are fixed, so a test either
# always passes or always fails; a correct sampler fails one seed in 10^4.
P_MIN = 1e-4


def _chi_square_p(labels, probs):
    counts = np.bincount(np.asarray(labels), minlength=probs.size)
    probs = np.asarray(probs, np.float64)
    expected = probs / probs.sum() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, f"drew a class of probability 0: {counts}"
    return stats.chisquare(counts[keep], expected[keep]).pvalue


def test_sample_labels_follow_the_capped_masked_softmax():
    logits = jnp.array([2.0, -1.0, 0.5, 3.0, 0.0, 1.0])
    where = jnp.array([True, True, False, True, True, True])  # class 2 is never drawn
    n = 200_000
    labels = jxent.sample_labels(
        jax.random.key(0),
        jnp.tile(logits, (n, 1)),
        where=jnp.tile(where, (n, 1)),
        logit_softcap=2.0,
    )
    assert labels.shape == (n,)
    assert labels.dtype == jnp.int32
    s = 2.0 * np.tanh(np.asarray(logits) / 2.0)
    probs = np.where(np.asarray(where), np.exp(s), 0.0)
    assert _chi_square_p(labels, probs / probs.sum()) > P_MIN
    # ...and not the uncapped softmax: the test can fail
    plain = np.where(np.asarray(where), np.exp(np.asarray(logits)), 0.0)
    assert _chi_square_p(labels, plain / plain.sum()) < 1e-12


def test_sample_labels_with_class_axis_1_and_minus_inf_logits():
    """Logits [n, 3 classes, 2 positions]: -inf classes are never drawn."""
    base = np.array([[0.0, 1.0, -np.inf], [-np.inf, 0.0, 2.0]])  # per position
    logits = jnp.tile(jnp.asarray(base.T)[None], (50_000, 1, 1))
    labels = jxent.sample_labels(jax.random.key(1), logits, axis=1)
    assert labels.shape == (50_000, 2)
    for pos in range(2):
        p = np.exp(base[pos])
        assert _chi_square_p(labels[:, pos], p / p.sum()) > P_MIN


@pytest.mark.parametrize(("chunk_size", "vocab_block_size"), [(None, None), (7, 3)])
def test_linear_sample_labels_follow_the_softmax_without_logits(chunk_size, vocab_block_size):
    """Ragged chunks (7 into 3 x 40,000) and blocks (3 into 8): the same law as sample_labels."""
    k = jax.random.split(jax.random.key(2), 3)
    rows, d, num_classes, n = 3, 4, 8, 40_000
    base = jax.random.normal(k[0], (rows, d))
    w, b = jax.random.normal(k[1], (d, num_classes)), jax.random.normal(k[2], (num_classes,))
    x = jnp.repeat(base, n, axis=0)
    labels = jxent.linear_sample_labels(
        jax.random.key(3),
        x,
        w,
        bias=b,
        chunk_size=chunk_size,
        vocab_block_size=vocab_block_size,
        logit_softcap=1.5,
    ).reshape(rows, n)
    materialised = jxent.sample_labels(
        jax.random.key(4), x @ w + b[None, :], logit_softcap=1.5
    ).reshape(rows, n)
    s = 1.5 * np.tanh(np.asarray(base @ w + b[None, :], np.float64) / 1.5)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for r in range(rows):
        assert _chi_square_p(labels[r], p[r]) > P_MIN / rows
        table = np.stack(
            [np.bincount(np.asarray(a[r]), minlength=num_classes) for a in (labels, materialised)]
        )
        assert stats.chi2_contingency(table).pvalue > P_MIN / rows


def test_sampling_errors_are_named():
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        jxent.sample_labels(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="logit_softcap must be positive"):
        jxent.sample_labels(jax.random.key(0), jnp.zeros((2, 3)), logit_softcap=-1.0)
    with pytest.raises(ValueError, match="x is \\[N, D\\]"):
        jxent.linear_sample_labels(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, found 0"):
        jxent.linear_sample_labels(
            jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((3, 5)), chunk_size=0
        )


# --- diagonals --------------------------------------------------------------------------------

B, D, L = 6, 3, 5


def _model(name, seed=7):
    k = jax.random.split(jax.random.key(seed), 3)
    init = {
        "linear": lambda: linear.init(k[0], D, L, jnp.float64),
        "mlp": lambda: mlp.init(k[0], [D, 4, L], jnp.float64),
        "embedding": lambda: embedding.init(k[0], D, L, 4, jnp.float64),
    }[name]
    apply = {"linear": linear.apply, "mlp": mlp.apply, "embedding": embedding.apply}[name]
    x = jax.random.normal(k[1], (B, D), jnp.float64)
    y = jax.random.randint(k[2], (B,), 0, L)
    return apply, init(), x, y


def _dense(product, params, x, y):
    flat, unravel = ravel_pytree(params)
    column = lambda e: ravel_pytree(product(params, x, y, unravel(e)))[0]
    m = np.asarray(jax.jit(jax.vmap(column))(jnp.eye(flat.size)))
    return (m + m.T) / 2


ALL_OPTIONS = {
    "weights": jnp.linspace(0.5, 2.0, L),
    "label_smoothing": 0.1,
    "z_loss": 0.2,
    "logit_softcap": 2.0,
    "where": jnp.array([True, True, False, True, True, True]),
}


@pytest.mark.parametrize("opts", [{}, ALL_OPTIONS], ids=["plain", "all-options"])
@pytest.mark.parametrize(
    "name", ["linear", pytest.param("mlp", marks=pytest.mark.slow), "embedding"]
)
def test_exact_ggn_diagonal_is_the_dense_ggns_diagonal(x64, name, opts):
    apply, params, x, y = _model(name)
    dense = _dense(jxent.ggn_vector_product(apply, **opts), params, x, y)
    got = jxent.ggn_diagonal(apply, **opts)(params, x, y)
    assert_tree_close(ravel_pytree(got)[0], jnp.asarray(np.diag(dense)), 1e-12)


def test_exact_ggn_diagonal_with_several_rows_per_example_and_a_middle_class_axis(x64):
    """Logits [B, L, T] (classes on axis 1, T positions per example): one VJP per row."""
    k = jax.random.split(jax.random.key(8), 3)
    params = {"w": jax.random.normal(k[0], (D, L), jnp.float64)}

    def apply(p, x):  # x [B, T, D] -> logits [B, L, T]
        return jnp.swapaxes(jnp.tanh(x) @ p["w"], 1, 2)

    x = jax.random.normal(k[1], (B, 2, D), jnp.float64)
    y = jax.random.randint(k[2], (B, 2), 0, L)
    opts = {"axis": 1, "z_loss": 0.1}
    dense = _dense(jxent.ggn_vector_product(apply, **opts), params, x, y)
    got = jxent.ggn_diagonal(apply, **opts)(params, x, y)
    assert_tree_close(ravel_pytree(got)[0], jnp.asarray(np.diag(dense)), 1e-12)


@pytest.mark.parametrize(
    "opts",
    [
        {},
        pytest.param(
            {"logit_softcap": 2.0, "where": jnp.array([True, False, True, True, True, True])},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["plain", "cap+where"],
)
def test_gnb_is_unbiased_for_the_ggn_diagonal_of_the_mean_loss(x64, opts):
    """The mean of 20,000 GNB draws lies within 4.5 standard errors of the exact diagonal, in
    every entry (for 36 entries a correct estimator exceeds that with probability 2e-4)."""
    apply, params, _, _ = _model("embedding")
    x = jax.random.normal(jax.random.key(9), (B, D), jnp.float64)
    gnb = jxent.gnb_diagonal(apply, **opts)
    draws = jax.jit(jax.vmap(lambda k: ravel_pytree(gnb(params, x, k))[0]))(
        jax.random.split(jax.random.key(10), 20_000)
    )
    draws = np.asarray(draws)
    # GGN of the mean plain loss: the labels do not enter it
    exact = ravel_pytree(jxent.ggn_diagonal(apply, **opts)(params, x, jnp.zeros(B, int)))[0]
    z = (draws.mean(0) - np.asarray(exact)) / (draws.std(0, ddof=1) / np.sqrt(len(draws)))
    assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))
    # ...and it is not the diagonal of the GGN of the sum (a factor B off): the test can fail
    assert np.max(np.abs(draws.mean(0) * B - exact) / exact.max()) > 0.5


@pytest.mark.slow  # the README command's time budget
def test_hutchinson_diagonal_and_trace_within_three_standard_errors(x64):
    apply, params, x, y = _model("mlp")
    opts = {"z_loss": 0.1, "label_smoothing": 0.1}
    dense = {
        "hessian": _dense(jxent.hessian_vector_product(apply, **opts), params, x, y),
        "ggn": _dense(jxent.ggn_vector_product(apply, **opts), params, x, y),
    }
    for curvature, matrix in dense.items():
        f = jxent.hutchinson_diagonal(apply, curvature=curvature, **opts)
        keys = jax.random.split(jax.random.key(11), 4000)
        one = lambda k, f=f: ravel_pytree(f(params, x, y, k))[0]
        samples = np.asarray(jax.jit(jax.vmap(one))(keys))
        traces = samples.sum(1)
        se = traces.std(ddof=1) / np.sqrt(len(traces))
        assert abs(traces.mean() - np.trace(matrix)) < 3 * se, (traces.mean(), np.trace(matrix))
        z = (samples.mean(0) - np.diag(matrix)) / (
            samples.std(0, ddof=1) / np.sqrt(len(keys)) + 1e-300
        )
        assert np.max(np.abs(z[np.diag(matrix) != 0])) < 5.0


def test_diagonal_estimators_refuse_what_they_cannot_estimate(x64, key):
    apply, params, x, y = _model("linear")
    with pytest.raises(TypeError, match="gnb_diagonal\\(\\) does not take 'weights'"):
        jxent.gnb_diagonal(apply, weights=jnp.ones(L))
    with pytest.raises(TypeError, match="does not take 'z_loss'"):
        jxent.gnb_diagonal(apply)(params, x, key, z_loss=0.1)
    with pytest.raises(ValueError, match="num_samples must be a positive int, found 0"):
        jxent.hutchinson_diagonal(apply)(params, x, y, key, num_samples=0)
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn'"):
        jxent.hutchinson_diagonal(apply, curvature="fisher")


# --- spectra ----------------------------------------------------------------------------------


def test_lanczos_on_pytrees_with_repeated_eigenvalues_restarts_and_stays_orthonormal(x64):
    """A 6x6 matrix with eigenvalues {3, 3, 3, 1, -2, 0}: the Krylov space of any start vector
    has dimension 4, so the iteration must restart once to find all six."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    a = q @ np.diag([3.0, 3.0, 3.0, 1.0, -2.0, 0.0]) @ q.T
    matvec = lambda v: {
        "u": jnp.asarray(a[:4]) @ jnp.concatenate([v["u"], v["v"]]),
        "v": jnp.asarray(a[4:]) @ jnp.concatenate([v["u"], v["v"]]),
    }
    res = jxent.lanczos(matvec, {"u": jnp.ones(4), "v": jnp.ones(2)}, 6)
    t = np.diag(res.alphas) + np.diag(res.betas, 1) + np.diag(res.betas, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(t), [-2, 0, 1, 3, 3, 3], atol=1e-12)
    basis = np.concatenate([np.asarray(res.vectors["u"]), np.asarray(res.vectors["v"])], axis=1)
    np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-12)
    assert np.min(np.abs(np.asarray(res.betas))) == 0.0  # the restart
    with pytest.raises(ValueError, match="num_iters must be an int in \\[1, 6\\]"):
        jxent.lanczos(matvec, {"u": jnp.ones(4), "v": jnp.ones(2)}, 7)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_top_eigenvalues_match_eigvalsh_of_the_dense_matrix(x64, curvature):
    apply, params, x, y = _model("embedding")
    opts = {"z_loss": 0.2, "logit_softcap": 2.0}
    make = {"hessian": jxent.hessian_vector_product, "ggn": jxent.ggn_vector_product}[curvature]
    want = np.linalg.eigvalsh(_dense(make(apply, **opts), params, x, y))[::-1][:5]
    got = np.asarray(jxent.top_eigenvalues(apply, params, x, y, k=5, curvature=curvature, **opts))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.slow  # the README command's time budget
def test_spectral_density_integrates_to_one_and_its_trace_is_right(x64):
    apply, params, x, y = _model("embedding")
    size = ravel_pytree(params)[0].size
    dense = _dense(jxent.hessian_vector_product(apply), params, x, y)
    grid, density = jxent.spectral_density(apply, params, x, y, num_iters=20, num_probes=3)
    assert grid.shape == density.shape == (1000,)
    assert abs(float(jnp.trapezoid(density, grid)) - 1.0) < 1e-6
    product = jxent.hessian_vector_product(apply)
    nodes, weights = jxent._curvature._spectrum.slq_nodes(
        lambda v: product(params, x, y, v),
        params,
        num_iters=size,
        num_probes=100,
        key=jax.random.key(12),
    )
    traces = size * np.sum(np.asarray(nodes) * np.asarray(weights), axis=1)  # P v^T H v / |v|^2
    se = traces.std(ddof=1) / np.sqrt(len(traces))
    assert abs(traces.mean() - np.trace(dense)) < 3 * se
    # with as many steps as parameters the nodes are the eigenvalues
    np.testing.assert_allclose(np.sort(np.asarray(nodes[0])), np.linalg.eigvalsh(dense), atol=1e-10)


def test_spectrum_errors_are_named(x64):
    apply, params, x, y = _model("linear", 0)
    with pytest.raises(ValueError, match="k must be an int in \\[1, num_iters=3\\]"):
        jxent.top_eigenvalues(apply, params, x, y, k=4, num_iters=3)
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn'"):
        jxent.top_eigenvalues(apply, params, x, y, curvature="fisher")
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        jxent.spectral_density(apply, params, x, y, num_probes=0)
    with pytest.raises(TypeError, match="top_eigenvalues\\(\\) got an unknown loss option"):
        jxent.top_eigenvalues(apply, params, x, y, label_smothing=0.1)


# --- jxent curvature --------------------------------------------------------------------------


@pytest.mark.slow  # the README command's time budget
def test_curvature_command_writes_json_and_png(tmp_path, capsys):
    from jxent._cli import main

    out = tmp_path / "curv"
    code = main(
        [
            "curvature",
            "--epochs",
            "1",
            "--batch",
            "64",
            "--hidden",
            "8",
            "--iters",
            "12",
            "--samples",
            "4",
            "--probes",
            "2",
            "--k",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "curvature.json").read_text())
    assert (out / "spectrum.png").stat().st_size > 10_000
    for stage in ("init", "trained"):
        for curvature in ("hessian", "ggn"):
            r = res[stage][curvature]
            assert len(r["top_eigenvalues"]) == 3
            assert r["top_eigenvalues"] == sorted(r["top_eigenvalues"], reverse=True)
            assert r["trace_standard_error"] > 0
        assert min(res[stage]["ggn"]["top_eigenvalues"]) >= 0
    assert "sharpness (largest Hessian eigenvalue)" in capsys.readouterr().out


@pytest.mark.slow
def test_curvature_command_loads_user_code_like_check(tmp_path, monkeypatch, capsys):
    from jxent._cli import main

    (tmp_path / "mymodel.py").write_text(
        "import jax\n"
        "def init(key):\n    return {'w': jax.random.normal(key, (3, 4))}\n"
        "def apply(p, x):\n    return x @ p['w']\n"
    )
    monkeypatch.chdir(tmp_path)
    args = [
        "curvature",
        "--predictor",
        "mymodel:apply",
        "--init",
        "mymodel:init",
        "--features",
        "3",
        "--epochs",
        "1",
        "--batch",
        "64",
        "--iters",
        "6",
        "--samples",
        "3",
        "--probes",
        "1",
        "--k",
        "2",
        "--no-plot",
    ]
    assert main(args) == 0
    bad = ["curvature", "--predictor", "mymodel:apply", "--init", "mymodel:nothere"]
    assert main([*bad, "--features", "3"]) == 2
    assert "has no attribute 'nothere'" in capsys.readouterr().err


def test_samplers_under_x64_and_with_nan_logits(x64):
    """int32 labels with float64 enabled; a row with a NaN score has no distribution: -1."""
    x, w = jnp.ones((3, 4)), jnp.zeros((4, 5))
    bias = jnp.zeros(5).at[2].set(jnp.nan)
    labels = jxent.linear_sample_labels(jax.random.key(0), x, w, bias=bias, vocab_block_size=2)
    assert labels.dtype == jnp.int32
    assert labels.tolist() == [-1, -1, -1]
    labels = jxent.linear_sample_labels(jax.random.key(0), x, w, vocab_block_size=2)
    assert all(0 <= v < 5 for v in labels.tolist())
    logits = jnp.array([[0.0, jnp.nan], [0.0, 1.0]])
    assert jxent.sample_labels(jax.random.key(0), logits).tolist()[0] == -1
    masked = jxent.sample_labels(jax.random.key(0), logits, where=jnp.array([[True, False]] * 2))
    assert masked.tolist() == [0, 0]  # a NaN in a masked class does not matter


def test_curvature_command_refuses_bad_user_models_and_flags_in_one_line(
    tmp_path, monkeypatch, capsys
):
    from jxent._cli import main

    (tmp_path / "shapes.py").write_text(
        "import jax\n"
        "def init(key):\n    return {'w': jax.random.normal(key, (3, 4))}\n"
        "def apply(p, x):\n    return (x @ p['w'])[:, :, None]\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ["curvature", "--predictor", "shapes:apply", "--init", "shapes:init", "--features", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "to logits of shape (512, classes), found (512, 4, 1)" in err
    assert main(["curvature", "--k", "6", "--iters", "5"]) == 2
    assert "--k 6 needs at least as many Lanczos steps: --iters 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["curvature", "--samples", "1"])
    assert "a standard error needs >= 2 samples" in capsys.readouterr().err
