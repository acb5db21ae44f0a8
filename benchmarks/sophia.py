"""Sophia-G (optax.contrib.sophia + jxent's GNB estimator) against Adam on the demo's MLP.

    python -m benchmarks.sophia [--steps 600] [--out docs]

Both optimizers train the MLP 64-64-10 on the bundled digits for the same number of steps on
the same batches (64 examples a step), each with the best learning rate of a small grid (chosen
on the final loss on the whole training set), and the curves of both are saved:
``sophia-vs-adam.png`` and ``sophia-vs-adam.json``. The GNB estimate costs one extra backward
pass every ``update_interval`` (10) steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import jxent
from jxent._cli._base import load_digits_split
from jxent.predictors import mlp

GRID = {"adam": [1e-3, 3e-3, 1e-2], "sophia-g": [1e-3, 3e-3, 1e-2]}


def optimizer(name: str, lr: float) -> optax.GradientTransformationExtraArgs:
    if name == "adam":
        return optax.with_extra_args_support(optax.adam(lr))
    estimator = jxent.train.gnb_estimator(mlp.apply, jax.random.key(1))
    return optax.contrib.sophia(lr, gamma=0.05, weight_decay=0.0, hessian_diagonal_fn=estimator)


def train(name: str, lr: float, steps: int, data: tuple) -> dict[str, list[float]]:
    (x, y), (x_test, y_test) = data
    params = mlp.init(jax.random.key(0), [x.shape[1], 64, 10])
    opt = optimizer(name, lr)
    value_and_grad = jxent.value_and_grad(mlp.apply)

    @jax.jit
    def step(params, state, xb, yb):
        loss, grads = value_and_grad(params, xb, yb)
        updates, state = opt.update(grads, state, params, x=xb)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def evaluate(params):
        return tuple(
            jxent.softmax_cross_entropy(mlp.apply(params, a), b)
            for a, b in ((x, y), (x_test, y_test))
        )

    state = opt.init(params)
    order = np.random.default_rng(0).permutation(
        np.tile(np.arange(len(x)), steps * 64 // len(x) + 1)
    )
    curve = {"step": [], "train_loss": [], "test_loss": []}
    start = time.perf_counter()
    for i in range(steps):
        idx = order[i * 64 : (i + 1) * 64]
        params, state, _ = step(params, state, x[idx], y[idx])
        if i % 20 == 0 or i == steps - 1:
            train_loss, test_loss = evaluate(params)
            curve["step"].append(i + 1)
            curve["train_loss"].append(float(train_loss))
            curve["test_loss"].append(float(test_loss))
    curve["seconds"] = time.perf_counter() - start
    return curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sophia", description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    args = parser.parse_args(argv)
    data = load_digits_split(0)
    data = tuple((jnp.asarray(a), jnp.asarray(b)) for a, b in data)
    runs = {}
    for name, rates in GRID.items():
        for lr in rates:
            runs[f"{name} lr={lr:g}"] = train(name, lr, args.steps, data)
            print(
                f"{name} lr={lr:g}: final train {runs[f'{name} lr={lr:g}']['train_loss'][-1]:.4f}"
            )
    best = {
        name: min(
            (k for k in runs if k.startswith(name)),
            key=lambda k: np.mean(runs[k]["train_loss"][-5:]),
        )
        for name in GRID
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sophia-vs-adam.json").write_text(json.dumps({"best": best, "runs": runs}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in best.values():
        r = runs[key]
        axes[0].plot(r["step"], r["train_loss"], label=key)
        axes[1].plot(r["step"], r["test_loss"], label=key)
    for ax, title in zip(axes, ("training loss (whole training set)", "test loss"), strict=True):
        ax.set(yscale="log", xlabel="step", title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"MLP 64-64-10 on digits, {args.steps} steps of 64: best learning rate of each")
    fig.tight_layout()
    fig.savefig(out / "sophia-vs-adam.png", dpi=100)
    print(f"best: {best}; written {out / 'sophia-vs-adam.png'}")


if __name__ == "__main__":
    main()
