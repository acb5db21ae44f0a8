"""Curvature workloads of ``python -m benchmarks`` (alone: ``python -m benchmarks.curvature``).

- MLP 784-512-512-10, B=1024, float32: ``jxent.ggn_vector_product`` against
  ``jxent.value_and_grad`` (target <= 2.5x) and ``jxent.hessian_vector_product`` against
  ``jax.jvp(jax.grad(...))`` of the plainly written loss (target <= 1.1x), interleaved rounds.
- The language-model head N=2048, D=512, L=65536, float32: the chunked GGN product against the
  materialised one, timed interleaved in this process (target <= 1.5x), and each in a process of
  its own for peak memory (target: scratch >= 10x smaller); the same for drawing labels from the
  model, ``jxent.linear_sample_labels`` against ``jax.random.categorical`` of the materialised
  logits (targets: <= 1.2x the time, scratch >= 10x smaller).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

import jxent
from benchmarks import vocab
from benchmarks.run import compile_jax, plain_loss, timed, vocab_rows
from jxent.predictors import mlp

TARGETS = {
    "mlp ggn / value_and_grad": 2.5,
    "mlp hvp / jvp(grad)": 1.1,
    "head chunked / materialised time": 1.5,
    "head materialised / chunked scratch": 10.0,  # at least
    "sampling chunked / materialised time": 1.2,
    "sampling materialised / chunked scratch": 10.0,  # at least
}


def mlp_rows(s: Callable, repeats: int) -> dict[str, Any]:
    sizes, b = s([784, 512, 512, 10], [32, 16, 16, 10]), s(1024, 64)
    params = mlp.init(jax.random.key(0), sizes)
    x = jax.random.normal(jax.random.key(1), (b, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (b,), 0, sizes[-1])
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape), params)

    def jvp_grad(p, x, y, v):
        return jax.jvp(jax.grad(lambda q: plain_loss(mlp.apply(q, x), y)), (p,), (v,))[1]

    variants = {
        "jxent.value_and_grad": (jxent.value_and_grad(mlp.apply), (params, x, y)),
        "jxent.ggn_vector_product": (jxent.ggn_vector_product(mlp.apply), (params, x, y, v)),
        "jxent.hessian_vector_product": (
            jxent.hessian_vector_product(mlp.apply),
            (params, x, y, v),
        ),
        "jax.jvp(jax.grad(plain loss))": (jvp_grad, (params, x, y, v)),
    }
    runs = {name: compile_jax(fn, *args)[0] for name, (fn, args) in variants.items()}
    return {"sizes": sizes, "batch": b, "variants": timed(runs, repeats)}


def head_rows(s: Callable, repeats: int) -> dict[str, Any]:
    n, d, vocab_l = s(2048, 64), s(512, 32), s(65536, 4096)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (n, d))
    w = jax.random.normal(k2, (d, vocab_l)) / d**0.5
    y = jax.random.randint(k3, (n,), 0, vocab_l)
    x_dot, w_dot = vocab.ggn_tangents(x, w)
    programs = vocab.ggn_programs(x, w, y)
    runs = {name: compile_jax(fn, x, w, x_dot, w_dot)[0] for name, fn in programs.items()}
    key = jax.random.key(1)
    for name, fn in vocab.sample_programs().items():
        runs[name] = compile_jax(fn, key, x, w)[0]
    times = timed(runs, max(3, repeats // 2))  # ~5 s a call at the default shape
    memory = vocab_rows(n, d, vocab_l, "float32", vocab.GGN_VOCAB + vocab.SAMPLE_VOCAB, 1)
    return {"N": n, "D": d, "L": vocab_l, "times": times, "memory": memory}


def run(s: Callable, repeats: int) -> dict[str, Any]:
    print("curvature: mlp products ...", flush=True)
    out = {"mlp": mlp_rows(s, repeats)}
    print("curvature: the LM head's GGN product, chunked vs materialised ...", flush=True)
    out["head"] = head_rows(s, repeats)
    out["ratios"] = ratios(out)
    return out


def ratios(res: dict[str, Any]) -> dict[str, float]:
    t = {k: v["median_s"] for k, v in res["mlp"]["variants"].items()}
    head = {k: v["median_s"] for k, v in res["head"]["times"].items()}
    mat, chunked = vocab.GGN_VOCAB
    draw_mat, draw_chunked = vocab.SAMPLE_VOCAB
    scratch = {r["variant"]: r.get("scratch_mib", float("nan")) for r in res["head"]["memory"]}
    return {
        "sampling chunked / materialised time": head[draw_chunked] / head[draw_mat],
        "sampling materialised / chunked scratch": scratch[draw_mat] / scratch[draw_chunked],
        "mlp ggn / value_and_grad": t["jxent.ggn_vector_product"] / t["jxent.value_and_grad"],
        "mlp hvp / jvp(grad)": t["jxent.hessian_vector_product"]
        / t["jax.jvp(jax.grad(plain loss))"],
        "head chunked / materialised time": head[chunked] / head[mat],
        "head materialised / chunked scratch": scratch[mat] / scratch[chunked],
    }


def markdown(res: dict[str, Any]) -> str:
    c = res["curvature"]
    m, h = c["mlp"], c["head"]
    lines = [
        "",
        f"Curvature products (float32; MLP {'-'.join(map(str, m['sizes']))}, B={m['batch']}; "
        f"LM head N={h['N']}, D={h['D']}, L={h['L']}). Times: medians of interleaved rounds in "
        "one process; head memory: one process per variant, as above.",
        "",
        "| workload | variant | median ms | scratch MiB |",
        "|---|---|---|---|",
    ]
    for name, r in m["variants"].items():
        lines.append(f"| mlp | {name} | {1e3 * r['median_s']:.2f} | |")
    scratch = {r["variant"]: r.get("scratch_mib") for r in h["memory"]}
    for name, r in h["times"].items():
        mib = scratch.get(name)
        mib = "failed" if mib is None else f"{mib:.0f}"
        lines.append(f"| LM head | {name} | {1e3 * r['median_s']:.0f} | {mib} |")
    lines += ["", "| ratio | this run | target |", "|---|---|---|"]
    for name, value in c["ratios"].items():
        bound = "≥" if "scratch" in name else "≤"
        lines.append(f"| {name} | {value:.2f} | {bound} {TARGETS[name]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """``python -m benchmarks.curvature``: only these workloads, at the default shapes."""
    import json
    import os
    import time
    from pathlib import Path

    from benchmarks.run import machine

    start = time.perf_counter()
    res = {"machine": machine(), "curvature": run(lambda full, small: full, 7)}
    res["wall_s"] = time.perf_counter() - start
    out = Path(__file__).resolve().parent / "results"
    name = f"curvature-{jax.default_backend()}-{os.cpu_count()}cores"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
