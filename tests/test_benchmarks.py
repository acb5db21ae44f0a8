"""The benchmark program runs and writes its JSON, table and plot: it cannot rot.

Both in the slow tier (the default tier's 5 minutes are for the library's own proofs): the whole
``--quick`` program (a dozen JAX processes, ~30 s), and one tiny workload timed in-process.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from benchmarks import lm_head, run

from jxent.predictors import linear

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_workload_in_process_times_every_variant_and_the_peak():
    peak_run, peak_flops = run.matmul_peak_run(64)
    params = linear.init(jax.random.key(0), 8, 5)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 5)
    workload = run.predictor_workload("linear", linear.apply, params, x, y, 1.0, 3, peak_run)
    variants = workload["variants"]
    assert {"jxent.value_and_grad", "jax.value_and_grad", "torch eager F.cross_entropy"} <= set(
        variants
    )
    for r in variants.values():
        assert r["runs"] == 3
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    peak = run.peak_summary([workload["peak_round"]], peak_flops)
    assert peak["rounds"] == 3
    assert peak["min_of_medians"] <= peak["median_of_medians"] <= peak["gflops"]


def _status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.slow
def test_quick_mode_writes_outside_the_source_tree():
    before = _status()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--name", "q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert _status() == before  # git status unchanged: the outputs are in the ignored build/
    folder = ROOT / "build" / "benchmarks"
    res = json.loads((folder / "q.json").read_text())
    assert res["mode"] == "quick"
    assert res["wall_s"] > 0
    assert res["matmul_peak_gflops"] > 0
    assert res["machine"]["cores"] >= 1
    for workload in res["workloads"]:
        assert {"jxent.value_and_grad", "jax.value_and_grad"} <= set(workload["variants"])
        for r in workload["variants"].values():
            assert r["runs"] >= 3
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
    vocab = [r for r in res["vocab"] if "error" not in r]
    assert any(r["variant"].startswith("jxent.linear_cross_entropy") for r in vocab)
    assert any(r["variant"].startswith("jxent.vocab_parallel") for r in vocab)
    assert all(r["above_inputs_mib"] >= 0 for r in vocab)
    assert set(res["sharded"]["head"]["ratios"]) >= {"fused sharded (explicit) / one device"}
    assert res["sharded"]["microbatch"]["scratch_ratio"]["1"] == 1.0
    assert set(res["lm_head"]["ratios"]) == set(lm_head.TARGETS)
    assert len(res["lm_head"]["bf16"]) == 3
    assert "LM-head outputs" in (folder / "q.md").read_text()
    assert "| workload |" in (folder / "q.md").read_text()
    assert "Sharded like the batch" in (folder / "q.md").read_text()
    assert (folder / "q.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_distillation_experiment_runs_and_writes_nothing():
    before = _status()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.distill_demo", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "student" in out.stdout
    assert _status() == before
