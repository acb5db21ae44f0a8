"""The gradient checker: it passes correct gradients and names what is wrong with wrong ones."""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jxent
from jxent import Kind
from jxent.predictors import embedding, linear, mlp

B, D, L = 8, 5, 4


def instance(name, dtype=jnp.float32, seed=3):
    k_p, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (B, D), dtype)
    y = jax.random.randint(k_y, (B,), 0, L)
    if name == "linear":
        return linear.apply, linear.init(k_p, D, L, dtype), x, y
    if name == "mlp":  # a square hidden layer, so a transposed leaf keeps its shape
        apply = functools.partial(mlp.apply, activation=jnp.tanh)
        return apply, mlp.init(k_p, [D, 6, 6, L], dtype), x, y
    return embedding.apply, embedding.init(k_p, D, L, 3, dtype), x, y


PREDICTORS = ["linear", "mlp", "embedding"]
# The float32 finite-difference pass only adds a note; diagnosis tests skip it to save time.
check = functools.partial(jxent.check_grads, float32_noise_check=False)


def wrong(apply, transform, **options):
    """A candidate: jxent's correct gradient with ``transform(path, leaf)`` applied per leaf."""
    correct = jxent.grad(apply, **options)

    def grad_fn(params, x, y):
        return jax.tree_util.tree_map_with_path(
            lambda path, g: transform(jax.tree_util.keystr(path), g), correct(params, x, y)
        )

    return grad_fn


@pytest.mark.parametrize(
    ("name", "dtype"),
    # float32 for every predictor, float64 for the linear one; the rest in the slow tier
    [(n, jnp.float32) for n in PREDICTORS]
    + [
        pytest.param(n, jnp.float64, marks=[] if n == "linear" else [pytest.mark.slow])
        for n in PREDICTORS
    ],
)
def test_correct_gradient_passes_at_default_tolerances(name, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        apply, params, x, y = instance(name, dtype)
        report = jxent.check_grads(jxent.grad(apply), apply, params, x, y)
    assert report.ok, str(report)
    assert report.diagnosis.kind is Kind.OK
    report.raise_if_failed()
    assert all(r.passed for r in report.leaves)


@pytest.mark.parametrize("initially", [False, True])
def test_check_restores_the_x64_setting(initially):
    with jax.enable_x64(initially):
        apply, params, x, y = instance("linear", jnp.float32)
        check(jxent.grad(apply), apply, params, x, y)
        assert jax.config.jax_enable_x64 is initially
        assert jnp.ones(1).dtype == (jnp.float64 if initially else jnp.float32)


@pytest.mark.parametrize("name", PREDICTORS)
def test_sign_flip_is_diagnosed(name):
    apply, params, x, y = instance(name)
    report = check(wrong(apply, lambda p, g: -g), apply, params, x, y)
    assert not report.ok
    assert report.diagnosis.kind is Kind.SIGN_FLIPPED
    assert report.diagnosis.scale == pytest.approx(-1.0, rel=1e-4)
    with pytest.raises(jxent.GradientCheckError, match="sign flipped"):
        report.raise_if_failed()


@pytest.mark.parametrize("name", PREDICTORS)
@pytest.mark.parametrize(
    ("factor", "words"), [(B, "summed instead of averaged"), (1 / B, "averaged twice"), (2.5, None)]
)
def test_scaling_is_diagnosed_with_the_batch_size(name, factor, words):
    apply, params, x, y = instance(name)
    report = check(wrong(apply, lambda p, g: factor * g), apply, params, x, y)
    assert report.diagnosis.kind is Kind.SCALED
    assert report.diagnosis.scale == pytest.approx(factor, rel=1e-4)
    if words:
        assert f"batch size {B}" in report.diagnosis.message
        assert words in report.diagnosis.message
    else:
        assert "batch size" not in report.diagnosis.message


@pytest.mark.parametrize("name", PREDICTORS)
def test_zero_gradient_is_diagnosed(name):
    apply, params, x, y = instance(name)
    report = check(wrong(apply, lambda p, g: jnp.zeros_like(g)), apply, params, x, y)
    assert report.diagnosis.kind is Kind.ZERO
    assert "over classes" in report.diagnosis.message


def test_summed_over_classes_linear_mistake_is_zero():
    from jxent._check._mistakes import summed_over_classes

    apply, params, x, y = instance("linear")
    report = check(summed_over_classes, apply, params, x, y)
    assert report.diagnosis.kind is Kind.ZERO


@pytest.mark.parametrize("name", PREDICTORS)
def test_transposed_leaf_is_diagnosed(name):
    apply, params, x, y = instance(name)
    target = {"linear": "['w']", "mlp": "[1][0]", "embedding": "['encoder']['w']"}[name]
    report = check(wrong(apply, lambda p, g: g.T if p == target else g), apply, params, x, y)
    bad = [r for r in report.leaves if not r.passed]
    assert [r.path for r in bad] == [target]
    assert bad[0].diagnosis.kind is Kind.TRANSPOSED
    # The mlp's [1][0] is square (same shape transposed); the others change shape.
    assert report.diagnosis.kind is Kind.SOME_LEAVES_WRONG


@pytest.mark.parametrize("name", PREDICTORS)
def test_only_some_leaves_wrong_names_them(name):
    apply, params, x, y = instance(name)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    target = paths[-1]
    report = check(wrong(apply, lambda p, g: -g if p == target else g), apply, params, x, y)
    assert report.diagnosis.kind is Kind.SOME_LEAVES_WRONG
    assert report.diagnosis.leaves == (target,)
    assert f"1 of {len(paths)} leaves wrong ({target})" in report.diagnosis.message
    assert "-1 x the gradient" in report.diagnosis.message


@pytest.mark.parametrize(
    "name", [n if n == "linear" else pytest.param(n, marks=pytest.mark.slow) for n in PREDICTORS]
)
def test_float32_noise_is_noted_for_a_correct_float32_gradient(name):
    apply, params, x, y = instance(name)
    report = jxent.check_grads(jxent.grad(apply), apply, params, x, y)
    assert report.ok
    (note,) = report.notes
    assert note.kind is Kind.FLOAT32_NOISE
    assert "float32 noise" in str(report)


def test_no_float32_noise_note_in_float64():
    with jax.enable_x64(True):
        apply, params, x, y = instance("mlp", jnp.float64)
        report = check(jxent.grad(apply), apply, params, x, y)
    assert report.notes == ()


@pytest.mark.parametrize("name", PREDICTORS)
def test_unexplained_error_reports_figures(name):
    apply, params, x, y = instance(name)

    def noise(p, g):
        return g + 0.3 * jnp.max(jnp.abs(g)) * jnp.sin(jnp.arange(g.size) * 1.7).reshape(g.shape)

    report = check(wrong(apply, noise), apply, params, x, y)
    assert report.diagnosis.kind is Kind.UNEXPLAINED
    assert all(r.max_rel_error > 0.1 for r in report.leaves)
    assert "relative" in report.diagnosis.message


def test_wrong_structure_is_reported():
    apply, params, x, y = instance("linear")
    report = check(lambda p, x, y: [p["w"]], apply, params, x, y)
    assert report.diagnosis.kind is Kind.STRUCTURE_MISMATCH
    assert not report.ok


def test_buggy_custom_vjp_in_the_predictor_shows_as_autodiff_vs_fd():
    """jxent.grad and jax.grad both trust the predictor's VJP; finite differences do not."""

    @jax.custom_vjp
    def double_grad_tanh(z):
        return jnp.tanh(z)

    double_grad_tanh.defvjp(
        lambda z: (jnp.tanh(z), z), lambda z, g: (2.0 * g * (1 - jnp.tanh(z) ** 2),)
    )

    def apply(params, x):
        return double_grad_tanh(x @ params["w"])

    _, params, x, y = instance("linear")
    report = check(jxent.grad(apply), apply, {"w": params["w"]}, x, y)
    assert report.diagnosis.kind is Kind.AUTODIFF_DISAGREES_WITH_FD
    assert report.leaves[0].max_rel_error < 1e-4


def test_sampled_entries_and_directions_for_large_leaves():
    apply, params, x, y = instance("mlp")
    report = check(
        jxent.grad(apply), apply, params, x, y, max_full_leaf=10, samples_per_leaf=3, seed=1
    )
    assert report.ok
    sizes = [leaf.size for leaf in jax.tree.leaves(params)]
    assert [r.fd_entries for r in report.leaves] == [s if s <= 10 else 3 for s in sizes]
    directional = check(jxent.grad(apply), apply, params, x, y, fd="directions")
    assert directional.ok
    bad = check(wrong(apply, lambda p, g: -g), apply, params, x, y, fd="directions")
    assert all(r.fd_rel_error > 1.0 for r in bad.leaves)


def test_report_renders_a_table():
    apply, params, x, y = instance("embedding")
    text = str(check(wrong(apply, lambda p, g: -g), apply, params, x, y))
    assert "['encoder']['w']" in text
    assert "sign flipped" in text
    assert text.splitlines()[-1].startswith("FAIL")


def test_cli_check_passes_and_demo_mistakes_are_caught(capsys):
    from jxent._cli import main  # in-process: a subprocess would only add JAX's start-up

    assert main(["check", "--demo-mistakes"]) == 0
    stdout = capsys.readouterr().out
    assert "Each report below is EXPECTED to say FAIL" in stdout  # exit 0 explained
    assert stdout.count("(a FAIL is expected)") == 3
    assert "every leaf is -1 x the gradient" in stdout
    assert "every leaf is zero" in stdout
    assert "batch size 8, summed instead of averaged" in stdout


def test_cli_check_user_predictor_exit_codes(tmp_path, monkeypatch, capsys):
    from jxent._cli import main  # in-process, with the module's folder on the path

    (tmp_path / "mymodel.py").write_text(
        "import jax, jax.numpy as jnp\n"
        "def init(key):\n    return {'w': jax.random.normal(key, (3, 4))}\n"
        "def apply(p, x):\n    return jnp.tanh(x @ p['w'])\n"
        "@jax.custom_vjp\ndef bad(z):\n    return z\n"
        "bad.defvjp(lambda z: (z, None), lambda _, g: (-g,))\n"
        "def bad_apply(p, x):\n    return bad(x @ p['w'])\n"
    )
    monkeypatch.chdir(tmp_path)  # found from the current directory alone, as the docs say
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    base = ["check", "--init", "mymodel:init", "--features", "3"]
    assert main([*base, "--predictor", "mymodel:apply"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main([*base, "--predictor", "mymodel:bad_apply"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # load failures: exit code 2 and one line on stderr naming what failed
    for spec, message in [
        ("mymodel:nope", "module 'mymodel' has no attribute 'nope'"),
        ("no_such_module:apply", "cannot import module 'no_such_module'"),
        ("mymodel", "expected module:function"),
    ]:
        assert main([*base, "--predictor", spec]) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1


def test_console_script_imports_the_users_module_from_the_current_directory(tmp_path):
    # The installed `jxent` script (not `python -m jxent`) has bin/ first on sys.path: the bug
    # was a ModuleNotFoundError traceback. Exit code 2 names the missing function, which proves
    # the module itself was imported, without running a check.
    (tmp_path / "cwdmodel.py").write_text("def init(key):\n    return {}\n")
    script = Path(sys.executable).parent / "jxent"
    out = subprocess.run(
        [str(script), "check", "--predictor", "cwdmodel:apply", "--init", "cwdmodel:init",
         "--features", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        out.stderr
        == "jxent check: module 'cwdmodel' has no attribute 'apply' (from 'cwdmodel:apply')\n"
    )


# --- bfloat16 candidates: their own tolerance, and their own noise note -----------------------


@pytest.mark.parametrize(
    ("name", "dtype", "rtol", "step"),
    [
        pytest.param(
            name,
            jnp.bfloat16,
            2.0**-4,
            "0.01",
            marks=[] if name == "linear" else [pytest.mark.slow],
        )
        for name in PREDICTORS
    ]
    + [("mlp", jnp.float16, 2.0**-7, "0.001")],
)
def test_correct_16_bit_gradient_passes_with_defaults_and_a_sign_flip_fails(
    name, dtype, rtol, step
):
    apply, params, x, y = instance(name, dtype)
    report = jxent.check_grads(jxent.grad(apply), apply, params, x, y)
    assert report.ok, str(report)
    assert report.rtol == rtol
    # the note speaks of the candidate's dtype, and of the step such a check would take
    assert [n.kind for n in report.notes] == [Kind.FLOAT32_NOISE]
    dtype_name = jnp.dtype(dtype).name
    assert f"{dtype_name} finite-difference check (step {step})" in report.notes[0].message
    bad = check(wrong(apply, lambda p, g: -g), apply, params, x, y)
    assert bad.diagnosis.kind is Kind.SIGN_FLIPPED
    half = check(wrong(apply, lambda p, g: 0.5 * g), apply, params, x, y)
    assert half.diagnosis.kind is Kind.SCALED


def test_a_mixed_candidate_takes_the_tolerance_of_its_least_precise_leaf():
    apply, params, x, y = instance("linear")

    def mixed(params, x, y):
        g = jxent.grad(apply)(params, x, y)
        return {"b": g["b"], "w": g["w"].astype(jnp.bfloat16)}

    assert check(mixed, apply, params, x, y).rtol == 2.0**-4


# --- scale factors that match several natural counts -----------------------------------------


def test_a_factor_matching_batch_size_and_class_count_names_both():
    k_p, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    params = linear.init(k_p, D, 4)
    x, y = jax.random.normal(k_x, (4, D)), jax.random.randint(k_y, (4,), 0, 4)  # B = L = 4
    report = check(wrong(linear.apply, lambda p, g: g / 4), linear.apply, params, x, y)
    message = report.diagnosis.message
    assert report.diagnosis.kind is Kind.SCALED
    assert "ambiguous" in message
    assert "batch size 4 (averaged twice)" in message
    assert "number of classes 4 (divided by the class count)" in message


def test_a_sum_over_the_counted_examples_is_named_as_such():
    apply, params, x, y = instance("linear")
    y = y.at[:2].set(-100)  # 6 of the 8 examples count
    candidate = wrong(apply, lambda p, g: 6 * g, ignore_index=-100)
    report = check(candidate, apply, params, x, y, ignore_index=-100)
    assert "counted examples 6, summed instead of averaged" in report.diagnosis.message
    assert "batch size" not in report.diagnosis.message


def test_a_bfloat16_sum_instead_of_mean_still_names_the_batch_size():
    apply, params, x, y = instance("mlp", jnp.bfloat16)
    summed = jxent.grad(apply, reduction="sum")  # B = 8 times the mean's gradient, in bf16
    report = check(summed, apply, params, x, y)
    assert report.diagnosis.kind is Kind.SCALED
    assert f"batch size {B}, summed instead of averaged" in report.diagnosis.message


def test_scale_words_follow_the_reduction_checked():
    apply, params, x, y = instance("linear")
    mean_of_sum = jxent.grad(apply)  # the mean's gradient offered for reduction="sum"
    report = check(mean_of_sum, apply, params, x, y, reduction="sum")
    assert f"batch size {B}, averaged instead of summed" in report.diagnosis.message
    with pytest.raises(ValueError, match="check_grads needs one loss: reduction 'mean' or 'sum'"):
        check(mean_of_sum, apply, params, x, y, reduction="none")


def test_cli_user_code_that_cannot_run_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from jxent._cli import main

    (tmp_path / "usermodel.py").write_text(
        "import jax, jax.numpy as jnp\n"
        "def init(key):\n    return {'w': jax.random.normal(key, (3, 4))}\n"
        "def broken_init(key):\n    raise ValueError('init exploded')\n"
        "def silent_init(key):\n    raise RuntimeError()\n"
        "def chatty_init(key):\n    raise RuntimeError('line one\\nline two')\n"
        "def apply(p, x):\n    return x @ p['w']\n"
        "def with_aux(p, x):\n    return x @ p['w'], None\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for argv, message in [
        (["--features", "5"], "cannot run usermodel:apply on x of shape (8, 5)"),
        (["--features", "3", "--init", "usermodel:broken_init"], "ValueError: init exploded"),
        (["--features", "3", "--predictor", "usermodel:with_aux"], "pass has_aux=True"),
        (["--features", "3", "--init", "usermodel:silent_init"], ": RuntimeError\n"),
        (["--features", "3", "--init", "usermodel:chatty_init"], "RuntimeError: line one\n"),
    ]:
        base = ["check", "--predictor", "usermodel:apply", "--init", "usermodel:init"]
        assert main(base + argv) == 2  # a repeated flag: argparse takes the last
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:  # argparse: bad usage is exit code 2 too
        main(["check", "--predictor", "usermodel:apply", "--init", "usermodel:init",
              "--features", "3", "--batch", "0"])  # fmt: skip
    assert exit_info.value.code == 2
