"""``jxent demo lm`` at a tiny configuration: the fused head's gradients, determinism, outputs."""

import argparse
import json
import shutil
import sysconfig
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from _reference import assert_tree_close
from jxent import train
from jxent._cli import _demo_lm, main
from jxent._cli._base import CommandError

TINY = [
    "--vocab",
    "320",
    "--width",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--context",
    "16",
    "--batch",
    "4",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
]


@pytest.fixture
def corpus(tmp_path):
    """Twelve standard-library modules copied into a folder: a small real corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in (
        "abc",
        "bisect",
        "colorsys",
        "copy",
        "fnmatch",
        "glob",
        "heapq",
        "keyword",
        "numbers",
        "shlex",
        "string",
        "textwrap",
    ):
        shutil.copy(root / f"{name}.py", folder / f"{name}.py")
    return folder


def _args(*extra):
    parser = argparse.ArgumentParser()
    _demo_lm.add_arguments(parser)
    return parser.parse_args([*TINY, *extra])


def test_split_and_tokenizer_are_deterministic(corpus, tmp_path):
    root, files = _demo_lm.corpus_files(str(corpus))
    train, val = _demo_lm.split(root, files)
    assert sorted(train) == sorted(_demo_lm.split(root, list(reversed(files)))[0])
    assert set(train).isdisjoint(val)
    assert len(train) + len(val) == len(files)
    texts = _demo_lm.read_texts(train)
    first, cached = _demo_lm.train_tokenizer(texts, 320, tmp_path / "a")
    again, _ = _demo_lm.train_tokenizer(texts, 320, tmp_path / "b")  # trained afresh elsewhere
    assert not cached
    assert first.get_vocab() == again.get_vocab()
    assert _demo_lm.train_tokenizer(texts, 320, tmp_path / "a")[1]  # the second time: cached
    stream = _demo_lm.encode(first, texts[:2])
    assert np.array_equal(stream, _demo_lm.encode(again, texts[:2]))
    assert stream[-1] == _demo_lm.EOS


def test_fused_head_step_equals_the_materialised_logits_step():
    """The first step's gradients, every parameter: fused head vs materialised logits.

    Both are ``jxent.train.make_step`` steps, the fused one with the output head, the other on
    the logits; SGD(1) updates are minus the gradients.
    """
    args = _args()
    params = _demo_lm.init_model(jax.random.key(0), 320, 32, 1, 16)
    params["bias"] = jax.random.normal(jax.random.key(1), (320,))
    batch = jax.random.randint(jax.random.key(2), (4, 17), 0, 320).at[0, 5].set(_demo_lm.PAD)
    opt = optax.sgd(1.0)
    grads, metrics = {}, {}
    for head in ("fused", "materialised"):
        step = _demo_lm.lm_step(opt, args.heads, head)
        state, metrics[head] = step(train.init_state(params, opt), batch[:, :-1], batch[:, 1:])
        grads[head] = jax.tree.map(lambda p, q: p - q, params, state.params)
    # float32, the same math in another order (FLOAT32_RTOL's note in _reference)
    assert_tree_close(grads["fused"], grads["materialised"], 1e-5)
    for name in ("loss", "accuracy", "count", "grad_norm"):
        np.testing.assert_allclose(metrics["fused"][name], metrics["materialised"][name], rtol=1e-5)
    assert int(metrics["fused"]["count"]) == 4 * 16 - 1  # one <pad> target


def test_tiny_run_learns_and_writes_json_and_png(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "demo",
        "lm",
        "--corpus",
        str(corpus),
        *TINY,
        "--steps",
        "9",
        "--lr",
        "1e-2",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--no-memory",
        "--no-progress",
    ]
    assert main(argv) == 0
    record = json.loads((out / "history.json").read_text())
    assert (out / "training.png").stat().st_size > 5_000
    history = record["history"]
    assert [h["step"] for h in history] == [1, 3, 6, 9]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert record["unigram_entropy"] > 0
    text = capsys.readouterr().out
    assert "unigram entropy of the validation tokens" in text
    assert "tokens/s" in text


@pytest.mark.slow
def test_step_memory_is_measured_per_process_for_both_heads():
    # Batch 256 of 16 tokens over 4096 classes: 16M logits. The fused head's scratch is its
    # [chunk, L] tiles (one pass per chunk of 512 tokens: 2M logits, with the step's statistics),
    # whatever the batch; the materialised head's grows with it. At batch 64 (4M logits) the two
    # are of one size, the fused one larger (59 vs 35 MiB of XLA temporaries, measured).
    rows = _demo_lm.memory_rows(_args("--vocab", "4096", "--steps", "1"), [4, 256])
    assert {(r["head"], r["batch"]) for r in rows} == {
        (h, b) for h in ("fused", "materialised") for b in (4, 256)
    }
    for r in rows:
        assert "error" not in r, r
        assert r["xla_temp_mib"] > 0
    by = {(r["head"], r["batch"]): r for r in rows}
    assert by[("fused", 256)]["xla_temp_mib"] < by[("materialised", 256)]["xla_temp_mib"]


def test_a_missing_corpus_is_named(tmp_path):
    with pytest.raises(CommandError, match="is not a folder"):
        _demo_lm.corpus_files(str(tmp_path / "nothere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match=r"found 0 text file\(s\)"):
        _demo_lm.corpus_files(str(tmp_path / "empty"))


def test_bad_corpora_and_flags_get_clear_messages(corpus, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.py").write_text("print('hello')\n")
    (one / ".git").mkdir()
    (one / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: not corpus text
    with pytest.raises(CommandError, match=r"found 1 text file\(s\).*at least 2"):
        _demo_lm.corpus_files(str(one))
    with pytest.raises(SystemExit) as err:
        main(["demo", "lm", "--vocab", "10"])
    assert err.value.code == 2
    assert "must be at least 258, found 10" in capsys.readouterr().err
    short = tmp_path / "short"
    short.mkdir()
    for i in range(12):
        (short / f"f{i}.txt").write_text("hello world\n")
    argv = [
        "demo",
        "lm",
        "--corpus",
        str(short),
        *TINY,
        "--context",
        "64",
        "--no-memory",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jxent demo lm: the training split holds")
    assert "fewer than one window of --context 64" in err


def test_a_one_step_run_reports_its_speed(corpus, tmp_path, capsys):
    argv = [
        "demo",
        "lm",
        "--corpus",
        str(corpus),
        *TINY,
        "--steps",
        "1",
        "--no-memory",
        "--no-plot",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.slow
def test_data_parallel_run_on_8_devices_has_the_one_device_losses(corpus, tmp_path):
    """``--devices 8`` on 8 forced CPU devices (a subprocess) against ``--devices 1``."""
    import os
    import subprocess
    import sys

    def run(devices):
        out = tmp_path / f"out{devices}"
        argv = [
            "demo",
            "lm",
            "--corpus",
            str(corpus),
            *TINY,
            "--batch",
            "8",
            "--steps",
            "3",
            "--eval-every",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--no-memory",
            "--no-progress",
            "--no-plot",
            "--devices",
            str(devices),
        ]
        env = dict(
            os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
        )
        code = "import sys; from jxent._cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "history.json").read_text()), done.stdout

    (eight, text), (one, _) = run(8), run(1)
    assert "data parallel: batches sharded over 8 cpu devices" in text
    assert "per device on 8 cpu devices" in text
    assert eight["tokens_per_second_per_device"] > 0
    for a, b in zip(eight["history"], one["history"]):
        # float32, the batch's sums taken in another order across devices
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-5)


def test_devices_flag_errors_are_one_line(corpus, tmp_path, capsys):
    base = [
        "demo",
        "lm",
        "--corpus",
        str(corpus),
        *TINY,
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
        "--no-memory",
        "--no-progress",
        "--steps",
        "1",
    ]
    assert main([*base, "--devices", "2"]) == 2
    assert "--devices 2 but 1 cpu device is visible" in capsys.readouterr().err
    assert main([*base, "--heads", "3"]) == 2  # width 32
    assert "--width 32 does not split into --heads 3" in capsys.readouterr().err
