"""The benchmark program runs (--quick) and writes its JSON, table and plot: it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_quick_mode(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path), "--name", "q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["matmul_peak_gflops"] > 0
    assert res["machine"]["cores"] >= 1
    for workload in res["workloads"]:
        assert {"jxent.value_and_grad", "jax.value_and_grad"} <= set(workload["variants"])
        for r in workload["variants"].values():
            assert r["runs"] >= 3
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
    vocab = [r for r in res["vocab"] if "error" not in r]
    assert any(r["variant"].startswith("jxent.linear_cross_entropy") for r in vocab)
    assert all(r["above_inputs_mib"] >= 0 for r in vocab)
    assert "| workload |" in (tmp_path / "q.md").read_text()
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
