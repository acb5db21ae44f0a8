r"""The per-row math of softmax cross-entropy, written once, over blocks of classes.

Every loss path in jxent is a schedule over these functions: the materialised loss is one block
of all ``L`` classes, :func:`jxent.linear_cross_entropy` folds blocks of a chunk of tokens, and
the vocab-parallel loss folds the blocks of each vocabulary shard and then merges the shards with
the same associative :func:`merge` through ``pmax``/``psum``.

For one row (example) with logits :math:`x`, the (optionally soft-capped) scores
:math:`s = c\tanh(x/c)` (a :math:`-\infty` logit stays :math:`-\infty`), the effective target

.. math::

    t_l = w_l\big((1-\varepsilon)\,q_l + \tfrac{\varepsilon}{L}\,[s_l > -\infty]\big),

(:math:`q` one-hot or given probabilities, :math:`w` class weights, :math:`\varepsilon` label
smoothing, which puts no mass on classes outside the softmax), :math:`T = \sum_l t_l` and
:math:`\operatorname{lse} = \log\sum_l e^{s_l}`, the cross-entropy and its gradient are

.. math::

    ce = \sum_l t_l(\operatorname{lse} - s_l), \qquad
    \frac{\partial}{\partial x}\big(a\,ce + b\,z\operatorname{lse}^2\big)
    = \big(p\,(aT + 2bz\operatorname{lse}) - a\,t\big)\odot\big(1 - (s/c)^2\big),

where :math:`a, b` are the row's weights in the reduction (see :func:`row_scales`). The
derivative with respect to the target is :math:`a\,u_l` with
:math:`u_l = \operatorname{lse} - s_l` (0 where :math:`s_l = -\infty`: such a class is outside
the support), which :func:`label_coefficients` carries to the labels, the class weights and
:math:`\varepsilon`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from jxent._options import Arrays, Config

NEG_INF = -jnp.inf


class Rows(NamedTuple):
    """Per-row facts that do not depend on the class block.

    Attributes:
        labels: Class indices ``int32 [R]`` (clipped into ``[0, L)``) or probabilities ``[R, L]``.
        counted: ``bool [R]``: the row takes part in the loss (``where``, ``ignore_index``).
        bad: ``bool [R]``: counted with an out-of-range label (or a traced option out of range);
            its loss and gradient are NaN.
    """

    labels: jax.Array
    counted: jax.Array
    bad: jax.Array


def label_equals(labels: jax.Array, value: int) -> jax.Array:
    """``labels == value`` without wrapping ``value`` into the labels' (maybe narrow) dtype."""
    info = jnp.iinfo(labels.dtype)
    if not info.min <= value <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == jnp.asarray(value, labels.dtype)


def integer_rows(config: Config, labels: jax.Array, where: jax.Array) -> Rows:
    """Counted and bad rows and ``int32`` class indices, for integer labels of any dtype.

    Comparisons run in a dtype that holds ``L`` (int8 labels against ``L = 200`` must not wrap).
    Traced inside :func:`jxent.checked` (``config.checked``) a bad counted label also raises
    through ``checkify``; otherwise the program has no check, no effect: a bad row is NaN.
    """
    counted = where
    if config.ignore_index is not None:
        counted = counted & ~label_equals(labels, config.ignore_index)
    wide = labels.astype(jnp.int32) if jnp.iinfo(labels.dtype).bits < 32 else labels
    in_range = (wide >= 0) & (wide < config.num_classes)
    bad = counted & ~in_range
    if config.checked and bad.size:  # an empty batch has no label to check
        # Reductions, not indexing: a dynamic index into labels sharded over a mesh's
        # Explicit axes is refused by JAX, and this runs for every integer-label loss.
        position = jnp.arange(bad.size, dtype=jnp.int32).reshape(bad.shape)
        first = jnp.min(jnp.where(bad, position, bad.size))
        checkify.check(
            ~jnp.any(bad),
            "label out of range: flat position {pos} has label {value}, expected 0.."
            + str(config.num_classes - 1),
            pos=first,
            value=jnp.sum(jnp.where(position == first, wide, 0)),
        )
    clipped = jnp.where(in_range, wide, 0).astype(jnp.int32)
    return Rows(clipped, counted, bad)


def mean_normaliser(config: Config, rows: Rows, weights: jax.Array) -> jax.Array:
    """:math:`n_i`: the target class's weight for integer labels with class weights, else 1."""
    if config.has_weights and not config.soft:
        return per_row_lookup(weights, rows.labels)
    return jnp.ones(rows.counted.shape, weights.dtype)


def _explicit_sharding(a: jax.Array) -> Any:
    """``a``'s sharding when sharded over Explicit mesh axes (sharding in types), else None."""
    sharding = jax.typeof(a).sharding
    explicit = not sharding.mesh.empty and any(s is not None for s in sharding.spec)
    return sharding if explicit else None


def per_row_lookup(table: jax.Array, labels: jax.Array) -> jax.Array:
    """``table[labels]``: a class's value per row, sharded like the rows.

    With rows over Explicit mesh axes JAX asks where a gather's output lives; it lives with
    the rows (``table`` is small and replicated).
    """
    table = _replicated(table)
    sharding = _explicit_sharding(labels)
    if sharding is None:
        return jnp.take(table, labels)
    return table.at[labels].get(out_sharding=sharding)


def _replicated(table: jax.Array) -> jax.Array:
    """A per-class table sharded over Explicit axes (class weights like ``w``'s columns), whole.

    It is ``[L]``, and a lookup by label needs every class.
    """
    sharding = _explicit_sharding(table)
    if sharding is None:
        return table
    spec = jax.sharding.PartitionSpec()
    return jax.sharding.reshard(table, jax.sharding.NamedSharding(sharding.mesh, spec))


def per_class_count(values: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """``sum_i values_i [labels_i = l]`` for each class ``l`` (replicated ``[L]``)."""
    counts = jnp.zeros((num_classes,), values.dtype)
    sharding = _explicit_sharding(labels)
    if sharding is None:
        return counts.at[labels].add(values)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return counts.at[labels].add(values, out_sharding=replicated)


def denominator(counted: jax.Array, normaliser: jax.Array) -> jax.Array:
    r""":math:`\sum_i m_i n_i`, the mean's denominator.

    1 when no row counts (the mean of nothing is 0); NaN when rows count but their normalisers
    sum to 0 (class weights 0 on every counted target: the weighted mean is undefined, NaN as in
    PyTorch -- not the sum).
    """
    total = jnp.sum(jnp.where(counted, normaliser, 0.0))
    return jnp.where(total == 0, jnp.where(jnp.any(counted), jnp.nan, 1.0), total)


def row_scales(
    config: Config, rows: Rows, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Each row's weight in the reduction: :math:`a_i` for the cross-entropy, :math:`b_i` for z.

    ``"none"`` and ``"sum"``: :math:`a_i = b_i = m_i`. ``"mean"``: the weighted mean of the
    cross-entropy plus :math:`z` times the mean of :math:`\operatorname{lse}^2` over counted rows
    (Liger Kernel's ``CrossEntropyWithZLoss``), so :math:`a_i = m_i / \sum_j m_j n_j` (PyTorch's
    ``weight=`` mean) and :math:`b_i = m_i / \sum_j m_j`. Returns ``(a, b, n)``.
    """
    one = rows.counted.astype(weights.dtype)
    n = mean_normaliser(config, rows, weights)
    if config.reduction != "mean":
        return one, one, n
    count = denominator(rows.counted, jnp.ones_like(one))
    return one / denominator(rows.counted, n), one / count, n


def cap(config: Config, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Soft-capped scores ``s`` and ``ds/dx`` (None without a cap); ``-inf`` stays ``-inf``."""
    c = config.logit_softcap
    if c is None:
        return x, None
    tanh = jnp.tanh(x / c)
    # c tanh(-inf / c) = -c would give a masked class probability back.
    return jnp.where(x == NEG_INF, NEG_INF, c * tanh), 1.0 - tanh**2


class Target(NamedTuple):
    r"""A block of the target :math:`t = w\odot((1-\varepsilon)q + \varepsilon/L\,[s>-\infty])`.

    Kept in pieces so that XLA fuses it into its consumers: for integer labels the one-hot
    :math:`q` is never a buffer -- the label's column is ``hit`` (an iota compare inside each
    fusion) carrying ``label_mass`` :math:`w_y(1-\varepsilon)`, and the row sums over the target
    are a gather (:func:`block_stats`). :func:`dense` writes the whole block when a consumer
    needs it (the label derivatives, curvature products).

    Attributes:
        hit: ``bool [R, size]``: the label's column (integer labels), else None.
        in_block: ``bool [R]``: the label lies in this block (integer labels), else None.
        label_index: ``int32 [R]``: the label's column within the block, clipped (integer).
        label_mass: ``[R]``: :math:`w_y(1-\varepsilon)` when the label is in the block, else 0
            (integer labels; None when it is 1: no class weights, no smoothing).
        q: Probabilities ``[R, size]`` (probability labels), else None.
        weights: The block's class weights ``[1, size]``, or None.
        smooth: :math:`\tfrac{\varepsilon}{L}[s>-\infty]` ``[R, size]`` before class weights,
            or None without label smoothing.
        eps: The label smoothing (0 without it).
    """

    hit: jax.Array | None
    in_block: jax.Array | None
    label_index: jax.Array | None
    label_mass: jax.Array | None
    q: jax.Array | None
    weights: jax.Array | None
    smooth: jax.Array | None
    eps: Any


def target_block(
    config: Config,
    labels: jax.Array,
    weights: jax.Array | None,
    eps: jax.Array,
    s: jax.Array,
    start: Any,
) -> Target:
    """The effective target on a block of columns, ``s`` ``[R, size]`` being its scores.

    Args:
        config: The static options.
        labels: The block's probabilities ``[R, size]``, or class indices ``int32 [R]``.
        weights: The block's class weights ``[size]``, or None.
        eps: The label smoothing.
        s: The block's (capped, masked) scores.
        start: The global class index of the block's first column (integer labels).
    """
    size = s.shape[1]
    row_weights = None if weights is None else weights[None, :]
    smooth = None
    if config.has_smoothing:
        smooth = jnp.where(s == NEG_INF, 0.0, eps / config.num_classes)
    eps = eps if config.has_smoothing else 0.0
    if config.soft:
        return Target(None, None, None, None, labels.astype(s.dtype), row_weights, smooth, eps)
    local = labels - start
    in_block = (local >= 0) & (local < size)
    index = jnp.clip(local, 0, size - 1)
    # One row of column numbers, broadcast in the comparison: XLA hoists a full-size iota out
    # of the block loop and materialises it.
    hit = lax.broadcasted_iota(jnp.int32, (1, size), 1) == local[:, None]
    mass = None
    if config.has_weights or config.has_smoothing:
        mass = jnp.where(in_block, 1.0 - eps, 0.0).astype(s.dtype)
        if weights is not None:
            mass = mass * per_row_lookup(weights, index)  # sharded like the rows
    return Target(hit, in_block, index, mass, None, row_weights, smooth, eps)


def dense(target: Target, dtype: Any) -> jax.Array:
    """The target block ``t`` ``[R, size]`` as one array."""
    if target.q is not None:
        t = (1.0 - target.eps) * target.q
        if target.smooth is not None:
            t = t + target.smooth
        return t if target.weights is None else t * target.weights
    mass = jnp.ones(target.hit.shape[:1], dtype) if target.label_mass is None else target.label_mass
    t = jnp.where(target.hit, mass[:, None], 0.0).astype(dtype)
    if target.smooth is not None:
        t = t + weighted_smoothing(target)
    return t


def weighted_smoothing(target: Target) -> jax.Array:
    r"""The smoothing's share of the target, :math:`w_l\,\varepsilon/L\,[s_l > -\infty]`."""
    return target.smooth if target.weights is None else target.smooth * target.weights


def before_weights(target: Target, dtype: Any) -> tuple[jax.Array, jax.Array]:
    r"""``(t0, q)``: the target before class weights, :math:`(1-\varepsilon)q + \varepsilon/L`."""
    q = target.hit.astype(dtype) if target.q is None else target.q
    t0 = (1.0 - target.eps) * q
    return (t0 if target.smooth is None else t0 + target.smooth), q


class Stats(NamedTuple):
    """Online-softmax statistics of a row over the classes seen so far (a monoid, see merge).

    ``se`` and ``tds`` are relative to :func:`reference` of ``m``, which is finite.
    """

    m: jax.Array  # max of s; -inf when every class seen is -inf
    se: jax.Array  # sum exp(s - ref)
    tds: jax.Array  # sum t (s - ref), with 0 * (-inf) = 0
    tsum: jax.Array  # sum t
    es: jax.Array | None = None  # sum exp(s - ref) (s - ref): the entropy's (extra=True)
    arg: jax.Array | None = None  # int32 column of the max, the first on ties (extra=True)


def reference(m: jax.Array) -> jax.Array:
    """The shift the statistics are taken relative to: the max, clamped finite for an empty row.

    A clamp, not a select on ``m == -inf``: XLA fuses the max, the shift, the exponential and
    the sum into one pass over the block only through an elementwise ``maximum``.
    """
    return jnp.maximum(m, jnp.finfo(m.dtype).min)


def block_stats(s: jax.Array, target: Target, *, extra: bool = False, start: Any = 0) -> Stats:
    r"""Statistics of one block ``s`` ``[R, size]`` and its target (the max constant for autodiff).

    Integer labels take the label's score by a gather (no one-hot): :math:`\sum_l t_l(s_l -
    \mathrm{ref}) = w_y(1-\varepsilon)(s_y - \mathrm{ref})` plus the smoothing's sum.
    ``extra``: also the entropy's sum and the argmax (``start``: the block's first column).
    """
    m = lax.stop_gradient(jnp.max(s, axis=-1))
    ref = reference(m)
    rel = s - ref[:, None]
    se = jnp.sum(jnp.exp(rel), axis=-1)
    if extra:
        es, arg = _entropy_sum(rel), first_max(s, m) + start
        return _target_stats(s, rel, target, m, se)._replace(es=es, arg=arg)
    return _target_stats(s, rel, target, m, se)


def first_max(s: jax.Array, m: jax.Array) -> jax.Array:
    """``int32`` column of each row's first maximum ``m`` (0 for a row of NaN or ``-inf``).

    A min over an iota compare, not ``jnp.argmax``: XLA:CPU fuses it with the block's other
    reductions, where the variadic (value, index) reduce of ``argmax`` runs on its own.
    """
    size = s.shape[-1]
    column = lax.broadcasted_iota(jnp.int32, (1, size), 1)
    first = jnp.min(jnp.where(s == m[:, None], column, size), axis=-1)
    return jnp.where(first == size, 0, first)


def _entropy_sum(rel: jax.Array) -> jax.Array:
    r""":math:`\sum_l e^{r_l} r_l` over a block, with :math:`0\cdot(-\infty) = 0`."""
    e = jnp.exp(rel)
    return jnp.sum(jnp.where(e == 0.0, 0.0, e * rel), axis=-1)


def _target_stats(s: jax.Array, rel: jax.Array, target: Target, m, se) -> Stats:
    """:func:`block_stats`' target sums ``tds``, ``tsum``."""
    ref = reference(m)
    if target.q is not None:
        t = dense(target, s.dtype)
        # Guarded on s, not on t: the derivative with respect to t (class weights at 0, a
        # hessian) must survive; target mass on a -inf score makes the row's loss +inf.
        tds = jnp.sum(jnp.where(s == NEG_INF, jnp.where(t != 0, NEG_INF, 0.0), t * rel), axis=-1)
        return Stats(m, se, tds, jnp.sum(t, axis=-1))
    s_y = jnp.take_along_axis(s, target.label_index[:, None], axis=1, mode="clip")[:, 0]
    if target.label_mass is None:
        tsum = target.in_block.astype(s.dtype)
        tds = jnp.where(target.in_block, s_y - ref, 0.0)
    else:
        tsum = target.label_mass
        # Guarded on s_y, not on the mass: its derivative (class weights at 0) must survive.
        masked = jnp.where(tsum != 0, NEG_INF, 0.0)
        tds = jnp.where(s_y == NEG_INF, masked, tsum * (s_y - ref))
    if target.smooth is not None:
        smooth = weighted_smoothing(target)
        tsum = tsum + jnp.sum(smooth, axis=-1)
        tds = tds + jnp.sum(jnp.where(s == NEG_INF, 0.0, smooth * rel), axis=-1)
    return Stats(m, se, tds, tsum)


def rebase(stats: Stats, m: jax.Array) -> Stats:
    """The same statistics relative to a new max ``m >= stats.m`` (``m`` may come from pmax)."""
    shift = reference(stats.m) - reference(m)  # finite: both references are
    se = rebase_sum(stats.se, stats.m, m)
    es = None
    if stats.es is not None:  # sum e^(r + shift) (r + shift), r relative to the old reference
        es = rebase_sum(stats.es + shift * stats.se, stats.m, m)
    return Stats(m, se, stats.tds + stats.tsum * shift, stats.tsum, es, stats.arg)


def merge(a: Stats, b: Stats) -> Stats:
    """The statistics of the union of two sets of classes (associative; ``a`` first on ties)."""
    m = jnp.maximum(a.m, b.m)
    arg = None if a.arg is None else jnp.where(b.m > a.m, b.arg, a.arg)
    a, b = rebase(a, m), rebase(b, m)
    es = None if a.es is None else a.es + b.es
    return Stats(m, a.se + b.se, a.tds + b.tds, a.tsum + b.tsum, es, arg)


def merge_shards(stats: Stats, axis_name: str) -> Stats:
    """:func:`merge` across the shards of a mesh axis: ``pmax`` of the max, ``psum`` else.

    The argmax is the lowest column among the shards that hold the max (``pmin``).
    """
    m = lax.pmax(stats.m, axis_name)
    local = rebase(stats, m)
    es = None if local.es is None else lax.psum(local.es, axis_name)
    arg = None
    if local.arg is not None:
        mine = jnp.where(stats.m == m, local.arg, jnp.iinfo(jnp.int32).max)
        arg = lax.pmin(mine, axis_name)
    return Stats(m, *(lax.psum(v, axis_name) for v in local[1:4]), es, arg)


def entropy(stats: Stats) -> jax.Array:
    r""":math:`H = -\sum_l p_l\log p_l = \log se - es/se` of a row's whole statistics."""
    return jnp.log(stats.se) - stats.es / stats.se


def finish(stats: Stats) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``(lse, ce, empty)``: log-sum-exp, :math:`\sum_l t_l(\operatorname{lse} - s_l)`, no class.

    A row whose every score is :math:`-\infty` is ``empty``: its softmax is undefined.
    """
    log_se = jnp.log(stats.se)
    empty = stats.m == NEG_INF
    ce = stats.tsum * jnp.where(empty, 0.0, log_se) - stats.tds
    return reference(stats.m) + log_se, ce, empty


def row_losses(
    config: Config,
    rows: Rows,
    arrays: Arrays,
    ce: jax.Array,
    lse: jax.Array,
    ce_weight: jax.Array,
    z_weight: jax.Array,
) -> jax.Array:
    r"""Each row's share of the loss, :math:`a_i ce_i + b_i z\operatorname{lse}_i^2`; NaN if bad."""
    loss = ce_weight * ce
    if config.has_z_loss:
        loss = loss + z_weight * arrays.z_loss * lse**2
    return jnp.where(rows.bad, jnp.nan, jnp.where(rows.counted, loss, 0.0))


def safe_lse(rows: Rows, lse: jax.Array) -> jax.Array:
    """``lse`` where the row counts and has a class, else 0 (no NaN from masked rows)."""
    return jnp.where(rows.counted & (lse != NEG_INF), lse, 0.0)


def grad_block(
    config: Config,
    rows: Rows,
    arrays: Arrays,
    s: jax.Array,
    ds: jax.Array | None,
    target: Target,
    stats: Stats,
    ce_weight: jax.Array,
    z_weight: jax.Array,
) -> jax.Array:
    r"""The hand-derived :math:`\partial(\text{row share})/\partial x` on one block ``[R, size]``.

    :math:`G = (p\,(aT + 2bz\operatorname{lse}) - a\,t) \odot ds/dx`; zero for rows that do not
    count, NaN for bad rows. ``stats`` are the whole row's (:math:`T`, the log-sum-exp).
    """
    ce_weight = jnp.where(rows.bad, jnp.nan, ce_weight)
    g = score_grad(config, rows, arrays, s, target, stats, ce_weight, z_weight)
    if ds is not None:
        g = g * ds
    # Exact zeros for rows that do not count, even if their logits are NaN or 0 * inf (padding).
    return jnp.where(rows.counted[:, None], g, 0.0)


def probabilities(rows: Rows, s: jax.Array, stats: Stats) -> jax.Array:
    """:math:`p` on a block from the whole row's statistics; 0 in rows that do not count."""
    # p = exp(s - ref) / se, not exp(s - lse): lse would round its low digits away (p near 1).
    # The same expression as block_stats' exponential, so XLA computes it once: one exponential
    # pass into one [R, L] buffer (measured faster on CPU than recomputing it in G's fusion).
    inv_se = jnp.where(rows.counted, 1.0 / stats.se, 0.0)
    return jnp.exp(s - reference(stats.m)[:, None]) * inv_se[:, None]


def score_grad(
    config: Config,
    rows: Rows,
    arrays: Arrays,
    s: jax.Array,
    target: Target,
    stats: Stats,
    ce_weight: jax.Array,
    z_weight: jax.Array,
) -> jax.Array:
    r""":math:`\partial(\text{row share})/\partial s = p\,(aT + 2bz\operatorname{lse}) - a\,t`."""
    coef = ce_weight * stats.tsum
    if config.has_z_loss:
        coef = coef + 2.0 * arrays.z_loss * z_weight * safe_lse(rows, finish(stats)[0])
    return probabilities(rows, s, stats) * coef[:, None] - scaled_target(target, ce_weight, s.dtype)


def scaled_target(target: Target, ce_weight: jax.Array, dtype: Any) -> jax.Array:
    """:math:`a_i t_{il}` on a block, written so that XLA fuses it into :math:`G` (no one-hot)."""
    if target.q is not None:
        return ce_weight[:, None] * dense(target, dtype)
    mass = ce_weight if target.label_mass is None else ce_weight * target.label_mass
    out = jnp.where(target.hit, mass[:, None], 0.0)
    if target.smooth is not None:
        out = out + ce_weight[:, None] * weighted_smoothing(target)
    return out


def tangent_sum(s: jax.Array, ds: jax.Array | None, m: jax.Array, v: jax.Array) -> jax.Array:
    r""":math:`\sum_l e^{s_l - \mathrm{ref}(m)}\,(s'_l v_l)` over a block ``[R, size]`` -> ``[R]``.

    Divided by the row's ``se`` (after :func:`rebase_sum` to the row's max) it is
    :math:`p \cdot \dot s`, the softmax-weighted tangent that every curvature product needs.
    """
    dv = v if ds is None else v * ds
    weight = jnp.exp(s - reference(m)[:, None])
    return jnp.sum(jnp.where(weight == 0.0, 0.0, weight * dv), axis=-1)


def rebase_sum(value: jax.Array, m: jax.Array, new_m: jax.Array) -> jax.Array:
    """A sum of ``exp(s - ref(m)) * ...`` re-expressed relative to ``new_m >= m``."""
    return value * jnp.where(m == NEG_INF, 0.0, jnp.exp(m - reference(new_m)))


def curvature_block(
    config: Config,
    rows: Rows,
    arrays: Arrays,
    s: jax.Array,
    ds: jax.Array | None,
    target: Target,
    stats: Stats,
    ce_weight: jax.Array,
    z_weight: jax.Array,
    v: jax.Array,
    p_dot_v: jax.Array,
    *,
    ggn: bool,
) -> jax.Array:
    r"""The hand-derived curvature product of the row share on one block ``[R, size]``.

    With :math:`\dot s = s' \odot v` (:math:`s' = ds/dx`, 1 without a cap),
    :math:`\pi = p\cdot\dot s` (``p_dot_v``, over the whole row), :math:`c = aT + 2bz\,
    \operatorname{lse}`:

    .. math::

        H_s \dot s = c\,(p\odot\dot s - p\,\pi) + 2bz\,p\,\pi, \qquad
        H_x v = s' \odot H_s\dot s + (\partial\ell/\partial s)\odot s''\odot v,

    :math:`s'' = -(2/c_{\text{cap}})(s/c_{\text{cap}})\,s'`. ``ggn=True`` gives the positive
    semi-definite Gauss-Newton part instead: :math:`c = aT` (the z-loss as the square of the
    residual :math:`\operatorname{lse}`, whose Gauss-Newton term is :math:`2bz\,pp^\top`) and no
    :math:`s''` term (the cap is part of the model). Zero in rows that do not count, NaN in bad.
    """
    p = probabilities(rows, s, stats)
    dv = v if ds is None else v * ds
    ce_weight = jnp.where(rows.bad, jnp.nan, ce_weight)
    coef = ce_weight * stats.tsum
    lse = safe_lse(rows, finish(stats)[0])
    if config.has_z_loss and not ggn:
        coef = coef + 2.0 * arrays.z_loss * z_weight * lse
    pi = p_dot_v[:, None]
    out = coef[:, None] * p * (dv - pi)
    if config.has_z_loss:
        out = out + (2.0 * arrays.z_loss * z_weight)[:, None] * p * pi
    if ds is not None:
        out = out * ds
        if not ggn:
            c = config.logit_softcap
            s2 = jnp.where(s == NEG_INF, 0.0, -(2.0 / c) * (s / c) * ds)
            out = (
                out
                + score_grad(config, rows, arrays, s, target, stats, ce_weight, z_weight) * s2 * v
            )
    # A class outside the softmax has a zero row and column, whatever its tangent holds.
    out = jnp.where(s == NEG_INF, 0.0, out)
    return jnp.where(rows.counted[:, None], out, 0.0)


class LabelCoefficients(NamedTuple):
    r"""Per-entry derivatives of the row share with respect to the target's inputs ``[R, size]``.

    ``labels``: w.r.t. probability labels; ``weights``: w.r.t. the class weights (before
    summing over rows, and without the mean's denominator term); ``smoothing``: w.r.t.
    :math:`\varepsilon` (before summing).
    """

    labels: jax.Array
    weights: jax.Array
    smoothing: jax.Array


def label_coefficients(
    config: Config,
    rows: Rows,
    arrays: Arrays,
    s: jax.Array,
    target: Target,
    stats: Stats,
    ce_weight,
) -> LabelCoefficients:
    r"""The derivatives :math:`a u \odot \partial t/\partial(q, w, \varepsilon)`, `u = lse - s`.

    :math:`u_l = -\log p_l`, also where :math:`t_l = 0`; :math:`u_l = 0` where :math:`s_l = -\infty`
    (a class outside the softmax), so tangents along the labels stay finite there.
    """
    rel = s - reference(stats.m)[:, None]
    u = jnp.where(s == NEG_INF, 0.0, jnp.log(stats.se)[:, None] - rel)
    scaled_u = jnp.where(rows.counted, ce_weight, 0.0)[:, None] * u
    class_weights = 1.0 if target.weights is None else target.weights
    t0, q = before_weights(target, s.dtype)
    d_smooth = class_weights * (jnp.where(s == NEG_INF, 0.0, 1.0 / config.num_classes) - q)
    return LabelCoefficients(
        scaled_u * (1.0 - target.eps) * class_weights, scaled_u * t0, scaled_u * d_smooth
    )


class OptionDots(NamedTuple):
    r"""A block's tangents of the target's inputs; None where a tangent is zero.

    Attributes:
        labels: Along probability labels ``[R, size]``.
        weights: Along the block's class weights ``[size]``.
        label_smoothing: Along :math:`\varepsilon` (scalar).
    """

    labels: jax.Array | None = None
    weights: jax.Array | None = None
    label_smoothing: jax.Array | None = None


def option_tangent(
    config: Config,
    rows: Rows,
    arrays: Arrays,
    s: jax.Array,
    target: Target,
    stats: Stats,
    ce_weight: jax.Array,
    dots: OptionDots,
) -> jax.Array:
    r"""Each row's tangent along the labels, class weights and :math:`\varepsilon` on a block.

    :math:`\sum_l C_{il}\,\dot\theta_l` with :math:`C` the :func:`label_coefficients`: the one
    place these three tangent terms are written (the materialised loss contracts one block of
    all classes, the linear head each block; their transposes, the gradient pass, sum the same
    coefficients). ``[R]``; zeros when every tangent is None.
    """
    out = jnp.zeros(rows.counted.shape, s.dtype)
    if all(d is None for d in dots):
        return out
    coef = label_coefficients(config, rows, arrays, s, target, stats, ce_weight)
    if config.soft and dots.labels is not None:
        out = out + jnp.sum(coef.labels * dots.labels, axis=-1)
    if dots.weights is not None:
        out = out + jnp.sum(coef.weights * dots.weights[None, :], axis=-1)
    if dots.label_smoothing is not None:
        out = out + jnp.sum(coef.smoothing, axis=-1) * dots.label_smoothing
    return out


def z_tangent(rows: Rows, lse: jax.Array, z_weight: jax.Array, z_dot: jax.Array) -> jax.Array:
    r"""Each row's tangent along the z-loss coefficient, :math:`b_i\operatorname{lse}_i^2\dot z`."""
    return jnp.where(rows.counted, z_weight * safe_lse(rows, lse) ** 2, 0.0) * z_dot


def weights_denominator_grad(
    config: Config, rows: Rows, mean_ce: jax.Array, normaliser_sum: jax.Array
) -> jax.Array | None:
    r"""The mean's denominator :math:`D = \sum_i m_i w_{y_i}` differentiated w.r.t. ``weights``.

    :math:`\partial(\sum_i ce_i / D)/\partial w_l \mathrel{+}= -(J_{ce}/D)\sum_i m_i[y_i = l]`.
    None when the denominator does not depend on the weights.
    """
    if not (config.reduction == "mean" and config.has_weights and not config.soft):
        return None
    counts = per_class_count(rows.counted.astype(mean_ce.dtype), rows.labels, config.num_classes)
    return -(mean_ce / normaliser_sum) * counts


def scaled_scores(
    config: Config, logits: jax.Array, temperature: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Scores at a temperature, :math:`s = \operatorname{cap}(z)/T`, and :math:`ds/dz`.

    The cap (if any) comes first, as a soft-capped model's logits are then sampled at ``T``
    (Gemma 2 in vLLM); ``-inf`` stays ``-inf``.
    """
    s, ds = cap(config, logits)
    inv = 1.0 / temperature
    return s * inv, (jnp.full_like(s, inv) if ds is None else ds * inv)


def scores_dot(
    s: jax.Array, ds: jax.Array, logits_dot: jax.Array | None, t_dot: Any, temperature: Any
) -> jax.Array:
    r""":math:`\dot s = s'\dot z - s\,\dot T/T`; 0 where :math:`s = -\infty` (no class there)."""
    out = jnp.zeros_like(s) if logits_dot is None else ds * logits_dot
    if t_dot is not None:
        out = out - jnp.where(s == NEG_INF, 0.0, s) * (t_dot / temperature)
    return jnp.where(s == NEG_INF, 0.0, out)


class LogProbSums(NamedTuple):
    r"""A block's share of the sums the per-token tangents need (``[R]`` each).

    ``p_dot`` :math:`\sum_l p_l\dot s_l`, ``p_rel_dot`` :math:`\sum_l p_l (s_l -
    \mathrm{ref})\dot s_l`, ``label_dot`` :math:`\dot s_y` (0 when the label is elsewhere).
    """

    p_dot: jax.Array
    p_rel_dot: jax.Array
    label_dot: jax.Array


def log_prob_sums(
    rows: Rows, s: jax.Array, s_dot: jax.Array, target: Target, stats: Stats
) -> LogProbSums:
    """:class:`LogProbSums` of one block from the whole row's ``stats`` (``s_dot`` guarded).

    ``s_dot`` is zeroed in rows that do not count first, so that the transposed map (reverse
    mode) sends them exact zeros even where their scores are NaN padding.
    """
    s_dot = jnp.where(rows.counted[:, None], s_dot, 0.0)
    rel = s - reference(stats.m)[:, None]
    p = jnp.exp(rel) / stats.se[:, None]
    p_rel = jnp.where(p == 0.0, 0.0, p * rel)
    s_y = jnp.take_along_axis(s_dot, target.label_index[:, None], axis=1, mode="clip")[:, 0]
    return LogProbSums(
        jnp.sum(p * s_dot, axis=-1),
        jnp.sum(p_rel * s_dot, axis=-1),
        jnp.where(target.in_block, s_y, 0.0),
    )


def add_sums(a: LogProbSums, b: LogProbSums) -> LogProbSums:
    return LogProbSums(*(u + v for u, v in zip(a, b, strict=True)))


def _per_token(rows: Rows, empty: jax.Array, value: jax.Array) -> jax.Array:
    """0 where the row does not count, NaN where it is bad or has no class, else ``value``."""
    bad = rows.bad | (rows.counted & empty)
    return jnp.where(bad, jnp.nan, jnp.where(rows.counted, value, 0.0))


def log_prob_fields(rows: Rows, stats: Stats) -> tuple[jax.Array, ...]:
    r"""``(log_prob, entropy, lse, argmax)`` of each row from its whole ``extra`` statistics.

    :math:`\log p_y = s_y - \operatorname{lse}` (``-ce`` of a one-hot target),
    :math:`H = \log se - es/se`; 0 in rows that do not count, NaN in bad ones (the argmax is
    every row's).
    """
    lse, ce, empty = finish(stats)
    fields = (-ce, entropy(stats), lse)
    return (*(_per_token(rows, empty, v) for v in fields), stats.arg)


def log_prob_tangents(rows: Rows, stats: Stats, sums: LogProbSums) -> tuple[jax.Array, ...]:
    r"""The tangents of ``(log_prob, entropy, lse)`` from a row's summed :class:`LogProbSums`.

    .. math::

        \dot{\log p_y} = \dot s_y - p\cdot\dot s, \qquad
        \dot H = -\textstyle\sum_l p_l(\log p_l + H)\,\dot s_l
        = -\big(\sum_l p_l r_l\dot s_l - (p\cdot\dot s)\,es/se\big), \qquad
        \dot{\operatorname{lse}} = p\cdot\dot s,

    with :math:`r = s - \mathrm{ref}` (:math:`\log p_l + H = r_l - es/se`).
    """
    empty = stats.m == NEG_INF
    mean_rel = stats.es / stats.se
    fields = (
        sums.label_dot - sums.p_dot,
        -(sums.p_rel_dot - sums.p_dot * mean_rel),
        sums.p_dot,
    )
    return tuple(_per_token(rows, empty, v) for v in fields)


class CrossEntropyStats(NamedTuple):
    r"""Per-token statistics of a cross-entropy call, from its own softmax (not differentiated).

    Attributes:
        lse: :math:`\log\sum_l e^{s_l}` of the (capped) scores ``[N]``; 0 where a token does
            not count.
        entropy: :math:`H = -\sum_l p_l\log p_l` (nats) ``[N]``; 0 where a token does not count.
        argmax: ``int32 [N]``: the most probable class (the first on ties), for every token.
        correct: ``bool [N]``: counted and ``argmax`` equals the label (for probability labels,
            the label's most probable class).
        z_term: :math:`z\operatorname{lse}^2` ``[N]`` (the z-loss's share before the reduction);
            0 where a token does not count or without ``z_loss``.
    """

    lse: jax.Array
    entropy: jax.Array
    argmax: jax.Array
    correct: jax.Array
    z_term: jax.Array


def cross_entropy_stats(
    config: Config, rows: Rows, arrays: Arrays, lse: jax.Array, ent: jax.Array, arg: jax.Array
) -> CrossEntropyStats:
    """:class:`CrossEntropyStats` from the rows' log-sum-exp, entropy and argmax (whole rows)."""
    counted = rows.counted
    label = jnp.argmax(rows.labels, axis=-1) if config.soft else rows.labels
    lse, ent = (lax.stop_gradient(jnp.where(counted, v, 0.0)) for v in (lse, ent))
    z_term = lse**2 * lax.stop_gradient(arrays.z_loss) if config.has_z_loss else jnp.zeros_like(lse)
    return CrossEntropyStats(lse, ent, arg, counted & (arg == label), z_term)
