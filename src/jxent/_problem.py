r"""One validated problem: built once per call, passed along by every path.

A :class:`Problem` is everything about a cross-entropy call except the scores themselves (the
logits, or the head :math:`x, W, b` that forms them): the static :class:`~jxent._options.Config`
(hashable, the pytree's static part, so it keys ``jit`` caches), the rows (labels, which rows
count, which are bad), the traced options (class weights, :math:`\varepsilon`, :math:`z`) and
a per-logit mask. It is a pytree, so the custom derivatives take it whole: their tangents
arrive as a ``Problem`` of tangents (``dot.options.weights``, ``dot.rows.labels``), never as
positional arrays. :func:`build` is the one place that turns the user's options into one; the
materialised loss (``_loss.prepare``) and the linear head (``_head._linear.prepare``) only check
their own shapes first. What callers need of the call -- the rows that count, the reduction's
row scales, the mean's denominators -- are its methods, so nothing re-validates to get them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jxent import _kernel, _options, _validate
from jxent._kernel import Rows
from jxent._options import Arrays, Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """A validated call, without its scores.

    Attributes:
        config: The static options (not a leaf).
        rows: Labels (``int32 [R]`` clipped, or probabilities ``[R, L]``), ``counted`` and
            ``bad`` (``bool [R]``): see :class:`jxent._kernel.Rows`.
        options: Class weights ``[L]`` (ones without them), ``label_smoothing`` and ``z_loss``
            (scalars), in the compute dtype.
        class_mask: ``bool [R, L]``: a per-logit ``where`` (materialised logits only), or None.
    """

    config: Config = dataclasses.field(metadata={"static": True})
    rows: Rows
    options: Arrays
    class_mask: jax.Array | None = None

    def counted_rows(self) -> jax.Array:
        """``bool [R]``: the rows the loss counts (``where``, ``ignore_index``, a class left)."""
        counted = self.rows.counted
        if self.class_mask is not None:
            counted = counted & jnp.any(self.class_mask, axis=-1)
        return counted

    def row_scales(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Each row's weight of its cross-entropy and of its z-term, and its normaliser.

        See :func:`jxent._kernel.row_scales`.
        """
        return _kernel.row_scales(self.config, self.rows, self.options.weights)

    def mean_denominators(self) -> tuple[jax.Array, jax.Array]:
        r"""The ``"mean"`` reduction's denominators :math:`\sum_i m_i n_i` and :math:`\sum_i m_i`.

        The cross-entropy's (counted rows, weighted by their target's class weight with class
        weights and integer labels) and the z-term's (counted rows), as
        :func:`jxent._kernel.row_scales` forms them: what a sum over micro-batches must be
        divided by to equal the batch's mean.
        """
        counted = self.counted_rows()
        rows = self.rows._replace(counted=counted)
        n = _kernel.mean_normaliser(self.config, rows, self.options.weights)
        return _kernel.denominator(counted, n), _kernel.denominator(counted, jnp.ones_like(n))

    def roles(self) -> Problem:
        """Each leaf's dimensions for ``_head._tokens``: ``T`` rows, ``V`` classes."""
        labels = "TV" if self.config.soft else "T"
        mask = None if self.class_mask is None else "TV"
        return Problem(self.config, Rows(labels, "T", "T"), Arrays("V", "", ""), mask)


def build(
    *,
    labels: jax.Array,
    row_mask: jax.Array | None,
    class_mask: jax.Array | None,
    num_rows: int,
    num_classes: int,
    soft: bool,
    compute_dtype: Any,
    options: dict[str, Any],
) -> Problem:
    """Validates the options and the label values (eagerly) and builds the problem.

    Args:
        labels: Class indices of any integer dtype in the examples' shape (errors name their
            position there), or probabilities as rows ``[R, L]``.
        row_mask: ``bool [R]`` (``where`` per row), or None.
        class_mask: ``bool [R, L]`` (``where`` per logit), or None.
        num_rows: ``R``.
        num_classes: ``L``.
        soft: Probability labels.
        compute_dtype: The dtype of the statistics and the traced options.
        options: ``reduction``, ``weights``, ``ignore_index``, ``label_smoothing``, ``z_loss``,
            ``logit_softcap`` as the user gave them.
    """
    config, arrays = _options.prepare(
        batch_shape=(num_rows,),
        num_classes=num_classes,
        soft=soft,
        compute_dtype=compute_dtype,
        class_mask=class_mask is not None,
        **options,
    )
    if row_mask is None:
        row_mask = jnp.ones((num_rows,), bool)
    if soft:
        rows = Rows(labels, row_mask, jnp.zeros((num_rows,), bool))
    else:
        _validate.check_label_range(labels, num_classes, config.ignore_index, row_mask)
        rows = _kernel.integer_rows(config, labels.reshape(-1), row_mask)
    rows = rows._replace(bad=rows.bad | _options.bad_option(config, arrays))
    return Problem(config, rows, arrays, class_mask)
