"""The ``jxent`` command: ``jxent demo`` and ``jxent check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jxent import _fd
from jxent._loss import softmax_cross_entropy
from jxent._vjp import grad as hand_grad
from jxent.predictors import embedding, linear, mlp


def builtin_instances(key: jax.Array, dtype: object = jnp.float64) -> dict[str, tuple]:
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


def _max_rel(a: object, b: object) -> float:
    errs = jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
    return max(float(e) for e in errs) / scale


def _demo_gradient_table() -> bool:
    print("Hand-derived gradient vs jax.grad and float64 central differences")
    print(f"{'predictor':<10} {'params':>7} {'vs jax.grad':>12} {'vs finite diff':>15}  verdict")
    ok = True
    with jax.enable_x64(True):
        for name, (apply, params, x, y) in builtin_instances(jax.random.key(0)).items():
            hand = hand_grad(apply)(params, x, y)

            def loss(p, apply=apply, x=x, y=y):
                return softmax_cross_entropy(apply(p, x), y)

            auto = jax.grad(loss)(params)
            fd = _fd.finite_difference_grad(loss, params)
            e_auto, e_fd = _max_rel(hand, auto), _max_rel(hand, fd)
            passed = e_auto <= 1e-10 and e_fd <= 1e-6
            ok &= passed
            size = sum(leaf.size for leaf in jax.tree.leaves(params))
            verdict = "ok" if passed else "MISMATCH"
            print(f"{name:<10} {size:>7} {e_auto:>12.1e} {e_fd:>15.1e}  {verdict}")
    print("(max abs error / max |gradient|; pass: <= 1e-10 vs autodiff, <= 1e-6 vs differences)")
    return ok


def _demo(args: argparse.Namespace) -> int:
    return 0 if _demo_gradient_table() else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jxent",
        description="Softmax cross-entropy with a hand-derived gradient, proven against "
        "autodiff and finite differences.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check the hand-derived gradient of built-in predictors")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jxent`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit code.
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)
