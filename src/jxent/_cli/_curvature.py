"""``jxent curvature``: the Hessian's and the GGN's spectra of a model, at init and trained.

Top-k eigenvalues (Lanczos), trace estimates (Hutchinson, with standard errors) and the spectral
density (stochastic Lanczos quadrature) of the loss on a fixed batch, before and after training;
printed, written to JSON, and plotted. The default model is the demo's MLP on the bundled digits.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jxent._cli import _base
from jxent._curvature import (
    density_on_grid,
    ggn_vector_product,
    hessian_vector_product,
    lanczos,
    rademacher_like,
    slq_nodes,
    tridiagonal_eigh,
)
from jxent.predictors import mlp
from jxent.train import fit

CURVATURES = {"hessian": hessian_vector_product, "ggn": ggn_vector_product}


def _programs(apply: Callable, x: Any, y: Any, args: argparse.Namespace) -> dict[str, Callable]:
    """One jitted program per curvature: top-k, Hutchinson traces and SLQ nodes of ``params``."""

    def analyse(make: Callable, params: Any, key: jax.Array) -> dict[str, jax.Array]:
        product = make(apply)
        matvec = lambda v: product(params, x, y, v)  # noqa: E731
        k_top, k_trace, k_slq = jax.random.split(key, 3)
        size = sum(a.size for a in jax.tree.leaves(params))
        iters = min(args.iters, size)
        theta, _ = tridiagonal_eigh(lanczos(matvec, rademacher_like(k_top, params), iters))

        def trace_sample(k: jax.Array) -> jax.Array:
            v = rademacher_like(k, params)
            hv = matvec(v)
            pairs = zip(jax.tree.leaves(v), jax.tree.leaves(hv), strict=True)
            return sum(jnp.vdot(a, b) for a, b in pairs)

        traces = jax.lax.map(trace_sample, jax.random.split(k_trace, args.samples))
        nodes, weights = slq_nodes(
            matvec, params, num_iters=iters, num_probes=args.probes, key=k_slq
        )
        return {"top": theta[::-1][: args.k], "traces": traces, "nodes": nodes, "weights": weights}

    return {
        name: jax.jit(lambda p, k, m=make: analyse(m, p, k)) for name, make in CURVATURES.items()
    }


def _summary(out: dict[str, jax.Array]) -> dict[str, Any]:
    traces = np.asarray(out["traces"], np.float64)
    grid, density = density_on_grid(out["nodes"], out["weights"], grid_size=400)
    return {
        "top_eigenvalues": np.asarray(out["top"], np.float64).tolist(),
        "trace": float(traces.mean()),
        "trace_standard_error": float(traces.std(ddof=1) / np.sqrt(len(traces))),
        "density": {"grid": np.asarray(grid).tolist(), "density": np.asarray(density).tolist()},
    }


def _data(args: argparse.Namespace) -> tuple[Callable, Any, Any, Any, Any]:
    """``(apply, params, x_train, y_train, (x_batch, y_batch))``: the demo's, or the user's."""
    if args.predictor or args.init:
        apply, params, x, y = _base.user_model(args)
        return apply, params, x, y, (x, y)
    (x_train, y_train), _ = _base.load_digits_split(args.seed)
    params = mlp.init(jax.random.key(args.seed), [x_train.shape[1], args.hidden, 10])
    batch = (jnp.asarray(x_train[: args.batch]), jnp.asarray(y_train[: args.batch]))
    return mlp.apply, params, x_train, y_train, batch


def run(args: argparse.Namespace) -> int:
    """Runs ``jxent curvature``; returns the exit code."""
    _base.require("tqdm", *([] if args.no_plot else ["matplotlib"]))
    from tqdm.auto import tqdm

    if args.k > args.iters:
        raise _base.CommandError(
            f"--k {args.k} needs at least as many Lanczos steps: --iters {args.iters}"
        )
    _base.output_folder(args.out)
    start = time.perf_counter()
    apply, params, x_train, y_train, (x, y) = _data(args)
    size = sum(a.size for a in jax.tree.leaves(params))
    what = "your predictor" if args.predictor else f"the demo's MLP 64-{args.hidden}-10 on digits"
    print(f"curvature of the mean cross-entropy of {what} ({size} parameters) on {len(y)} examples")
    programs = _programs(apply, x, y, args)
    results: dict[str, Any] = {}
    stages = [("init", None), ("trained", args.epochs)]
    with tqdm(total=2 * len(stages) + 1, desc="curvature", leave=False) as bar:
        for stage, epochs in stages:
            if epochs:
                bar.set_postfix_str(f"training {epochs} epochs")
                params, history = fit(
                    apply,
                    params,
                    optax.adam(args.lr),
                    (x_train, y_train),
                    epochs=epochs,
                    batch_size=min(64, len(y_train)),  # a user's --batch may be smaller
                    key=jax.random.key(args.seed + 1),
                    progress=False,
                )
                results["train_history"] = history
                bar.update()
            results[stage] = {}
            for name, program in programs.items():
                bar.set_postfix_str(f"{stage}: {name}")
                out = program(params, jax.random.key(args.seed + 2))
                results[stage][name] = _summary(out)
                bar.update()
    results["config"] = {k: v for k, v in vars(args).items() if k != "run"}
    results["seconds"] = time.perf_counter() - start
    _report(results, args.k)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curvature.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {folder / 'curvature.json'}", end="")
    if not args.no_plot:
        _plot(results, folder / "spectrum.png")
        print(f", {folder / 'spectrum.png'}", end="")
    print(f" ({results['seconds']:.0f} s)")
    return 0


def _report(results: dict[str, Any], k: int) -> None:
    print(f"\n{'':8} {'curvature':9} {f'top-{k} eigenvalues':>44}   trace (± standard error)")
    for stage in ("init", "trained"):
        for name in CURVATURES:
            r = results[stage][name]
            top = " ".join(f"{v:8.3g}" for v in r["top_eigenvalues"])
            trace = f"{r['trace']:.4g} ± {r['trace_standard_error']:.2g}"
            print(f"{stage:8} {name:9} {top:>44}   {trace}")
    h0 = results["init"]["hessian"]["top_eigenvalues"][0]
    h1 = results["trained"]["hessian"]["top_eigenvalues"][0]
    print(
        f"\nsharpness (largest Hessian eigenvalue): {h0:.3g} at init, {h1:.3g} trained; the "
        "GGN's is the Gauss-Newton part, always >= 0 (the Hessian's negative eigenvalues are "
        "the predictor's curvature weighted by the gradient)"
    )


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, name in zip(axes, CURVATURES, strict=True):
        for stage, style in (("init", "--"), ("trained", "-")):
            d = results[stage][name]["density"]
            density = np.maximum(np.asarray(d["density"]), 1e-12)
            ax.plot(d["grid"], density, style, label=stage)
        ax.set(yscale="log", xlabel="eigenvalue", title=f"{name} spectral density (SLQ)")
        ax.set_ylim(bottom=1e-6)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    _positive = _base.positive
    parser.add_argument("--epochs", type=_positive, default=10, help="training epochs (10)")
    parser.add_argument("--hidden", type=_positive, default=64, help="demo MLP width (64)")
    parser.add_argument(
        "--lr", type=_base.positive_float, default=3e-3, help="Adam learning rate (3e-3)"
    )
    parser.add_argument("--batch", type=_positive, default=512, help="examples analysed (512)")
    parser.add_argument("--k", type=_positive, default=5, help="top eigenvalues (5)")
    parser.add_argument("--iters", type=_positive, default=40, help="Lanczos steps (40)")
    parser.add_argument("--probes", type=_positive, default=3, help="SLQ probes (3)")
    parser.add_argument(
        "--samples", type=_base.at_least_two, default=20, help="Hutchinson samples, >= 2 (20)"
    )
    parser.add_argument(
        "--predictor",
        help="your predictor as module:function(params, x); it is analysed and trained on "
        "--batch random normal inputs with random labels (a memorisation task)",
    )
    parser.add_argument("--init", help="its initialiser as module:function(key) -> params")
    parser.add_argument("--features", type=_positive, help="input dimension D of your predictor")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    parser.add_argument("--out", default="jxent-curvature", help="output folder (jxent-curvature)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
