"""``jxent demo``: check the hand-derived gradient, then train an MLP on scikit-learn's digits."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jxent._check import check_grads
from jxent._cli import _base
from jxent._cli._base import load_digits_split
from jxent._vjp import grad
from jxent.predictors import mlp
from jxent.train import fit


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns the exit code (1 if the gradient check fails)."""
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    _base.output_folder(args.out)
    params = mlp.init(jax.random.key(args.seed), [x_train.shape[1], args.hidden, 10])
    print(f"digits: {len(x_train)} training and {len(x_test)} test images of 8x8 pixels")
    print(f"\n1. Hand-derived gradient of the MLP 64-{args.hidden}-10 on 64 training images, vs")
    print("   jax.grad of the plain loss (log_softmax, no jxent rule) and float64 central")
    print("   finite differences:")
    report = check_grads(grad(mlp.apply), mlp.apply, params, x_train[:64], y_train[:64])
    print(report)
    if not report.ok:
        return 1

    print(f"\n2. Training with jxent.value_and_grad + optax.adam({args.lr}), {args.epochs} epochs:")
    start = time.perf_counter()
    params, history = fit(
        mlp.apply,
        params,
        optax.adam(args.lr),
        (x_train, y_train),
        epochs=args.epochs,
        batch_size=64,
        key=jax.random.key(args.seed + 1),
        eval_data=(x_test, y_test),
        progress=True,
    )
    seconds = time.perf_counter() - start
    first, per_step = step_times(history, len(x_train) // 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {k: getattr(args, k) for k in ("epochs", "hidden", "lr", "seed")},
        "train_seconds": seconds,
        "first_step_seconds": first,
        "steady_step_seconds": per_step,
        "backend": jax.default_backend(),
        "history": history,
    }
    (out / "history.json").write_text(json.dumps(record, indent=2))
    print(
        f"\ntrained in {seconds:.1f} s: first step {first:.2f} s (compilation included), "
        f"then {1e3 * per_step:.2f} ms per step\nhistory written to {out / 'history.json'}"
    )
    if not args.no_plot:
        _plot(history, out / "training.png")
    print(f"test accuracy: {100 * history[-1]['eval_accuracy']:.1f}%")
    return 0


def step_times(history: list[dict[str, Any]], steps: int) -> tuple[float, float]:
    """``(first step with its compilation, steady-state seconds per step)`` from ``fit``'s history.

    The steady state is the median over epochs of each epoch's step time per step, the first
    step taken out of the first epoch.
    """
    first = history[0]["first_step_seconds"]
    per_epoch = [r["train_seconds"] / steps for r in history[1:]]
    if steps > 1:
        per_epoch.append((history[0]["train_seconds"] - first) / (steps - 1))
    return first, float(np.median(per_epoch)) if per_epoch else float("nan")


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('no plot: matplotlib is not installed (pip install "jxent[demo]")')
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["eval_loss"] for r in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    ax_acc.plot(epochs, [r["eval_accuracy"] for r in history], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("jxent demo: MLP on digits with the hand-derived gradient")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags."""
    parser.add_argument(
        "--epochs", type=_base.positive, default=30, help="training epochs (default 30)"
    )
    parser.add_argument(
        "--hidden", type=_base.positive, default=128, help="hidden width (default 128)"
    )
    parser.add_argument(
        "--lr", type=_base.positive_float, default=3e-3, help="Adam learning rate (3e-3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init, shuffling")
    parser.add_argument("--out", default="jxent-demo", help="output folder (jxent-demo)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")


__all__ = ["add_arguments", "run", "step_times"]
