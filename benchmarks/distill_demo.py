"""Distilling a larger ``jxent demo lm`` model into a smaller one (docs/distillation.md).

    python -m benchmarks.distill_demo [--steps 300] [--out benchmarks/results/...json]

The demo's data, tokenizer and transformer (``jxent._cli._demo_lm``): a teacher trained with
the demo's own step (the fused head, ``jxent.train.make_step``), then one student
initialisation trained for the same steps on the same batches with each loss of
:data:`SETTINGS`: the hard labels alone (``jxent.linear_cross_entropy``), and
``jxent.linear_distillation_loss`` from the frozen teacher, whose hidden states are computed
in each step under ``jax.lax.stop_gradient``; and, for reference, the hard labels for twice the
steps (about a distilled run's wall time). Every model is scored by the cross-entropy of the
hard labels on the same validation windows. About 5 minutes on 2 CPU cores (the tokenizer
cached); ``--quick`` is a tiny run (about 25 s) that checks the script still runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import jxent
from jxent import train
from jxent._cli import _demo_lm as demo

# name -> options of jxent.linear_distillation_loss (None: the hard labels alone).
SETTINGS: dict[str, dict[str, Any] | None] = {
    "hard labels": None,
    "forward KL, T=1, h=0": {"divergence": "forward_kl", "hard_weight": 0.0},
    "forward KL, T=1, h=0.2": {"divergence": "forward_kl", "hard_weight": 0.2},
    "forward KL, T=1, h=0.5": {"divergence": "forward_kl", "hard_weight": 0.5},
    "forward KL, T=2 (x T^2), h=0.5": {
        "divergence": "forward_kl",
        "temperature": 2.0,
        "temperature_scaling": True,
        "hard_weight": 0.5,
    },
    "reverse KL, T=1, h=0.5": {"divergence": "reverse_kl", "hard_weight": 0.5},
    "JSD beta=0.5, T=1, h=0.5": {"divergence": "jsd", "beta": 0.5, "hard_weight": 0.5},
}


def model_args(args: argparse.Namespace, role: str) -> argparse.Namespace:
    """The demo's flags for the teacher or the student."""
    own = {k: getattr(args, f"{role}_{k}") for k in ("layers", "width", "steps", "seed")}
    shared = ("vocab", "heads", "context", "batch", "lr", "corpus", "cache")
    return argparse.Namespace(**own, **{k: getattr(args, k) for k in shared})


def head_of(params: dict) -> tuple[jax.Array, jax.Array]:
    return demo.OUTPUT_HEAD.w(params), demo.OUTPUT_HEAD.bias(params)


def student_step(optimizer: optax.GradientTransformation, heads: int, options: dict | None):
    """``step(params, opt_state, teacher_params, inputs, targets)``: one AdamW step."""
    hidden, _ = demo.predictors(heads)

    def loss_fn(params: dict, teacher: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        h = hidden(params, inputs)
        h = h.reshape(-1, h.shape[-1])
        w, b = head_of(params)
        labels = targets.reshape(-1)
        if options is None:
            return jxent.linear_cross_entropy(h, w, labels, bias=b, ignore_index=demo.PAD)
        # The frozen teacher: its hidden states recomputed each step, no gradient through them.
        h_t = jax.lax.stop_gradient(hidden(teacher, inputs))
        w_t, b_t = head_of(teacher)
        return jxent.linear_distillation_loss(
            h, w, h_t.reshape(-1, h_t.shape[-1]), w_t, bias=b, teacher_bias=b_t,
            labels=labels, ignore_index=demo.PAD, **options,
        )  # fmt: skip

    @jax.jit
    def step(params, opt_state, teacher, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, teacher, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def validation_loss(params: dict, heads: int, batches: list[np.ndarray]) -> float:
    """Mean cross-entropy of the hard next-token labels over the validation windows."""
    hidden, _ = demo.predictors(heads)
    scores = [
        train.evaluate(
            hidden, params, *demo._split(b), head=demo.OUTPUT_HEAD, ignore_index=demo.PAD
        )["loss"]
        for b in batches
    ]
    return float(np.mean(scores))


def batches_of(args: argparse.Namespace, stream: np.ndarray):
    """The training batches, the same sequence for every model (seeded)."""
    rng = np.random.default_rng(args.seed)
    for _ in range(args.steps):
        starts = rng.integers(0, len(stream) - args.context - 1, args.batch)
        yield demo._split(demo.windows(stream, starts, args.context))


def train_teacher(args, data, val, params: dict) -> tuple[dict, dict[str, Any]]:
    """The demo's own step (fused head, z-loss 1e-4) on the teacher's sizes."""
    margs = model_args(args, "teacher")
    optimizer = demo.optimizer_for(margs)
    step = demo.lm_step(optimizer, args.heads, "fused")
    state = train.init_state(params, optimizer)
    start = time.perf_counter()
    for inputs, targets in batches_of(margs, data.train):
        state, metrics = step(state, inputs, targets)
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - start
    loss = validation_loss(state.params, args.heads, val)
    print(f"  teacher, {margs.steps} steps: validation loss {loss:.4f} nats ({seconds:.0f} s)")
    return state.params, {"val_loss": loss, "seconds": seconds, **_sizes(margs, params)}


def train_student(args, data, val, init: dict, teacher: dict, name, options) -> dict[str, Any]:
    """The student from ``init``, with one loss of :data:`SETTINGS`, ``args.student_steps``."""
    margs = model_args(args, "student")
    optimizer = demo.optimizer_for(margs)
    step = student_step(optimizer, args.heads, options)
    params, opt_state = init, optimizer.init(init)
    curve = []
    start = time.perf_counter()
    for i, (inputs, targets) in enumerate(batches_of(margs, data.train), 1):
        params, opt_state, loss = step(params, opt_state, teacher, inputs, targets)
        if i % args.eval_every == 0 or i == margs.steps:
            curve.append({"step": i, "val_loss": validation_loss(params, args.heads, val)})
    seconds = time.perf_counter() - start
    final = curve[-1]["val_loss"]
    print(f"  {name:34s} validation loss {final:.4f} nats ({seconds:.0f} s)")
    record = {"name": name, "steps": margs.steps, "options": options, "val_loss": final}
    return record | {"train_loss": float(loss), "curve": curve, "seconds": seconds}


def _sizes(margs: argparse.Namespace, params: dict) -> dict[str, Any]:
    count = sum(a.size for a in jax.tree.leaves(params))
    return {"layers": margs.layers, "width": margs.width, "steps": margs.steps, "parameters": count}


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    data = demo._load_data(model_args(args, "teacher"))
    val = demo._validation_batches(data.val, args)
    print("teacher ", end="")
    init = demo._initial_model(model_args(args, "teacher"), data.train)
    teacher, teacher_record = train_teacher(args, data, val, init)
    student = demo.init_model(
        jax.random.key(args.student_seed + 1), args.vocab, args.student_width, args.student_layers,
        args.context,
    )  # fmt: skip
    student["bias"] = init["bias"]  # the demo's: the training tokens' log frequencies
    sizes = _sizes(model_args(args, "student"), student)
    print(
        f"student: {args.student_layers} layer(s), width {args.student_width}, "
        f"{sizes['parameters'] / 1e6:.2f} M parameters, {args.steps} steps of "
        f"{args.batch * args.context} tokens, one initialisation, the same batches"
    )
    runs = [(args, name, options) for name, options in SETTINGS.items()]
    # The hard labels for twice the steps: about the wall time of a distilled run here.
    runs.append((_with(args, student_steps=2 * args.steps), "hard labels, 2x steps", None))
    students = [train_student(a, data, val, student, teacher, n, o) for a, n, o in runs]
    seconds = time.perf_counter() - start
    hard = students[0]["val_loss"]
    for s in students[1:]:
        print(f"  {s['name']:34s} {s['val_loss'] - hard:+.4f} nats against the hard labels")
    print(f"{seconds:.0f} s in all")
    record = {
        "command": "python -m benchmarks.distill_demo",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "cache", "quick")},
        "backend": f"{jax.default_backend()}, {jax.device_count()} device(s)",
        "val_tokens": sum(b[:, 1:].size for b in val),
        "unigram_entropy": data.entropy,
        "teacher": teacher_record,
        "student": sizes,
        "students": students,
        "seconds": seconds,
    }
    if not args.quick:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"written: {args.out}")


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**(vars(args) | changes))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distill_demo")
    add = parser.add_argument
    add("--vocab", type=int, default=4096, help="BPE vocabulary (4096)")
    add("--context", type=int, default=64, help="context length (64)")
    add("--batch", type=int, default=16, help="sequences per step (16)")
    add("--heads", type=int, default=4, help="attention heads (4)")
    add("--lr", type=float, default=1e-2, help="peak AdamW learning rate, both models (1e-2)")
    add("--teacher-layers", type=int, default=2, help="(2)")
    add("--teacher-width", type=int, default=128, help="(128)")
    add("--teacher-steps", type=int, default=600, help="(600)")
    add("--student-layers", type=int, default=1, help="(1)")
    add("--student-width", type=int, default=64, help="(64)")
    add("--steps", type=int, default=300, help="each student's steps (300)")
    add("--eval-every", type=int, default=100, help="student steps between evaluations (100)")
    add("--eval-batches", type=int, default=32, help="validation batches (32)")
    add("--seed", type=int, default=0, help="the teacher's initialisation and batches (0)")
    add("--student-seed", type=int, default=None, help="the students' (default: --seed)")
    add("--corpus", default=None, help="as jxent demo lm's --corpus (Python's stdlib)")
    add("--cache", default=str(Path.home() / ".cache" / "jxent"), help="tokenizer cache")
    add("--out", default="benchmarks/results/distill-cpu-2cores.json", help="the JSON written")
    add("--quick", action="store_true", help="a tiny run that writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.teacher_steps, args.steps, args.eval_every, args.eval_batches = 4, 4, 2, 2
        args.teacher_width, args.context, args.batch = 32, 16, 4
    args.student_steps, args.teacher_seed = args.steps, args.seed
    args.student_seed = args.seed if args.student_seed is None else args.student_seed
    return args


if __name__ == "__main__":
    main()
