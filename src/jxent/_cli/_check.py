"""``jxent check``: the hand-derived gradient against the plain loss's autodiff and FD.

Checks the built-in predictors (float32 and float64), a user's ``--predictor``/``--init``, or
(``--demo-mistakes``) shows the checker catching the classic mistakes.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from jxent._check import MISTAKES, check_grads
from jxent._cli import _base
from jxent._vjp import grad as hand_grad
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


def _check_user(args: argparse.Namespace) -> bool:
    apply, params, x, y = _base.user_model(args)
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


def run(args: argparse.Namespace) -> int:
    """Runs ``jxent check``; returns the exit code (1: a check failed)."""
    if args.demo_mistakes:
        if args.predictor or args.init:
            raise _base.CommandError(
                "--demo-mistakes shows built-in mistakes: it takes no --predictor"
            )
        return 0 if _demo_mistakes() else 1
    if args.predictor or args.init:
        return 0 if _check_user(args) else 1
    ok = _check_builtin(jnp.float32)
    with jax.enable_x64(True):
        ok &= _check_builtin(jnp.float64)
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument(
        "--demo-mistakes",
        action="store_true",
        help="show the checker diagnosing the classic mistakes",
    )
    parser.add_argument("--predictor", help="your predictor as module:function(params, x)")
    parser.add_argument("--init", help="its initialiser as module:function(key) -> params")
    parser.add_argument(
        "--features", type=_base.positive, help="input dimension D of your predictor"
    )
    parser.add_argument("--batch", type=_base.positive, default=8, help="batch size (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
