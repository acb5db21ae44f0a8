"""The ``jxent`` command: ``jxent demo`` (and ``demo lm``), ``jxent check``, ``jxent curvature``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jxent import _curvature_cli, _demo, _demo_lm
from jxent._check import check_grads
from jxent._mistakes import MISTAKES
from jxent._vjp import grad as hand_grad
from jxent._vjp import logits_only
from jxent.predictors import embedding, linear, mlp


def builtin_instances(key: jax.Array, dtype: Any = jnp.float64) -> dict[str, tuple]:
    """Small instances ``name -> (apply, params, x, labels)`` of the built-in predictors."""
    k_x, k_y, k_lin, k_mlp, k_emb = jax.random.split(key, 5)
    batch, features, classes = 8, 5, 4
    x = jax.random.normal(k_x, (batch, features), dtype)
    y = jax.random.randint(k_y, (batch,), 0, classes)
    return {
        "linear": (linear.apply, linear.init(k_lin, features, classes, dtype), x, y),
        "mlp": (mlp.apply, mlp.init(k_mlp, [features, 6, 6, classes], dtype), x, y),
        "embedding": (embedding.apply, embedding.init(k_emb, features, classes, 3, dtype), x, y),
    }


def _check_builtin(dtype: Any) -> bool:
    ok = True
    for name, (apply, params, x, y) in builtin_instances(jax.random.key(0), dtype).items():
        report = check_grads(hand_grad(apply), apply, params, x, y)
        print(
            f"== {name} predictor, {jnp.dtype(dtype).name} inputs: jxent.grad vs jax.grad of "
            "the plain loss and float64 finite differences"
        )
        print(report, end="\n\n")
        ok &= report.ok
    return ok


def user_model(args: argparse.Namespace) -> tuple[Callable[..., Any], Any, jax.Array, jax.Array]:
    """``(apply, params, x, labels)`` from ``--predictor``/``--init`` on the flags' random inputs.

    Shared by ``jxent check`` and ``jxent curvature``. Running the user's init and predictor on
    the inputs the flags describe: a failure here is not a failed check (exit 1) but a run that
    could not start (``LoadError``: one line, exit 2).
    """
    if not (args.predictor and args.init and args.features):
        raise LoadError("--predictor needs --init and --features too")
    apply, init = _load(args.predictor), _load(args.init)
    k_init, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(k_x, (args.batch, args.features))
    try:
        params = init(k_init)
        logits = jax.eval_shape(lambda p, x: logits_only(apply(p, x)), params, x)
        if len(logits.shape) != 2 or logits.shape[0] != args.batch:
            raise ValueError(
                f"the predictor must map x of shape {x.shape} to logits of shape "
                f"({args.batch}, classes), found {logits.shape}"
            )
        if not jnp.issubdtype(logits.dtype, jnp.floating):
            raise TypeError(f"the predictor's logits must be floating, found {logits.dtype}")
    except Exception as err:
        raise LoadError(
            f"cannot run {args.predictor} on x of shape {x.shape} (--batch, --features) with "
            f"params from {args.init}: {_first_line(err)}"
        ) from err
    y = jax.random.randint(k_y, (args.batch,), 0, logits.shape[-1])
    return apply, params, x, y


def _check_user(args: argparse.Namespace) -> bool:
    apply, params, x, y = user_model(args)
    report = check_grads(hand_grad(apply), apply, params, x, y)
    print(
        f"== {args.predictor}: jxent.grad vs jax.grad of the plain loss and float64 finite "
        "differences"
    )
    print(report)
    return report.ok


def _demo_mistakes() -> bool:
    print(
        "Three deliberately wrong gradients of the linear predictor, each checked like yours.\n"
        "Each report below is EXPECTED to say FAIL, with the diagnosis; the command succeeds\n"
        "(exit 0) when all three are caught, and fails (exit 1) if one slips through.\n"
    )
    apply, params, x, y = builtin_instances(jax.random.key(0), jnp.float32)["linear"]
    caught = True
    for title, wrong in MISTAKES.items():
        report = check_grads(wrong, apply, params, x, y)
        print(f"== {title} (a FAIL is expected)")
        print(report, end="\n\n")
        caught &= not report.ok
    print(
        "all three mistakes caught and diagnosed: the FAILs above are the checker working"
        if caught
        else "a mistake was NOT caught"
    )
    return caught


class LoadError(Exception):
    """A check that could not run: user code not loadable or not runnable on the flags' inputs.

    Exit code 2, distinct from 1 (a gradient check that ran and failed).
    """


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``: the one line the CLI prints for a failure."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _load(spec: str) -> Callable[..., Any]:
    """Imports ``module:function``, from the current directory first (as ``python -m`` does)."""
    module_name, sep, name = spec.partition(":")
    if not (sep and module_name and name):
        raise LoadError(f"expected module:function (e.g. mymodel:apply), found {spec!r}")
    # The console script's sys.path starts with its own bin/ folder, not the current directory:
    # put the working directory first so `jxent check --predictor mymodel:apply` finds mymodel.py.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing the user's module is a load failure
        raise LoadError(
            f"cannot import module {module_name!r} (from {spec!r}, searched from "
            f"{os.getcwd()}): {_first_line(err)}"
        ) from err
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise LoadError(
            f"module {module_name!r} has no attribute {name!r} (from {spec!r})"
        ) from None
    if not callable(fn):
        raise LoadError(f"{spec!r} is a {type(fn).__name__}, not a function")
    return fn


def _check(args: argparse.Namespace) -> int:
    if args.demo_mistakes:
        return 0 if _demo_mistakes() else 1
    if args.predictor or args.init:
        return 0 if _check_user(args) else 1
    ok = _check_builtin(jnp.float32)
    with jax.enable_x64(True):
        ok &= _check_builtin(jnp.float64)
    return 0 if ok else 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jxent",
        description="Softmax cross-entropy with a hand-derived gradient, proven against "
        "autodiff and finite differences.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="check the hand-derived gradient, then train an MLP on the bundled digits data",
    )
    _demo.add_arguments(demo)
    demo.set_defaults(run=_demo.run)
    kinds = demo.add_subparsers(dest="demo_kind", required=False, metavar="{lm}")
    lm = kinds.add_parser(
        "lm",
        help="train a small transformer language model with linear_cross_entropy",
        description="Train a small decoder-only transformer on the Python standard library's "
        "source (or --corpus) with a byte-level BPE tokenizer and jxent.linear_cross_entropy; "
        "report losses, perplexity, tokens/s, and the peak memory of a training step with the "
        "fused head against materialised logits.",
    )
    _demo_lm.add_arguments(lm)
    lm.set_defaults(run=_demo_lm.run)
    check = sub.add_parser(
        "check",
        help="check jxent's hand-derived gradient (or diagnose classic mistakes)",
        description="Compare the hand-derived gradient with jax.grad of the plain loss "
        "(log_softmax, no jxent derivative) and float64 finite differences. Exit codes: 0 pass, "
        "1 a gradient check failed (with --demo-mistakes: a "
        "mistake was not caught), 2 bad usage or a --predictor/--init that cannot be loaded.",
    )
    check.add_argument(
        "--demo-mistakes",
        action="store_true",
        help="show the checker diagnosing the classic mistakes",
    )
    check.add_argument("--predictor", help="your predictor as module:function(params, x)")
    check.add_argument("--init", help="its initialiser as module:function(key) -> params")
    check.add_argument("--features", type=_positive, help="input dimension D of your predictor")
    check.add_argument("--batch", type=_positive, default=8, help="batch size (default 8)")
    check.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    check.set_defaults(run=_check)
    curvature = sub.add_parser(
        "curvature",
        help="Hessian and GGN spectra (top eigenvalues, traces, density) at init and trained",
        description="Top-k eigenvalues (Lanczos), Hutchinson trace estimates and the spectral "
        "density (stochastic Lanczos quadrature) of the Hessian and the Gauss-Newton matrix "
        "of the loss, at initialisation and after training; JSON and a PNG. Default: the "
        "demo's MLP on digits. Exit 2: a --predictor/--init that cannot be loaded.",
    )
    _curvature_cli.add_arguments(curvature)
    curvature.set_defaults(run=_curvature_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jxent`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit code.
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except LoadError as err:
        print(f"jxent {args.command}: {err}", file=sys.stderr)
        return 2
