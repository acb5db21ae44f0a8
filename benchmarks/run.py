"""jxent benchmarks: one run, interleaved variants, ratios against baselines measured alongside.

    python -m benchmarks [--quick | --full] [--name NAME] [--out DIR] [--docs]

Modes: the default covers every workload, variant and dtype (7 rounds, sweeps over 3 vocabulary
sizes and 2 token counts); ``--full`` takes 15 rounds and 6 + 4 sweep points (about 25 minutes on
a 2-core machine); ``--quick`` is a smoke run at tiny shapes that writes to ``build/benchmarks``.

Per workload and dtype, every variant is compiled (JAX: ``lower().compile()``, timed separately)
and warmed up, then timed round-robin -- one call of each variant per round, in a fresh seeded
random order every round (after a torch call the next JAX variant runs untimed for 0.1 s first:
torch's OpenMP threads spin after a call), ``--repeats`` rounds (>= 7) -- so machine noise
hits all variants alike; median/min/max are reported. The machine's float32 matmul peak
(jitted ``jnp.dot`` 2048^3) is timed as one more variant in every workload's interleaved rounds;
the best round is the peak (reported with the rounds' medians), and each workload's matmul
FLOP/s is reported as a fraction of it. Large-vocabulary variants run one per
process (``benchmarks/vocab.py``) so their peak memory is their own. Results: JSON (figures,
versions, machine, wall time), PNG plots and a Markdown table under ``benchmarks/results/``;
``--docs`` splices the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from jxent.predictors import linear, mlp

ROOT = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_device"] = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        info["torch"] = None
    return info


def timed(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    spinning: tuple[str, ...] = (),
    settle_s: float = 0.1,
) -> dict[str, dict[str, float]]:
    """Round-robin timing of already-warm callables that block until their result is ready.

    Every round calls each variant once, in a fresh seeded random order. After a variant named in
    ``spinning`` (PyTorch: its OpenMP threads keep spinning on the 2 cores after a call, which
    measurably slowed whatever JAX call came next by ~35 %), the next variant first runs untimed
    for ``settle_s`` (busy, so the cores do not idle down), and only then is timed.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = np.random.default_rng(0)
    previous = None
    for _ in range(repeats):
        for name in map(str, order.permutation(list(fns))):
            if previous in spinning and name not in spinning:
                settle = time.perf_counter() + settle_s
                while True:  # busy, untimed: keeps the cores awake while torch's threads stop
                    fns[name]()
                    if time.perf_counter() > settle:
                        break
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            previous = name
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
        for name, t in times.items()
    }


def compile_jax(fn: Callable, *args: Any) -> tuple[Callable[[], Any], float]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start

    def run() -> Any:
        return jax.block_until_ready(compiled(*args))

    run()
    return run, seconds


PEAK = "matmul peak (jnp.dot n^3)"
# The headline baseline: the plain loss under autodiff, as a user writes it today.
BASE = "optax + jax.value_and_grad"


def matmul_peak_run(n: int) -> tuple[Callable, float]:
    """A compiled float32 ``jnp.dot`` of two ``[n, n]`` matrices and its FLOPs."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    run, _ = compile_jax(jnp.dot, a, a)
    return run, 2.0 * n**3


def peak_summary(rounds: list[dict[str, Any]], flops: float) -> dict[str, Any]:
    """The machine's matmul peak: the best of every interleaved round, with the spread.

    One measurement at the start can come out low (another process, frequency scaling) and
    then every "% of peak" is inflated, even above 100 %; the best of many rounds is not.
    """
    best = [flops / r["min_s"] / 1e9 for r in rounds]
    medians = [flops / r["median_s"] / 1e9 for r in rounds]
    return {
        "gflops": max(best),
        "median_of_medians": statistics.median(medians),
        "min_of_medians": min(medians),
        "rounds": sum(r["runs"] for r in rounds),
    }


def plain_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """The loss written the usual way: log_softmax in float32, gather, mean."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


def predictor_workload(
    name: str,
    apply: Callable,
    params: Any,
    x: jax.Array,
    y: jax.Array,
    flops: float,
    repeats: int,
    peak_run: Callable,
) -> dict[str, Any]:
    variants: dict[str, Callable] = {
        "jxent.value_and_grad": jxent.value_and_grad(apply),
        "jax.value_and_grad": lambda p, x, y: jax.value_and_grad(
            lambda q: plain_loss(apply(q, x), y)
        )(p),
        "optax + jax.value_and_grad": lambda p, x, y: jax.value_and_grad(
            lambda q: optax.softmax_cross_entropy_with_integer_labels(apply(q, x), y).mean()
        )(p),
    }
    runs, compile_s = {}, {}
    for variant, fn in variants.items():
        runs[variant], compile_s[variant] = compile_jax(fn, params, x, y)
    torch_run = torch_workload(name, params, x, y)
    if torch_run is not None:
        torch_run()
        runs["torch eager F.cross_entropy"] = torch_run
    runs[PEAK] = peak_run  # measured in the same interleaved rounds as the variants
    results = timed(runs, repeats, spinning=("torch eager F.cross_entropy",))
    peak = results.pop(PEAK)
    for variant, r in results.items():
        r["compile_s"] = compile_s.get(variant)
        r["matmul_gflops"] = flops / r["median_s"] / 1e9
    return {
        "workload": name,
        "dtype": str(x.dtype),
        "flops": flops,
        "variants": results,
        "peak_round": peak,
    }


def torch_workload(name: str, params: Any, x: Any, y: Any) -> Callable[[], Any] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(x.dtype)]

    def tensor(a: Any, grad: bool = False) -> Any:
        return torch.tensor(np.asarray(a, np.float32)).to(device, dtype).requires_grad_(grad)

    tx = tensor(x)
    ty = torch.tensor(np.asarray(y), dtype=torch.long, device=device)
    leaves = [tensor(a, grad=True) for a in jax.tree.leaves(params)]

    def forward() -> Any:
        if name.startswith("linear"):
            w, b = leaves[1], leaves[0]  # jax.tree.leaves orders the dict by key: b, w
            return tx @ w + b
        h = tx
        pairs = list(zip(leaves[::2], leaves[1::2], strict=True))
        for i, (w, b) in enumerate(pairs):
            h = h @ w + b
            if i < len(pairs) - 1:
                h = torch.relu(h)
        return h

    def run() -> Any:
        for leaf in leaves:
            leaf.grad = None
        loss = F.cross_entropy(forward().float(), ty)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return run


def vocab_rows(
    n: int, d: int, vocab: int, dtype: str, variants: list[str], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        env = dict(os.environ)
        if "8 CPU devices" in variant:
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        cmd = [sys.executable, "-m", "benchmarks.vocab", variant, str(n), str(d), str(vocab)]
        out = subprocess.run(
            [*cmd, dtype, str(repeats)], capture_output=True, text=True, env=env, cwd=ROOT.parent
        )
        if out.returncode != 0:
            rows.append({"variant": variant, "N": n, "L": vocab, "error": out.stderr[-500:]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


JAX_VOCAB = [
    "jax.value_and_grad (materialised)",
    "jxent.value_and_grad (materialised)",
    "jxent.linear_cross_entropy (chunked)",
]
TORCH_VOCAB = [
    "torch F.cross_entropy (eager)",
    "torch F.linear_cross_entropy (reference)",
    "torch F.linear_cross_entropy (chunked)",
]


# What each mode times. "default" covers every workload, variant and dtype of "full" with fewer
# rounds and a shorter sweep; "quick" is a smoke run at tiny shapes (the slow test tier runs it).
MODES: dict[str, dict[str, Any]] = {
    "quick": {"repeats": 3, "vocab_repeats": 3, "sweep_L": [2048], "sweep_N": [256]},
    "default": {
        "repeats": 7,
        "vocab_repeats": 5,
        "sweep_L": [8192, 65536, 262144],
        "sweep_N": [1024, 4096],
    },
    "full": {
        "repeats": 15,
        "vocab_repeats": 7,
        "sweep_L": [1024, 8192, 32768, 65536, 131072, 262144],
        "sweep_N": [512, 1024, 2048, 4096],
    },
}


def run_all(mode: str, repeats: int) -> dict[str, Any]:
    quick = mode == "quick"
    have_torch = machine()["torch"] is not None
    s = (lambda full, small: small) if quick else (lambda full, small: full)
    peak_run, peak_flops = matmul_peak_run(s(2048, 256))
    peak_run()
    out: dict[str, Any] = {"machine": machine(), "mode": mode, "repeats": repeats}
    workloads = []
    for dtype in (jnp.float32, jnp.bfloat16):
        b, d, vocab = s(4096, 64), s(512, 32), s(1000, 50)
        print(f"linear {b}x{d}x{vocab} {jnp.dtype(dtype).name} ...", flush=True)
        params = jax.tree.map(
            lambda a, dtype=dtype: a.astype(dtype), linear.init(jax.random.key(0), d, vocab)
        )
        x = jax.random.normal(jax.random.key(1), (b, d)).astype(dtype)
        y = jax.random.randint(jax.random.key(2), (b,), 0, vocab)
        workloads.append(
            predictor_workload(
                "linear", linear.apply, params, x, y, 4.0 * b * d * vocab, repeats, peak_run
            )
        )
        sizes = s([784, 512, 512, 10], [32, 16, 16, 10])
        b = s(1024, 64)
        print(f"mlp {sizes} B={b} {jnp.dtype(dtype).name} ...", flush=True)
        params = jax.tree.map(
            lambda a, dtype=dtype: a.astype(dtype), mlp.init(jax.random.key(0), sizes)
        )
        x = jax.random.normal(jax.random.key(1), (b, sizes[0])).astype(dtype)
        y = jax.random.randint(jax.random.key(2), (b,), 0, sizes[-1])
        pairs = list(itertools.pairwise(sizes))
        flops = 4.0 * b * sum(i * o for i, o in pairs) + 2.0 * b * sum(i * o for i, o in pairs[1:])
        workloads.append(
            predictor_workload("mlp", mlp.apply, params, x, y, flops, repeats, peak_run)
        )
    out["workloads"] = workloads
    out["matmul_peak"] = peak_summary([w.pop("peak_round") for w in workloads], peak_flops)
    out["matmul_peak_gflops"] = out["matmul_peak"]["gflops"]
    vocab_repeats = MODES[mode]["vocab_repeats"]
    n, d, vocab = s(2048, 64), s(512, 32), s(65536, 4096)
    print(f"large vocabulary N={n} D={d} L={vocab}, one process per variant ...", flush=True)
    variants = JAX_VOCAB + (TORCH_VOCAB if have_torch else [])
    if quick:  # each variant is a process of its own (~5 s of start-up): keep --quick short
        variants = JAX_VOCAB[::2]
    out["vocab"] = vocab_rows(n, d, vocab, "float32", variants, vocab_repeats)
    if not quick:
        out["vocab"] += vocab_rows(n, d, vocab, "bfloat16", JAX_VOCAB[::2], vocab_repeats)
    out["vocab"] += vocab_rows(
        n, d, vocab, "float32", ["jxent.vocab_parallel (8 CPU devices)"], vocab_repeats
    )
    out["vocab_flops"] = 6.0 * n * d * vocab
    sweep_l = MODES[mode]["sweep_L"]
    print(f"sweep over L {sweep_l} ...", flush=True)
    out["sweep_L"] = []
    for vocab_l in sweep_l:
        # The materialised variant up to 256k classes: 2048 x 262144 float32 is 2 GiB a copy
        # and its step peaks near 7 GiB of scratch (measured), within a 24 GiB machine.
        chosen = JAX_VOCAB[::2] if vocab_l <= s(262144, 0) else JAX_VOCAB[2:]
        out["sweep_L"] += vocab_rows(n, d, vocab_l, "float32", chosen, 3)
    sweep_n = MODES[mode]["sweep_N"]
    print(f"sweep over N {sweep_n} ...", flush=True)
    out["sweep_N"] = []
    for tokens in sweep_n:
        chosen = JAX_VOCAB[::2] if not quick else JAX_VOCAB[2:]
        out["sweep_N"] += vocab_rows(tokens, d, s(32768, 2048), "float32", chosen, 3)
    # curvature and lm_head import this module: not at the top
    from benchmarks import curvature, lm_head, sharded

    out["curvature"] = curvature.run(s, repeats)
    out["lm_head"] = lm_head.run(s, repeats)
    print("sharded like the batch (8 CPU devices, a subprocess) ...", flush=True)
    out["sharded"] = sharded.run(quick, repeats)
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    peak = res["matmul_peak_gflops"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, JAX {m['jax']} on {m['jax_backend']} "
        f"({m['device']}), optax {m['optax']}, torch {m['torch']}. Matmul peak (jitted float32 "
        f"`jnp.dot` 2048³, best of {res['matmul_peak']['rounds']} calls interleaved with the "
        f"workloads; the workloads' medians {res['matmul_peak']['min_of_medians']:.0f}–"
        f"{res['matmul_peak']['median_of_medians']:.0f}): **{peak:.0f} GFLOP/s**. Median of "
        f"{res['repeats']} interleaved runs. The baseline is the plain loss under autodiff, "
        f"optax's `softmax_cross_entropy_with_integer_labels` under `jax.value_and_grad` ({BASE}; "
        "`jax.grad` of a jxent loss would run jxent's own rule, so it is no baseline): "
        "ratio = variant time / baseline time (< 1: faster than the plain loss); compile = "
        "`lower().compile()` seconds, and its ratio to the baseline's.",
        "",
        "| workload | dtype | variant | median ms (min–max) | ÷ baseline | compile s (÷ baseline) "
        "| % of matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in res["workloads"]:
        base = w["variants"][BASE]
        for name, r in w["variants"].items():
            compile_s = r.get("compile_s")
            compile_cell = ""
            if compile_s is not None:
                compile_cell = f"{compile_s:.2f} ({compile_s / base['compile_s']:.2f})"
            lines.append(
                f"| {w['workload']} | {w['dtype']} | {name} | {1e3 * r['median_s']:.2f} "
                f"({1e3 * r['min_s']:.2f}–{1e3 * r['max_s']:.2f}) "
                f"| {r['median_s'] / base['median_s']:.2f} | {compile_cell} "
                f"| {100 * r['matmul_gflops'] / peak:.0f} % |"
            )
    lines += [
        "",
        "Large vocabulary, one process per variant (scratch = peak RSS above the inputs minus "
        "the dx, dW outputs every method owes):",
        "",
        "| N×D×L | dtype | variant | median s | vs jax materialised | above inputs MiB "
        "| scratch MiB | % of matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {
        r["dtype"]: r["median_s"]
        for r in res["vocab"]
        if r.get("variant") == "jax.value_and_grad (materialised)"
    }
    for r in res["vocab"]:
        if "error" in r:
            lines.append(f"| | | {r['variant']} | failed | | | | |")
            continue
        shape = f"{r['N']}×{r['D']}×{r['L']}"
        ratio = r["median_s"] / base[r["dtype"]] if r["dtype"] in base else float("nan")
        frac = res["vocab_flops"] / r["median_s"] / 1e9 / peak
        lines.append(
            f"| {shape} | {r['dtype']} | {r['variant']} | {r['median_s']:.2f} | {ratio:.2f}× "
            f"| {r['above_inputs_mib']:.0f} | {r['scratch_mib']:.0f} | {100 * frac:.0f} % |"
        )
    from benchmarks import curvature, lm_head, sharded

    lines += ["", *sharded.markdown(res["sharded"])] if "sharded" in res else []
    head = lm_head.markdown(res) if "lm_head" in res else ""
    return "\n".join(lines) + "\n" + curvature.markdown(res) + head


def plots(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for variant in JAX_VOCAB[::2]:
        rows = [r for r in res["sweep_L"] if r.get("variant") == variant and "error" not in r]
        ls = [r["L"] for r in rows]
        axes[0].plot(ls, [r["median_s"] for r in rows], "o-", label=variant)
        axes[1].plot(ls, [r["above_inputs_mib"] for r in rows], "o-", label=variant)
        rows = [r for r in res["sweep_N"] if r.get("variant") == variant and "error" not in r]
        axes[2].plot([r["N"] for r in rows], [r["median_s"] for r in rows], "o-", label=variant)
    axes[0].set(xscale="log", yscale="log", xlabel="L (vocabulary)", ylabel="s", title="time vs L")
    axes[1].set(
        xscale="log", yscale="log", xlabel="L", ylabel="MiB above inputs", title="memory vs L"
    )
    axes[2].set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="s", title="time vs N")
    names, ratios = [], []
    for w in res["workloads"]:
        base = w["variants"][BASE]["median_s"]
        for name, r in w["variants"].items():
            if name != BASE:
                names.append(f"{w['workload']} {w['dtype'][:4]}\n{name.split(' ')[0]}")
                ratios.append(r["median_s"] / base)
    axes[3].barh(names, ratios)
    axes[3].axvline(1.0, color="k", lw=1)
    axes[3].set(xlabel="time / optax + jax.grad time", title="vs the plain loss (<1: faster)")
    axes[3].tick_params(axis="y", labelsize=6)
    for ax in axes[:3]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="smoke run at tiny shapes (~30 s)")
    group.add_argument(
        "--full", action="store_true", help="15 rounds and the long sweeps (~25 min on 2 cores)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (mode default)")
    parser.add_argument("--name", default=None, help="result name (default: backend-cores)")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results; build/benchmarks for --quick, which "
        "git ignores, so a smoke run leaves the tree clean)",
    )
    parser.add_argument(
        "--docs", action="store_true", help="splice the table into docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    repeats = args.repeats or MODES[mode]["repeats"]
    start = time.perf_counter()
    res = run_all(mode, repeats)
    res["wall_s"] = time.perf_counter() - start
    name = args.name or f"{jax.default_backend()}-{os.cpu_count()}cores" + (
        "" if mode == "default" else f"-{mode}"
    )
    default_out = ROOT.parent / "build" / "benchmarks" if mode == "quick" else ROOT / "results"
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    table = markdown(res)
    (out / f"{name}.md").write_text(table)
    plots(res, out / f"{name}.png")
    print(table)
    print(f"written: {out / name}.json, .md, .png ({mode} run, {res['wall_s'] / 60:.1f} min)")
    if args.docs:
        readme = ROOT.parent / "docs" / "benchmarks.md"
        text = readme.read_text()
        start_tag, end_tag = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
        head, rest = text.split(start_tag)
        tail = rest.split(end_tag)[1]
        readme.write_text(f"{head}{start_tag}\n{table}{end_tag}{tail}")
