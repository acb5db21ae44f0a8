r"""A gradient checker that says *why* a gradient is wrong.

A candidate gradient is compared, leaf by leaf, with two float64 references: ``jax.grad`` of the
full loss and central finite differences. A failing leaf is then classified by fitting the
simplest explanation -- zero, transposed, a multiple :math:`c \cdot g` of the truth (sign
flipped when :math:`c = -1`, sum vs mean when :math:`c = B` or :math:`1/B`) -- and the report
combines the leaves into one verdict.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jxent import _fd
from jxent._loss import softmax_cross_entropy
from jxent._options import check_option_names

PyTree = Any


class Kind(enum.Enum):
    """What a gradient check found."""

    OK = "ok"
    SIGN_FLIPPED = "sign flipped"
    SCALED = "scaled"
    ZERO = "zero"
    TRANSPOSED = "transposed"
    SOME_LEAVES_WRONG = "some leaves wrong"
    FLOAT32_NOISE = "float32 noise"
    AUTODIFF_DISAGREES_WITH_FD = "autodiff disagrees with finite differences"
    STRUCTURE_MISMATCH = "structure mismatch"
    UNEXPLAINED = "unexplained"


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """A typed verdict: its kind, a sentence for people, and the figures behind it.

    Attributes:
        kind: The :class:`Kind`.
        message: One readable sentence.
        scale: For ``SCALED``/``SIGN_FLIPPED``: the fitted :math:`c` in candidate = c * truth.
        leaves: The leaf paths concerned (``SOME_LEAVES_WRONG`` names the wrong ones).
    """

    kind: Kind
    message: str
    scale: float | None = None
    leaves: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """The check of one parameter leaf.

    Attributes:
        path: The leaf's pytree path, e.g. ``[1][0]`` or ``['encoder']['w']``.
        shape: Its shape.
        max_abs_error: max |candidate - jax.grad| over the leaf.
        max_rel_error: ``max_abs_error`` / max |jax.grad| (norm-wise relative error).
        fd_rel_error: max |candidate - finite differences| / max |jax.grad| over the checked
            entries (``nan`` when no entry of this leaf was differenced).
        fd_entries: How many entries were differenced.
        passed: Whether both comparisons are within tolerance.
        diagnosis: Why not, when not.
    """

    path: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    fd_rel_error: float
    fd_entries: int
    passed: bool
    diagnosis: Diagnosis


class GradientCheckError(AssertionError):
    """Raised by :meth:`GradCheckReport.raise_if_failed`; its message is the report."""


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """Result of :func:`check_grads`.

    Attributes:
        leaves: One :class:`LeafReport` per parameter leaf.
        ok: Whether every leaf passed.
        diagnosis: The overall verdict.
        notes: Further findings that do not fail the check (e.g. ``FLOAT32_NOISE``).
        rtol: Relative tolerance used (of max |jax.grad| per leaf).
        atol: Absolute tolerance used.
        fd_method: How the finite differences were taken, in words.
    """

    leaves: tuple[LeafReport, ...]
    ok: bool
    diagnosis: Diagnosis
    notes: tuple[Diagnosis, ...]
    rtol: float
    atol: float
    fd_method: str

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.leaves] + [4])
        lines = [
            f"{'leaf':<{width}}  {'shape':<12} {'vs jax.grad':>11} {'vs FD':>9} {'FD n':>5}"
            "  verdict"
        ]
        for r in self.leaves:
            verdict = "ok" if r.passed else r.diagnosis.kind.value
            if r.diagnosis.kind is Kind.SCALED and not r.passed:
                verdict += f" (x{r.diagnosis.scale:.4g})"
            fd = "-" if np.isnan(r.fd_rel_error) else f"{r.fd_rel_error:.1e}"
            lines.append(
                f"{r.path:<{width}}  {r.shape!s:<12} {r.max_rel_error:>11.1e} {fd:>9} "
                f"{r.fd_entries:>5}  {verdict}"
            )
        lines.append(
            f"{'PASS' if self.ok else 'FAIL'}: {self.diagnosis.message} "
            f"(rtol={self.rtol:g}, atol={self.atol:g}; {self.fd_method})"
        )
        lines += [f"note: {n.message}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raises :class:`GradientCheckError` with the rendered report unless ``ok``."""
        if not self.ok:
            raise GradientCheckError("gradient check failed\n" + str(self))


DEFAULT_RTOL = {jnp.float64: 1e-6, jnp.float32: 1e-4}


def check_grads(
    grad_fn: Callable[[PyTree, Any, Any], PyTree],
    predictor: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    x: Any,
    labels: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    fd: str = "entries",
    max_full_leaf: int = 64,
    samples_per_leaf: int = 16,
    directions: int = 8,
    seed: int = 0,
    float32_noise_check: bool = True,
    **loss_options: Any,
) -> GradCheckReport:
    r"""Checks a candidate gradient of softmax cross-entropy on ``predictor`` and says why not.

    The reference is :math:`J(\theta) = \text{loss}(h(\theta, x), y)` with the given loss options,
    evaluated in float64 (x64 is enabled for the check only and the previous setting restored).
    ``grad_fn(params, x, labels)`` runs on the inputs as given (float32 stays float32).

    Each leaf passes when :math:`\max|c - g| \le \text{atol} + \text{rtol}\max|g|` for both
    :math:`g` = ``jax.grad`` (all entries) and :math:`g` = central finite differences (checked
    entries). Finite differences (``fd``):

    * ``"entries"`` (default): every entry of leaves with at most ``max_full_leaf`` entries, and
      ``samples_per_leaf`` entries drawn without replacement (seeded by ``seed``) from larger
      leaves. One compiled function differences all leaves, two loss evaluations per entry.
    * ``"directions"``: ``directions`` random Gaussian directions :math:`v` over the whole pytree,
      comparing :math:`\langle c, v\rangle` with :math:`(J(\theta+hv) - J(\theta-hv))/2h`; cheap
      for huge models but only an overall figure (shown on every leaf).

    Failing leaves are diagnosed as ``ZERO`` (the summed-over-classes mistake), ``TRANSPOSED``,
    ``SIGN_FLIPPED`` or ``SCALED`` (least-squares fit :math:`c = \langle c, g\rangle/\langle g,g
    \rangle`, naming the batch size when :math:`c \approx B` or :math:`1/B`), else
    ``UNEXPLAINED``; the overall verdict is their common kind or ``SOME_LEAVES_WRONG``. A passing
    float32 candidate also gets a ``FLOAT32_NOISE`` note when a float32 finite-difference check
    would have failed it.

    Args:
        grad_fn: The candidate, ``grad_fn(params, x, labels) -> grads`` shaped like ``params``.
        predictor: ``predictor(params, x) -> logits``.
        params: Parameter pytree at which to check.
        x: Inputs.
        labels: Integer labels or probabilities.
        rtol: Relative tolerance; default 1e-6 for float64 candidates, 1e-4 for float32 (float32
            gradients of O(1e6)-parameter models carry ~1e-6..1e-5 relative rounding).
        atol: Absolute tolerance; default ``1e-3 * rtol``.
        fd: ``"entries"`` or ``"directions"``.
        max_full_leaf: Leaves up to this many entries are differenced at every entry.
        samples_per_leaf: Entries differenced per larger leaf.
        directions: Number of random directions for ``fd="directions"``.
        seed: Seed of the entry sample and the directions.
        float32_noise_check: Whether to also run a float32 finite-difference check (for the
            ``FLOAT32_NOISE`` note) on float32 candidates.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad` defining the loss.

    Returns:
        A :class:`GradCheckReport`; ``str()`` renders a table, ``.raise_if_failed()`` raises.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 3, 4)
        >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 2, 3, 0])
        >>> report = jxent.check_grads(jxent.grad(linear.apply), linear.apply, params, x, y)
        >>> report.ok, report.diagnosis.kind
        (True, <Kind.OK: 'ok'>)
    """
    check_option_names(loss_options, "check_grads")
    if fd not in ("entries", "directions"):
        raise ValueError(f"fd must be 'entries' or 'directions', found {fd!r}")
    candidate = grad_fn(params, x, labels)
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in paths_and_leaves]
    if jax.tree.structure(candidate) != jax.tree.structure(params):
        diag = Diagnosis(
            Kind.STRUCTURE_MISMATCH,
            f"the candidate's pytree {jax.tree.structure(candidate)} is not the params' "
            f"{jax.tree.structure(params)}",
        )
        return GradCheckReport((), False, diag, (), float("nan"), float("nan"), "not run")
    cand = [np.asarray(c, np.float64) for c in jax.tree.leaves(candidate)]
    float32 = any(np.asarray(c).dtype != np.float64 for c in jax.tree.leaves(candidate))
    rtol = DEFAULT_RTOL[jnp.float32 if float32 else jnp.float64] if rtol is None else rtol
    atol = 1e-3 * rtol if atol is None else atol
    batch = int(np.prod(np.shape(labels)[: np.ndim(labels) - (0 if _is_int(labels) else 1)]))

    with jax.enable_x64(True):
        params64 = _to_dtype(params, jnp.float64)
        x64 = _to_dtype(x, jnp.float64)
        labels64 = jnp.asarray(labels) if _is_int(labels) else _to_dtype(labels, jnp.float64)

        def loss(p: PyTree) -> jax.Array:
            return softmax_cross_entropy(predictor(p, x64), labels64, **loss_options)

        reference = [np.asarray(r) for r in jax.tree.leaves(jax.grad(loss)(params64))]
        rng = np.random.default_rng(seed)
        if fd == "entries":
            chosen = [_choose(r.size, max_full_leaf, samples_per_leaf, rng) for r in reference]
            fd_values = [
                np.asarray(v) for v in _fd.finite_difference_entries(loss, params64, chosen)
            ]
            fd_errors = [
                _fd_error(c.ravel()[idx], v, r)
                for c, r, idx, v in zip(cand, reference, chosen, fd_values, strict=True)
            ]
            fd_counts = [len(idx) for idx in chosen]
            method = f"finite differences: all entries of leaves <= {max_full_leaf}, "
            method += f"{samples_per_leaf} sampled (seed {seed}) of larger ones, float64"
        else:
            err = _directional_error(loss, params64, cand, reference, directions, rng)
            fd_errors = [err] * len(cand)
            fd_counts = [0] * len(cand)
            method = f"finite differences along {directions} random directions (seed {seed})"
        fd32_error = None
        if fd == "entries" and float32 and float32_noise_check:
            x32, params32 = _to_dtype(x, jnp.float32), _to_dtype(params, jnp.float32)

            def loss32(p: PyTree) -> jax.Array:
                return softmax_cross_entropy(predictor(p, x32), labels, **loss_options)

            fd32_error = _float32_fd_error(loss32, params32, chosen, reference)

    leaf_reports = []
    for path, c, r, fd_err, n in zip(paths, cand, reference, fd_errors, fd_counts, strict=True):
        leaf_reports.append(_leaf_report(path, c, r, fd_err, n, rtol, atol, batch))
    return _summarise(tuple(leaf_reports), rtol, atol, method, batch, fd32_error)


def _is_int(a: Any) -> bool:
    return jnp.issubdtype(jnp.asarray(a).dtype, jnp.integer)


def _to_dtype(tree: PyTree, dtype: Any) -> PyTree:
    def cast(a: Any) -> Any:
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)


def _choose(size: int, max_full: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    if size <= max_full:
        return np.arange(size)
    return np.sort(rng.choice(size, size=min(samples, size), replace=False))


def _fd_error(cand: np.ndarray, fd_values: np.ndarray, reference: np.ndarray) -> float:
    if cand.size == 0:
        return float("nan")
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return float(np.max(np.abs(cand - fd_values))) / (scale or 1.0)


def _directional_error(
    loss: Callable[[PyTree], jax.Array],
    params64: PyTree,
    cand: list[np.ndarray],
    reference: list[np.ndarray],
    count: int,
    rng: np.random.Generator,
) -> float:
    leaves, treedef = jax.tree.flatten(params64)
    step = _fd.DEFAULT_STEP
    errs, scales = [], []
    for _ in range(count):
        v = [rng.standard_normal(np.shape(leaf)) for leaf in leaves]
        plus = treedef.unflatten([a + step * d for a, d in zip(leaves, v, strict=True)])
        minus = treedef.unflatten([a - step * d for a, d in zip(leaves, v, strict=True)])
        fd_value = float(loss(plus) - loss(minus)) / (2 * step)
        errs.append(abs(sum(float(np.vdot(c, d)) for c, d in zip(cand, v, strict=True)) - fd_value))
        scales.append(abs(sum(float(np.vdot(r, d)) for r, d in zip(reference, v, strict=True))))
    return max(errs) / (max(scales) or 1.0)


def _float32_fd_error(
    loss32: Callable[[PyTree], jax.Array],
    params32: PyTree,
    chosen: list[np.ndarray],
    reference: list[np.ndarray],
) -> float:
    """What a float32 finite-difference check (naive step 1e-6) would report against the truth."""
    values = _fd.finite_difference_entries(loss32, params32, chosen, step=1e-6)
    errors = [
        _fd_error(r.ravel()[idx], np.asarray(v, np.float64), r)
        for r, idx, v in zip(reference, chosen, values, strict=True)
        if len(idx)
    ]
    return max(errors, default=0.0)


def _leaf_report(
    path: str,
    cand: np.ndarray,
    ref: np.ndarray,
    fd_err: float,
    fd_count: int,
    rtol: float,
    atol: float,
    batch: int,
) -> LeafReport:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if cand.shape != ref.shape:
        transposed = cand.ndim == 2 and cand.T.shape == ref.shape
        if transposed and _close(cand.T, ref, rtol, atol, scale):
            diag = Diagnosis(
                Kind.TRANSPOSED, f"{path} is the transpose of the gradient", None, (path,)
            )
        else:
            diag = Diagnosis(
                Kind.STRUCTURE_MISMATCH,
                f"{path} has shape {cand.shape}, expected {ref.shape}",
                None,
                (path,),
            )
        return LeafReport(path, ref.shape, np.inf, np.inf, fd_err, fd_count, False, diag)
    abs_err = float(np.max(np.abs(cand - ref))) if ref.size else 0.0
    rel_err = abs_err / (scale or 1.0)
    ok_auto = abs_err <= atol + rtol * scale
    ok_fd = np.isnan(fd_err) or fd_err * (scale or 1.0) <= atol + max(rtol, 1e-6) * scale
    if ok_auto and ok_fd:
        diag = Diagnosis(Kind.OK, f"{path} matches", None, (path,))
    elif ok_auto:
        diag = Diagnosis(
            Kind.AUTODIFF_DISAGREES_WITH_FD,
            f"{path} equals jax.grad but both differ from finite differences "
            f"({fd_err:.1e}): the predictor's own derivative (a custom_vjp, a kink such as relu "
            "at 0, a non-smooth op) is suspect",
            None,
            (path,),
        )
    else:
        diag = _classify(path, cand, ref, rtol, atol, scale, batch)
    return LeafReport(path, ref.shape, abs_err, rel_err, fd_err, fd_count, ok_auto and ok_fd, diag)


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float, scale: float) -> bool:
    return float(np.max(np.abs(a - b))) <= atol + rtol * scale


def _classify(
    path: str,
    cand: np.ndarray,
    ref: np.ndarray,
    rtol: float,
    atol: float,
    scale: float,
    batch: int,
) -> Diagnosis:
    # Fits are judged at a looser tolerance than the pass test: a candidate that is "-1 times
    # the truth up to float32 rounding" is still a sign flip.
    fit_tol = max(rtol, 1e-3)
    if float(np.max(np.abs(cand))) <= atol + fit_tol * scale:
        return Diagnosis(
            Kind.ZERO,
            f"{path} is zero where the gradient is not (max |g| = {scale:.3g}); summing "
            "(1{y=l} - p_l) over classes gives exactly this",
            0.0,
            (path,),
        )
    if (
        cand.ndim == 2
        and cand.shape[0] == cand.shape[1]
        and _close(cand.T, ref, fit_tol, atol, scale)
    ):
        return Diagnosis(Kind.TRANSPOSED, f"{path} is the transpose of the gradient", None, (path,))
    denom = float(np.vdot(ref, ref))
    c = float(np.vdot(cand, ref)) / denom if denom else 0.0
    if c and float(np.max(np.abs(cand - c * ref))) <= atol + fit_tol * abs(c) * scale:
        if abs(c + 1.0) <= fit_tol:
            return Diagnosis(
                Kind.SIGN_FLIPPED,
                f"{path} is -1 x the gradient: (1{{y=l}} - p) written instead of (p - 1{{y=l}})",
                c,
                (path,),
            )
        return Diagnosis(Kind.SCALED, f"{path} is {_describe_scale(c, batch)}", c, (path,))
    return Diagnosis(
        Kind.UNEXPLAINED,
        f"{path} differs from the gradient by {float(np.max(np.abs(cand - ref))) / scale:.2e} "
        "relative, not by a sign, scale, transpose or zero",
        None,
        (path,),
    )


def _describe_scale(c: float, batch: int) -> str:
    text = f"{c:.6g} x the gradient"
    sign = "" if c > 0 else ", with the sign flipped"
    for factor, meaning in ((batch, "summed instead of averaged"), (1 / batch, "averaged twice")):
        if batch > 1 and abs(abs(c) / factor - 1.0) < 1e-3:
            return f"{text}: batch size {batch}, {meaning} (sum vs mean){sign}"
    return text + sign


def _summarise(
    leaves: tuple[LeafReport, ...],
    rtol: float,
    atol: float,
    method: str,
    batch: int,
    fd32_error: float | None,
) -> GradCheckReport:
    failed = [r for r in leaves if not r.passed]
    notes: list[Diagnosis] = []
    if fd32_error is not None and fd32_error > rtol and not failed:
        notes.append(
            Diagnosis(
                Kind.FLOAT32_NOISE,
                f"float32 noise: this gradient agrees with autodiff, but a float32 "
                f"finite-difference check (step 1e-6) would report a relative error of "
                f"{fd32_error:.1e} (> rtol {rtol:g}) and fail it; float32 differences are too "
                "noisy to decide, which is why this check differences in float64",
                None,
                (),
            )
        )
    if not failed:
        diag = Diagnosis(Kind.OK, f"all {len(leaves)} leaves match jax.grad and finite differences")
        return GradCheckReport(leaves, True, diag, tuple(notes), rtol, atol, method)
    names = tuple(r.path for r in failed)
    kinds = {r.diagnosis.kind for r in failed}
    scales = [r.diagnosis.scale for r in failed]
    if len(failed) < len(leaves):
        detail = "; ".join(r.diagnosis.message for r in failed)
        diag = Diagnosis(
            Kind.SOME_LEAVES_WRONG,
            f"{len(failed)} of {len(leaves)} leaves wrong ({', '.join(names)}): {detail}",
            None,
            names,
        )
    elif len(kinds) == 1 and (kinds != {Kind.SCALED} or np.allclose(scales, scales[0], rtol=1e-3)):
        first = failed[0].diagnosis
        message = first.message.replace(failed[0].path, "every leaf", 1)
        diag = Diagnosis(first.kind, message, first.scale, names)
    else:
        detail = "; ".join(r.diagnosis.message for r in failed)
        diag = Diagnosis(
            Kind.UNEXPLAINED, f"every leaf is wrong, differently: {detail}", None, names
        )
    return GradCheckReport(leaves, False, diag, tuple(notes), rtol, atol, method)
