r"""A gradient checker that says *why* a gradient is wrong.

A candidate gradient is compared, leaf by leaf, with two float64 references that share no code
with jxent's derivative: ``jax.grad`` of the plain loss (``_plain.plain_loss``: ``log_softmax``
and an explicit target, differentiated by JAX's autodiff -- not ``jax.grad`` of
``jxent.softmax_cross_entropy``, which runs jxent's own rule) and central finite differences of
that same plain loss. A failing leaf is then classified by fitting the
simplest explanation -- zero, transposed, a multiple :math:`c \cdot g` of the truth (sign
flipped when :math:`c = -1`, sum vs mean when :math:`c = B` or :math:`1/B`) -- and the report
combines the leaves into one verdict.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jxent import _fd
from jxent._check import _programs
from jxent._loss import prepare_problem
from jxent._options import check_option_names, require_scalar
from jxent._vjp import logits_only

PyTree = Any


class Kind(enum.Enum):
    """What a gradient check found."""

    OK = "ok"
    SIGN_FLIPPED = "sign flipped"
    SCALED = "scaled"
    ZERO = "zero"
    TRANSPOSED = "transposed"
    SOME_LEAVES_WRONG = "some leaves wrong"
    FLOAT32_NOISE = "float32 noise"  # also for bfloat16/float16 candidates: low-precision noise
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
        max_abs_error: max |candidate - jax.grad of the plain loss| over the leaf.
        max_rel_error: ``max_abs_error`` / max |that gradient| (norm-wise relative error).
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
            f"{'leaf':<{width}}  {'shape':<12} {'vs plain AD':>11} {'vs FD':>9} {'FD n':>5}"
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


# Default rtol per candidate dtype (the least precise leaf decides), relative to max|g| per leaf.
# float64: rounding ~1e-16 per operation leaves six orders of margin. float32: gradients of
# O(1e6)-parameter models carry ~1e-6..1e-5 relative rounding. bfloat16 (8 significant bits,
# unit roundoff u = 2^-8) and float16 (11 bits, u = 2^-11): correct gradients of the built-in
# predictors computed in them were off by up to 2.6e-2 (bf16, ~7 u) and 1.9e-3 (f16, ~4 u)
# over 5 seeds; 16 u (2^-4, 2^-7) covers both with margin, and a sign flip (error 2), a zero
# (1), a factor 2 (1) or 1/2 (0.5) still fail by far.
DEFAULT_RTOL = {"float64": 1e-6, "float32": 1e-4, "float16": 2.0**-7, "bfloat16": 2.0**-4}
# The finite-difference step a user would naturally try in each low precision, for the note.
NAIVE_STEP = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}
# Entries per leaf differenced in the candidate's low precision for the noise note.
NOISE_ENTRIES_PER_LEAF = 4


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

    The reference is :math:`J(\theta) = \text{loss}(h(\theta, x), y)` with the given loss options
    and the plain loss (no jxent derivative under it, see the module notes),
    evaluated in float64 (x64 is enabled for the check only and the previous setting restored).
    ``grad_fn(params, x, labels)`` runs on the inputs as given (float32 stays float32).

    Each leaf passes when :math:`\max|c - g| \le \text{atol} + \text{rtol}\max|g|` for both
    :math:`g` = ``jax.grad`` of the plain loss (all entries) and :math:`g` = central finite
    differences (checked entries). Finite differences (``fd``):

    * ``"entries"`` (default): every entry of leaves with at most ``max_full_leaf`` entries, and
      ``samples_per_leaf`` entries drawn without replacement (seeded by ``seed``) from larger
      leaves. One compiled function differences all leaves, two loss evaluations per entry.
    * ``"directions"``: ``directions`` random Gaussian directions :math:`v` over the whole pytree,
      comparing :math:`\langle c, v\rangle` with :math:`(J(\theta+hv) - J(\theta-hv))/2h`; cheap
      for huge models but only an overall figure (shown on every leaf).

    Failing leaves are diagnosed as ``ZERO`` (the summed-over-classes mistake), ``TRANSPOSED``,
    ``SIGN_FLIPPED`` or ``SCALED`` (least-squares fit :math:`c = \langle c, g\rangle/\langle g,g
    \rangle`, naming the count when :math:`c \approx n` or :math:`1/n` for the batch size, the
    number of classes, the counted examples or their class-weight sum -- every one that matches,
    when several do), else
    ``UNEXPLAINED``; the overall verdict is their common kind or ``SOME_LEAVES_WRONG``. A passing
    low-precision candidate (float32, bfloat16, float16) also gets a ``FLOAT32_NOISE`` note when a
    finite-difference check in its own dtype (step ``NAIVE_STEP``, on the first
    ``NOISE_ENTRIES_PER_LEAF`` checked entries of each leaf) would have failed it.

    Args:
        grad_fn: The candidate, ``grad_fn(params, x, labels) -> grads`` shaped like ``params``.
        predictor: ``predictor(params, x) -> logits``.
        params: Parameter pytree at which to check.
        x: Inputs.
        labels: Integer labels or probabilities.
        rtol: Relative tolerance; default by the candidate's least precise dtype (``DEFAULT_RTOL``):
            1e-6 float64, 1e-4 float32, 2^-7 float16, 2^-4 bfloat16 (16 units of roundoff of
            the 16-bit types; the comment at ``DEFAULT_RTOL`` gives the measurements).
        atol: Absolute tolerance; default ``1e-3 * rtol``.
        fd: ``"entries"`` or ``"directions"``.
        max_full_leaf: Leaves up to this many entries are differenced at every entry.
        samples_per_leaf: Entries differenced per larger leaf.
        directions: Number of random directions for ``fd="directions"``.
        seed: Seed of the entry sample and the directions.
        float32_noise_check: Whether to also run a finite-difference check in the candidate's
            low precision (for the ``FLOAT32_NOISE`` note) on float32/bfloat16/float16 candidates.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad` defining the loss.

    Returns:
        A :class:`GradCheckReport`; ``str()`` renders a table, ``.raise_if_failed()`` raises.

    Raises:
        TypeError: A misspelled loss option (naming ``check_grads`` and the closest option).
        ValueError: ``reduction="none"`` (one loss is checked); ``fd`` not ``"entries"`` or
            ``"directions"``; anything the loss raises for the labels and options (shapes,
            ranges), as :func:`jxent.softmax_cross_entropy` words it.

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
    require_scalar(loss_options, "check_grads")
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
    dtype = _least_precise(candidate)
    low_precision = dtype != "float64"
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    atol = 1e-3 * rtol if atol is None else atol
    counts = _natural_counts(predictor, params, x, labels, loss_options)

    key, arrays = _programs.split(predictor, loss_options)
    with jax.enable_x64(True):
        params64 = _to_dtype(params, jnp.float64)
        data64 = (
            _to_dtype(x, jnp.float64),
            jnp.asarray(labels) if _is_int(labels) else _to_dtype(labels, jnp.float64),
            _to_dtype(arrays, jnp.float64),
        )
        grads64 = _programs.reference_grad(key, params64, *data64)
        reference = [np.asarray(r) for r in jax.tree.leaves(grads64)]
        rng = np.random.default_rng(seed)
        if fd == "entries":
            chosen = [_choose(r.size, max_full_leaf, samples_per_leaf, rng) for r in reference]
            fd_values = _entry_differences(key, _fd.DEFAULT_STEP, params64, data64, chosen)
            fd_errors = [
                _fd_error(c.ravel()[idx], v, r)
                for c, r, idx, v in zip(cand, reference, chosen, fd_values, strict=True)
            ]
            fd_counts = [len(idx) for idx in chosen]
            method = f"finite differences: all entries of leaves <= {max_full_leaf}, "
            method += f"{samples_per_leaf} sampled (seed {seed}) of larger ones, float64"
        else:
            err = _directional_error(key, params64, data64, cand, reference, directions, rng)
            fd_errors = [err] * len(cand)
            fd_counts = [0] * len(cand)
            method = f"finite differences along {directions} random directions (seed {seed})"
        fd32_error = None
        if fd == "entries" and low_precision and float32_noise_check:
            data_lp = (_to_dtype(x, dtype), jnp.asarray(labels), _to_dtype(arrays, dtype))
            params_lp = _to_dtype(params, dtype)
            # A few entries per leaf show the noise; it only writes a note, so it is kept cheap.
            few = [idx[:NOISE_ENTRIES_PER_LEAF] for idx in chosen]
            values = _entry_differences(key, NAIVE_STEP[dtype], params_lp, data_lp, few)
            fd32_error = _low_precision_fd_error(values, few, reference)

    leaf_reports = []
    for path, c, r, fd_err, n in zip(paths, cand, reference, fd_errors, fd_counts, strict=True):
        leaf_reports.append(_leaf_report(path, c, r, fd_err, n, rtol, atol, counts))
    return _summarise(tuple(leaf_reports), rtol, atol, method, fd32_error, dtype, counts)


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


def _entry_differences(
    key: _programs.LossKey,
    step: float,
    params: PyTree,
    data: tuple[Any, Any, dict[str, Any]],
    chosen: list[np.ndarray],
) -> list[np.ndarray]:
    """Float64 (or low-precision) central differences at the chosen entries, per leaf."""
    values = np.asarray(
        _programs.entry_differences(key, step, params, data, *_programs.flat_pairs(chosen)),
        np.float64,
    )
    return np.split(values, np.cumsum([len(c) for c in chosen])[:-1])


def _directional_error(
    key: _programs.LossKey,
    params64: PyTree,
    data64: tuple[Any, Any, dict[str, Any]],
    cand: list[np.ndarray],
    reference: list[np.ndarray],
    count: int,
    rng: np.random.Generator,
) -> float:
    leaves, treedef = jax.tree.flatten(params64)
    v = [rng.standard_normal((count, *np.shape(leaf))) for leaf in leaves]
    fd_values = np.asarray(
        _programs.directional_differences(
            key, _fd.DEFAULT_STEP, params64, data64, treedef.unflatten(v)
        )
    )

    def dot(grads: list[np.ndarray]) -> np.ndarray:  # <g, v> per direction, leaves flattened
        return sum(d.reshape(count, -1) @ np.ravel(g) for d, g in zip(v, grads, strict=True))

    scale = float(np.max(np.abs(dot(reference)))) or 1.0
    return float(np.max(np.abs(dot(cand) - fd_values))) / scale


def _least_precise(tree: PyTree) -> str:
    """The floating dtype with the largest machine epsilon among the leaves ("float64" if none)."""
    dtypes = [
        jnp.dtype(np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype)
        for leaf in jax.tree.leaves(tree)
    ]
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not floats:
        return "float64"
    name = max(floats, key=lambda d: float(jnp.finfo(d).eps)).name
    return name if name in DEFAULT_RTOL else "float32"


def _low_precision_fd_error(
    values: list[np.ndarray], chosen: list[np.ndarray], reference: list[np.ndarray]
) -> float:
    """What a finite-difference check in a low precision (its values) reports vs the truth."""
    errors = [
        _fd_error(r.ravel()[idx], v, r)
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
    counts: Counts,
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
            f"{path} equals jax.grad of the plain loss but both differ from finite differences "
            f"({fd_err:.1e}): the predictor's own derivative (a custom_vjp, a kink such as relu "
            "at 0, a non-smooth op) is suspect",
            None,
            (path,),
        )
    else:
        diag = _classify(path, cand, ref, rtol, atol, scale, counts)
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
    counts: Counts,
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
        message = f"{path} is {_describe_scale(c, counts, fit_tol)}"
        return Diagnosis(Kind.SCALED, message, c, (path,))
    return Diagnosis(
        Kind.UNEXPLAINED,
        f"{path} differs from the gradient by {float(np.max(np.abs(cand - ref))) / scale:.2e} "
        "relative, not by a sign, scale, transpose or zero",
        None,
        (path,),
    )


class Counts(NamedTuple):
    """The natural counts a wrong normalisation multiplies or divides by, and the reduction."""

    items: tuple[tuple[str, float], ...]  # (name, n)
    reduction: str


# What a factor c = n or c = 1/n of each natural count means, by the loss's reduction.
_MEAN_MEANINGS = ("summed instead of averaged", "averaged twice")
_SUM_MEANINGS = ("multiplied by it twice", "averaged instead of summed")
_COUNT_MEANINGS = {
    "number of classes": ("multiplied by the class count", "divided by the class count"),
    "class-weight sum": ("summed instead of the weighted mean", "divided by the weight sum twice"),
}


def _meanings(name: str, reduction: str) -> tuple[str, str]:
    if name in _COUNT_MEANINGS:
        return _COUNT_MEANINGS[name]
    return _SUM_MEANINGS if reduction == "sum" else _MEAN_MEANINGS


def _describe_scale(c: float, counts: Counts, tol: float) -> str:
    """``c x the gradient``, naming every natural count ``n`` with ``|c| = n`` or ``1/n``.

    Matched within ``tol`` (relative), the fit tolerance of the candidate's dtype. One match
    names it (the batch size: sum vs mean); several (B = L = 4 with c = 1/4) name them all.
    """
    text = f"{c:.6g} x the gradient"
    sign = "" if c > 0 else ", with the sign flipped"
    matches = []
    for name, n in counts.items:
        for factor, meaning in zip((n, 1 / n), _meanings(name, counts.reduction), strict=True):
            if n > 1 and abs(abs(c) / factor - 1.0) < tol:
                matches.append((name, n, meaning))
    if len(matches) == 1:
        name, n, meaning = matches[0]
        return f"{text}: {name} {n:g}, {meaning} (sum vs mean){sign}"
    if matches:
        which = " or ".join(f"{name} {n:g} ({meaning})" for name, n, meaning in matches)
        return f"{text}: ambiguous, the factor matches {which}; this check cannot tell which{sign}"
    return text + sign


def _natural_counts(
    predictor: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    x: Any,
    labels: Any,
    loss_options: dict[str, Any],
) -> Counts:
    """The counts a wrong normalisation can multiply or divide by: what the loss counts.

    Batch size and number of classes always; the counted examples (``where``, ``ignore_index``,
    a class left under a per-logit ``where``) and their class-weight sum when they differ --
    the mean's own denominators (``Problem.mean_denominators``), not a second reading of options.
    """
    logits = jax.eval_shape(lambda p, x: logits_only(predictor(p, x)), params, x)
    problem, layout = prepare_problem("check_grads", logits, labels, **loss_options)
    batch, num_classes = layout.num_rows, layout.num_classes
    counts = [("batch size", float(batch)), ("number of classes", float(num_classes))]
    ce_denominator, count = (float(d) for d in problem.mean_denominators())
    if not any(problem.counted_rows()):
        count = 0.0  # the denominators read 1 when nothing counts (a mean of nothing is 0)
    if count != batch:
        counts.append(("counted examples", count))
    if "weights" in loss_options and abs(ce_denominator - count) > 1e-9 * max(count, 1.0):
        counts.append(("class-weight sum", ce_denominator))
    return Counts(tuple(counts), loss_options.get("reduction", "mean"))


def _summarise(
    leaves: tuple[LeafReport, ...],
    rtol: float,
    atol: float,
    method: str,
    fd32_error: float | None,
    dtype: str,
    counts: Counts,
) -> GradCheckReport:
    failed = [r for r in leaves if not r.passed]
    notes: list[Diagnosis] = []
    if fd32_error is not None and fd32_error > rtol and not failed:
        notes.append(
            Diagnosis(
                Kind.FLOAT32_NOISE,
                f"{dtype} noise: this gradient agrees with autodiff, but a {dtype} "
                f"finite-difference check (step {NAIVE_STEP[dtype]:g}) would report a relative "
                f"error of {fd32_error:.1e} (> rtol {rtol:g}) and fail it; {dtype} differences "
                "are too noisy to decide, which is why this check differences in float64",
                None,
                (),
            )
        )
    if not failed:
        diag = Diagnosis(
            Kind.OK,
            f"all {len(leaves)} leaves match jax.grad of the plain loss and finite differences",
        )
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
    elif len(kinds) == 1 and (
        kinds != {Kind.SCALED} or np.allclose(scales, scales[0], rtol=max(rtol, 1e-3))
    ):
        first = failed[0].diagnosis
        if first.kind is Kind.SCALED:  # the leaves' common factor, described once
            scale = float(np.mean(scales))
            message = f"every leaf is {_describe_scale(scale, counts, max(rtol, 1e-3))}"
            diag = Diagnosis(Kind.SCALED, message, scale, names)
        else:
            message = first.message.replace(failed[0].path, "every leaf", 1)
            diag = Diagnosis(first.kind, message, first.scale, names)
    else:
        detail = "; ".join(r.diagnosis.message for r in failed)
        diag = Diagnosis(
            Kind.UNEXPLAINED, f"every leaf is wrong, differently: {detail}", None, names
        )
    return GradCheckReport(leaves, False, diag, tuple(notes), rtol, atol, method)
