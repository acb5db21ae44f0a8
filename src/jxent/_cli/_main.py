"""The ``jxent`` parser and entry point: one sub-command per module, failures in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jxent._cli import _base, _check, _curvature, _demo, _demo_lm


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
        "1 a gradient check failed (with --demo-mistakes: a mistake was not caught), 2 bad "
        "usage or a --predictor/--init that cannot be loaded.",
    )
    _check.add_arguments(check)
    check.set_defaults(run=_check.run)
    curvature = sub.add_parser(
        "curvature",
        help="Hessian and GGN spectra (top eigenvalues, traces, density) at init and trained",
        description="Top-k eigenvalues (Lanczos), Hutchinson trace estimates and the spectral "
        "density (stochastic Lanczos quadrature) of the Hessian and the Gauss-Newton matrix "
        "of the loss, at initialisation and after training; JSON and a PNG. Default: the "
        "demo's MLP on digits. Exit 2: a --predictor/--init that cannot be loaded.",
    )
    _curvature.add_arguments(curvature)
    curvature.set_defaults(run=_curvature.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jxent`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit code: 0 success, 1 a check that ran and failed, 2 bad usage or a
        command that could not run (one line on stderr: a missing extra, user code).
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except _base.CommandError as err:
        name = " ".join(filter(None, [args.command, getattr(args, "demo_kind", None)]))
        print(f"jxent {name}: {err}", file=sys.stderr)
        return 2
