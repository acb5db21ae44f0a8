"""LM-head outputs and distillation in ``python -m benchmarks`` (alone: ``-m benchmarks.lm_head``).

At N=2048, D=512, L=65536, float32, every variant under ``jax.value_and_grad`` w.r.t. ``x, W``:

- ``jxent.linear_log_probs`` (the per-token log-probability of an RL objective, with a 0.01
  entropy bonus: ``-mean(log_prob) - 0.01 mean(entropy)``) against ``jxent.linear_cross_entropy``,
  timed in interleaved rounds in this process (target <= 1.1x), and in a process of its own for
  peak memory against the materialised ``log_softmax`` + gather (target: scratch >= 10x less);
- the error of bfloat16 log-probabilities against float64 (from the same bf16-rounded inputs):
  the fused head (float32 accumulation) beside the materialised bf16 logits with
  ``log_softmax`` in bf16 and in float32 -- the drift RL trainers report;
- ``jxent.linear_distillation_loss`` (forward KL and JSD, teacher under stop_gradient) against
  the same divergence written on both heads' materialised logits, interleaved (target <= 1.5x),
  and the forward KL's peak memory, one process each (target: scratch >= 10x less).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jxent
from benchmarks import vocab
from benchmarks.run import compile_jax, timed, vocab_rows

TARGETS = {
    "log_probs / linear_cross_entropy time": 1.1,
    "materialised / log_probs scratch": 10.0,  # at least
    "distillation fused / materialised time (forward KL)": 1.5,
    "distillation fused / materialised time (JSD)": 1.5,
    "distillation materialised / fused scratch": 10.0,  # at least
}
CE = "jxent.linear_cross_entropy (chunked)"
LOG_PROBS = "jxent.linear_log_probs (chunked)"
MATERIALISED = "jax.value_and_grad (materialised)"


def programs(y: jax.Array) -> dict[str, Callable]:
    """The timed programs ``(x, w) -> (value, (dx, dw))``."""

    def cross_entropy(x, w):
        return jxent.linear_cross_entropy(x, w, y)

    def log_probs(x, w):
        out = jxent.linear_log_probs(x, w, y)
        return -jnp.mean(out.log_prob) - 0.01 * jnp.mean(out.entropy)

    grad = {"argnums": (0, 1)}
    return {
        CE: jax.value_and_grad(cross_entropy, **grad),
        LOG_PROBS: jax.value_and_grad(log_probs, **grad),
    }


def inputs(n: int, d: int, vocab_l: int, dtype: Any = jnp.float32) -> tuple:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (n, d)).astype(dtype)
    w = (jax.random.normal(k2, (d, vocab_l)) / d**0.5).astype(dtype)
    return x, w, jax.random.randint(k3, (n,), 0, vocab_l)


def _bf16(a: jax.Array) -> jax.Array:
    return jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=7)


def bf16_errors(n: int, d: int, vocab_l: int) -> dict[str, dict[str, float]]:
    """Mean and max |log p_y - exact| of bf16 inputs; exact: float64 from the same inputs."""
    x, w, y = inputs(n, d, vocab_l, jnp.bfloat16)

    def picked(log_p):
        return jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0].astype(jnp.float32)

    got = {
        "jxent.linear_log_probs (fused, float32 accumulation)": jax.jit(
            lambda x, w: jxent.linear_log_probs(x, w, y).log_prob
        )(x, w),
        "materialised bf16 logits, log_softmax in bf16": jax.jit(
            lambda x, w: picked(jax.nn.log_softmax(x @ w))
        )(x, w),
        # Rounded explicitly: XLA:CPU folds a bf16 dot's output rounding into a following
        # conversion to float32; GPUs write the bf16 logits.
        "materialised bf16 logits, log_softmax in float32": jax.jit(
            lambda x, w: picked(jax.nn.log_softmax(_bf16(x @ w).astype(jnp.float32)))
        )(x, w),
    }
    with jax.enable_x64(True):
        logits = x.astype(jnp.float64) @ w.astype(jnp.float64)
        exact = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
        out = {}
        for name, v in got.items():
            err = jnp.abs(v.astype(jnp.float64) - exact)
            out[name] = {"mean_abs": float(jnp.mean(err)), "max_abs": float(jnp.max(err))}
    return out


def run(s: Callable, repeats: int) -> dict[str, Any]:
    n, d, vocab_l = s(2048, 64), s(512, 32), s(65536, 4096)
    print("LM head: linear_log_probs vs linear_cross_entropy, interleaved ...", flush=True)
    x, w, y = inputs(n, d, vocab_l)
    everything = programs(y)
    teacher = vocab._teacher(x, w)
    for divergence in ("forward_kl", "jsd"):
        everything |= vocab.distill_programs(y, teacher, divergence)
    runs = {name: compile_jax(fn, x, w)[0] for name, fn in everything.items()}
    times = timed(runs, max(3, repeats // 2))  # ~2-6 s a call at the default shape
    print("LM head: memory, one process per variant ...", flush=True)
    variants = [MATERIALISED, LOG_PROBS, *vocab.DISTILL_VOCAB]
    memory = vocab_rows(n, d, vocab_l, "float32", variants, 1)
    print("LM head: bfloat16 log-prob error ...", flush=True)
    errors = bf16_errors(n, d, vocab_l)
    out = {"N": n, "D": d, "L": vocab_l, "times": times, "memory": memory, "bf16": errors}
    scratch = {r["variant"]: r.get("scratch_mib", float("nan")) for r in memory}
    out["ratios"] = {
        "log_probs / linear_cross_entropy time": times[LOG_PROBS]["median_s"]
        / times[CE]["median_s"],
        "materialised / log_probs scratch": scratch[MATERIALISED] / scratch[LOG_PROBS],
    }
    for kind in ("forward KL", "JSD"):
        fused = times[f"jxent.linear_distillation_loss (chunked, {kind})"]["median_s"]
        plain = times[f"jax.value_and_grad (materialised {kind})"]["median_s"]
        out["ratios"][f"distillation fused / materialised time ({kind})"] = fused / plain
    mat, fused = vocab.DISTILL_VOCAB
    out["ratios"]["distillation materialised / fused scratch"] = scratch[mat] / scratch[fused]
    return out


def markdown(res: dict[str, Any]) -> str:
    h = res["lm_head"]
    lines = [
        "",
        f"LM-head outputs (float32, N={h['N']}, D={h['D']}, L={h['L']}; value and gradient "
        "w.r.t. x, W). Times: medians of interleaved rounds in one process; memory: one "
        "process per variant, as above.",
        "",
        "| variant | median ms | scratch MiB |",
        "|---|---|---|",
    ]
    scratch = {r["variant"]: r.get("scratch_mib") for r in h["memory"]}
    for name, r in h["times"].items():
        mib = scratch.get(name)
        lines.append(
            f"| {name} | {1e3 * r['median_s']:.0f} | {'' if mib is None else f'{mib:.0f}'} |"
        )
    for name in (MATERIALISED, vocab.DISTILL_VOCAB[0]):
        if name not in h["times"]:
            lines.append(f"| {name} | | {scratch.get(name, float('nan')):.0f} |")
    lines += ["", "| ratio | this run | target |", "|---|---|---|"]
    for name, value in h["ratios"].items():
        bound = "≥" if "scratch" in name else "≤"
        lines.append(f"| {name} | {value:.2f} | {bound} {TARGETS[name]} |")
    lines += [
        "",
        "bfloat16 inputs: |log p_y - float64 log p_y| from the same bf16-rounded x, W (nats)",
        "",
        "| log-probabilities | mean | max |",
        "|---|---|---|",
    ]
    for name, e in h["bf16"].items():
        lines.append(f"| {name} | {e['mean_abs']:.2e} | {e['max_abs']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """``python -m benchmarks.lm_head``: only these workloads, at the default shapes."""
    import json
    import os
    import time
    from pathlib import Path

    from benchmarks.run import machine

    start = time.perf_counter()
    res = {"machine": machine(), "lm_head": run(lambda full, small: full, 7)}
    res["wall_s"] = time.perf_counter() - start
    out = Path(__file__).resolve().parent / "results"
    name = f"lm-head-{jax.default_backend()}-{os.cpu_count()}cores"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
