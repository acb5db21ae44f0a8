"""What every ``jxent`` command shares: flag types, loading a user's model, one-line failures.

A command that cannot run prints one line and exits 2 (``_main.main`` catches
:class:`CommandError`): a missing optional extra (:func:`require`), a ``--predictor``/``--init``
that cannot be loaded or run (:class:`LoadError`). Commands import this module only, never each
other or ``_main``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jxent._vjp import logits_only

# The optional extra that holds each module a command may need (pyproject's [demo]).
_EXTRA = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "tokenizers": "tokenizers",
}


class CommandError(Exception):
    """A command that could not run: one line on stderr, exit code 2 (1 is a failed check)."""


class LoadError(CommandError):
    """User code that cannot be loaded, or not run on the flags' inputs."""


def require(*modules: str) -> None:
    """Raises :class:`CommandError` naming the extra to install when a module is missing.

    Called before a command starts (its own imports of these modules are inside it), so a base
    install (``pip install jxent``) gets one line, not a ``ModuleNotFoundError`` traceback.
    """
    missing = [_EXTRA.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError(
            f'needs {", ".join(missing)}, not in a base install: pip install "jxent[demo]"'
        )


def positive(text: str) -> int:
    """``argparse`` type of every size flag: an int >= 1 (0 is refused the same way)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def positive_float(text: str) -> float:
    """``argparse`` type of a rate: a finite float > 0 (a learning rate of 0 or nan trains not)."""
    value = float(text)
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, found {text}")
    return value


def output_folder(path: str) -> Path:
    """``path`` created (with its parents), or a one-line :class:`CommandError` saying why not.

    Called before a command's work, so an unwritable ``--out`` fails at once, not at the end.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".jxent-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CommandError(f"cannot write to --out {path}: {first_line(err)}") from err
    return folder


def at_least_two(text: str) -> int:
    """``argparse`` type of a sample count with a standard error: an int >= 2."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a standard error needs >= 2 samples, found {value}")
    return value


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: the one line the CLI prints for a failure."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load(spec: str) -> Callable[..., Any]:
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
            f"{os.getcwd()}): {first_line(err)}"
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


def user_model(args: argparse.Namespace) -> tuple[Callable[..., Any], Any, jax.Array, jax.Array]:
    """``(apply, params, x, labels)`` from ``--predictor``/``--init`` on the flags' random inputs.

    Shared by ``jxent check`` and ``jxent curvature``. Running the user's init and predictor on
    the inputs the flags describe: a failure here is not a failed check (exit 1) but a run that
    could not start (``LoadError``: one line, exit 2).
    """
    if not (args.predictor and args.init and args.features):
        raise LoadError("--predictor needs --init and --features too")
    apply, init = load(args.predictor), load(args.init)
    k_init, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(k_x, (args.batch, args.features))
    try:
        params = init(k_init)
        leaves = jax.tree_util.tree_leaves_with_path(params)
        for path, leaf in leaves:
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                where = jax.tree_util.keystr(path) or "params"
                raise TypeError(
                    f"parameters must be floating arrays, found {jnp.asarray(leaf).dtype} at "
                    f"{where}"
                )
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
            f"params from {args.init}: {first_line(err)}"
        ) from err
    y = jax.random.randint(k_y, (args.batch,), 0, logits.shape[-1])
    return apply, params, x, y


def load_digits_split(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), a seeded 80/20 split."""
    require("sklearn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> [0, 1]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = int(0.8 * len(x))
    train, test = order[:n_train], order[n_train:]
    return (x[train], y[train]), (x[test], y[test])
