"""The ``jxent`` command's shared rules: size flags, missing extras, user models at any batch.

Every command that cannot run prints one line naming what to do and exits 2; every size flag
rejects 0 the same way. The base-install case (a fresh venv without extras, a subprocess) is in
the slow tier.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jxent._cli import main

ROOT = Path(__file__).resolve().parents[1]
SIZE_FLAGS = [
    ["demo", "--epochs"],
    ["demo", "--hidden"],
    ["demo", "lm", "--steps"],
    ["demo", "lm", "--batch"],
    ["demo", "lm", "--devices"],
    ["check", "--batch"],
    ["check", "--features"],
    ["curvature", "--epochs"],
    ["curvature", "--batch"],
    ["curvature", "--k"],
]


@pytest.mark.parametrize("flag", SIZE_FLAGS, ids=[" ".join(f) for f in SIZE_FLAGS])
def test_every_size_flag_rejects_zero_the_same_way(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*flag, "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, found 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["demo", "--no-plot"], "sklearn"),
        (["demo", "lm", "--no-progress"], "tokenizers"),
        (["demo", "lm"], "tqdm"),
        (["curvature"], "tqdm"),
        (["curvature", "--no-plot"], "sklearn"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, argv, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert 'pip install "jxent[demo]"' in err
    assert err.startswith(f"jxent {' '.join(a for a in argv if not a.startswith('-'))}: needs ")


@pytest.mark.slow
def test_curvature_runs_a_user_predictor_at_a_small_batch(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(
        textwrap.dedent("""
        import jax

        def init(key):
            return jax.random.normal(key, (16, 3)) * 0.1

        def apply(w, x):
            return x @ w
    """)
    )
    monkeypatch.chdir(tmp_path)
    argv = [
        "curvature",
        "--predictor",
        "tiny:apply",
        "--init",
        "tiny:init",
        "--features",
        "16",
        "--batch",
        "32",
        "--epochs",
        "1",
        "--iters",
        "6",
        "--k",
        "2",
        "--samples",
        "2",
        "--probes",
        "1",
        "--no-plot",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert (tmp_path / "out" / "curvature.json").exists()


@pytest.mark.slow
def test_every_command_on_a_base_install_exits_with_one_line(tmp_path):
    """A fresh venv with ``pip install .`` only (jax, jaxlib, optax): no tracebacks."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(ROOT)], check=True, timeout=900)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    for argv in (["demo"], ["demo", "lm"], ["curvature"]):
        out = subprocess.run(
            [str(venv / "bin" / "jxent"), *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode == 2, (argv, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (argv, out.stderr[-2000:])
        assert 'pip install "jxent[demo]"' in lines[0]
    out = subprocess.run(
        [str(venv / "bin" / "jxent"), "check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]  # the checker needs no extra


def test_user_code_outputs_and_rates_that_cannot_work_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "intmodel.py").write_text(
        textwrap.dedent("""
        import jax.numpy as jnp

        def init(key):
            return {"w": jnp.ones((4, 3), jnp.int32)}

        def apply(p, x):
            return x @ p["w"]
    """)
    )
    monkeypatch.chdir(tmp_path)
    user = ["--predictor", "intmodel:apply", "--init", "intmodel:init", "--features", "4"]
    for argv, message in [
        (["check", *user], "parameters must be floating arrays, found int32 at ['w']"),
        (["check", "--demo-mistakes", *user], "--demo-mistakes shows built-in mistakes"),
        (["demo", "--out", "/proc/jxent-out"], "cannot write to --out /proc/jxent-out"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert message in err, err
    for flag in (["demo", "--lr", "0"], ["demo", "--lr", "nan"], ["curvature", "--lr", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(flag)
        assert exit_info.value.code == 2
        assert "expected a positive finite number" in capsys.readouterr().err
