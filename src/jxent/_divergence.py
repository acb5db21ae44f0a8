r"""The per-row math of distillation: divergences between two softmaxes, over blocks of classes.

For one token with student scores :math:`s = z_s/T`, teacher scores :math:`u = z_t/T` (both at
the temperature :math:`T`), :math:`Q = \operatorname{softmax}(s)` (student) and
:math:`P = \operatorname{softmax}(u)` (teacher):

.. math::

    \text{forward KL} = \sum_l P_l(\log P_l - \log Q_l), \qquad
    \text{reverse KL} = \sum_l Q_l(\log Q_l - \log P_l),

    \operatorname{JSD}_\beta = \beta\,\mathrm{KL}(P\,\|\,M) + (1-\beta)\,\mathrm{KL}(Q\,\|\,M),
    \qquad M = \beta P + (1-\beta) Q,

the last as Liger Kernel's ``LigerFusedLinearJSDLoss`` defines it, whose :math:`\beta = 0` and
:math:`\beta = 1` are the forward and the reverse KL (the limits of
:math:`\operatorname{JSD}_\beta/\beta` and :math:`\operatorname{JSD}_\beta/(1-\beta)`). Their
derivatives with respect to the scores (``docs/derivation.md``):

.. math::

    \text{forward KL:}\ \partial_s = Q - P,\
    \partial_u = P\odot(\log P - \log Q - \mathrm{KL});

    \text{reverse KL:}\ \partial_s = Q\odot(\log Q - \log P - \mathrm{KL}),\ \partial_u = P - Q;

    \operatorname{JSD}_\beta:\ \partial_s = (1-\beta)\,Q\odot(\log Q - \log M - \mathrm{KL}(Q\|M)),
    \ \partial_u = \beta\,P\odot(\log P - \log M - \mathrm{KL}(P\|M)).

Everything a row needs is a monoid over blocks of classes (:class:`PairStats`): each softmax's
online statistics (``_kernel.Stats`` with the entropy's sum :math:`\sum e^r r`) and, for the
KLs, the cross sum :math:`\sum_l e^{u_l - m_u}(s_l - m_s)` (forward) or
:math:`\sum_l e^{s_l - m_s}(u_l - m_u)` (reverse), which rebase with both references. The JSD's
:math:`\sum M\log M` is not such a sum (the log of a mixture needs both normalisers), so it takes
a second pass over the blocks (:func:`jsd_sums`) once the statistics are whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _kernel
from jxent._kernel import NEG_INF, Stats

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class Divergence:
    r"""The static choices of a distillation loss (hashable: it keys the compiled programs).

    Attributes:
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (``beta`` 0 and 1 are the KLs).
        beta: The JSD's :math:`\beta` in ``[0, 1]``.
        temperature: :math:`T > 0`, both heads' scores are divided by it.
        scale: The divergence's factor (:math:`T^2` with ``temperature_scaling``, else 1).
        hard_weight: The hard-label cross-entropy's weight :math:`h`; the loss is
            :math:`(1-h)\,\text{scale}\,D + h\,\text{CE}` (0: no labels needed).
    """

    kind: str
    beta: float
    temperature: float
    scale: float
    hard_weight: float

    @property
    def effective(self) -> str:
        """The divergence computed: the JSD at ``beta`` 0 or 1 is a KL."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.kind


class PairStats(NamedTuple):
    """Online statistics of the student's and the teacher's softmax over the classes seen.

    Attributes:
        s: The student's (``_kernel.Stats`` with ``es``; ``tds``/``tsum`` unused, 0).
        t: The teacher's.
        cross: The KL's cross sum (see the module notes), or None for the JSD.
        hard: The student's statistics at temperature 1 with the labels' target (the hard
            cross-entropy), or None.
    """

    s: Stats
    t: Stats
    cross: jax.Array | None
    hard: Stats | None


def softmax_stats(s: jax.Array) -> Stats:
    r"""A block's max, :math:`\sum e^r` and :math:`\sum e^r r` (:math:`r = s - \mathrm{ref}`)."""
    m = lax.stop_gradient(jnp.max(s, axis=-1))
    rel = s - _kernel.reference(m)[:, None]
    e = jnp.exp(rel)
    zeros = jnp.zeros_like(m)
    es = jnp.sum(jnp.where(e == 0.0, 0.0, e * rel), axis=-1)
    return Stats(m, jnp.sum(e, axis=-1), zeros, zeros, es, None)


def _cross(w: jax.Array, v: jax.Array, m_w: jax.Array, m_v: jax.Array) -> jax.Array:
    r""":math:`\sum_l e^{w_l - \mathrm{ref}(m_w)}(v_l - \mathrm{ref}(m_v))` (0 at zero weight)."""
    e = jnp.exp(w - _kernel.reference(m_w)[:, None])
    rel = v - _kernel.reference(m_v)[:, None]
    return jnp.sum(jnp.where(e == 0.0, 0.0, e * rel), axis=-1)


def block_pair_stats(
    div: Divergence, s: jax.Array, u: jax.Array, hard: Stats | None = None
) -> PairStats:
    """:class:`PairStats` of one block of student scores ``s`` and teacher scores ``u``."""
    st_s, st_t = softmax_stats(s), softmax_stats(u)
    cross = None
    if div.effective == "forward_kl":
        cross = _cross(u, s, st_t.m, st_s.m)
    elif div.effective == "reverse_kl":
        cross = _cross(s, u, st_s.m, st_t.m)
    return PairStats(st_s, st_t, cross, hard)


def _weights_values(div: Divergence, pair: PairStats) -> tuple[Stats, Stats]:
    """``(weights, values)``: whose exponentials weigh the cross sum, whose scores it sums."""
    return (pair.t, pair.s) if div.effective == "forward_kl" else (pair.s, pair.t)


def _rebase_cross(div: Divergence, pair: PairStats, m_s: jax.Array, m_t: jax.Array) -> Any:
    if pair.cross is None:
        return None
    new = PairStats(Stats(m_s, *pair.s[1:]), Stats(m_t, *pair.t[1:]), None, None)
    (w_old, v_old), (w_new, v_new) = _weights_values(div, pair), _weights_values(div, new)
    shift = _kernel.reference(v_old.m) - _kernel.reference(v_new.m)
    return _kernel.rebase_sum(pair.cross + shift * w_old.se, w_old.m, w_new.m)


def merge(div: Divergence, a: PairStats, b: PairStats) -> PairStats:
    """The statistics of the union of two sets of classes (associative)."""
    m_s, m_t = jnp.maximum(a.s.m, b.s.m), jnp.maximum(a.t.m, b.t.m)
    cross = None
    if a.cross is not None:
        cross = _rebase_cross(div, a, m_s, m_t) + _rebase_cross(div, b, m_s, m_t)
    hard = None if a.hard is None else _kernel.merge(a.hard, b.hard)
    return PairStats(_kernel.merge(a.s, b.s), _kernel.merge(a.t, b.t), cross, hard)


def merge_shards(div: Divergence, pair: PairStats, axis_name: str) -> PairStats:
    """:func:`merge` across the shards of a mesh axis (``pmax`` of the maxima, ``psum`` else)."""
    m_s, m_t = lax.pmax(pair.s.m, axis_name), lax.pmax(pair.t.m, axis_name)
    cross = None if pair.cross is None else lax.psum(_rebase_cross(div, pair, m_s, m_t), axis_name)
    hard = None if pair.hard is None else _kernel.merge_shards(pair.hard, axis_name)
    s, t = (_kernel.merge_shards(st, axis_name) for st in (pair.s, pair.t))
    return PairStats(s, t, cross, hard)


def init(div: Divergence, shape: tuple[int, ...], dtype: Any, hard: bool) -> PairStats:
    """The statistics of no class (the fold's start)."""
    zeros = jnp.zeros(shape, dtype)
    empty = Stats(zeros - jnp.inf, zeros, zeros, zeros, zeros, None)
    cross = None if div.effective == "jsd" else zeros
    return PairStats(
        empty, empty, cross, Stats(zeros - jnp.inf, zeros, zeros, zeros) if hard else None
    )


class RowTerms(NamedTuple):
    r"""A row's divergence and the constants its derivatives need (``[R]`` each).

    ``value``: the divergence; ``k_s``/``k_t``: the constants subtracted in the student's and
    the teacher's derivative (the KL itself, or :math:`\mathrm{KL}(Q\|M)`,
    :math:`\mathrm{KL}(P\|M)` for the JSD; unused ones 0).
    """

    value: jax.Array
    k_s: jax.Array
    k_t: jax.Array


def kl_terms(div: Divergence, pair: PairStats) -> RowTerms:
    """The KL of a row from its whole statistics (forward or reverse)."""
    w, v = _weights_values(div, pair)
    # KL = E_w[r_w] - log se_w - E_w[v - ref_v] + log se_v
    value = w.es / w.se - jnp.log(w.se) - pair.cross / w.se + jnp.log(v.se)
    zeros = jnp.zeros_like(value)
    return (
        RowTerms(value, zeros, value)
        if div.effective == "forward_kl"
        else RowTerms(value, value, zeros)
    )


def log_probs(s: jax.Array, st: Stats) -> jax.Array:
    r""":math:`\log\operatorname{softmax}` of a block from the row's whole statistics."""
    return s - (_kernel.reference(st.m) + jnp.log(st.se))[:, None]


def _mixture(div: Divergence, s, u, pair: PairStats):
    """Block ``(P, Q, log P, log Q, log M)`` from the rows' whole statistics."""
    log_q, log_p = log_probs(s, pair.s), log_probs(u, pair.t)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    mix = div.beta * p + (1.0 - div.beta) * q
    return p, q, log_p, log_q, jnp.log(mix)


def _xlogy_ratio(p: jax.Array, log_p: jax.Array, log_m: jax.Array) -> jax.Array:
    r""":math:`p(\log p - \log m)`, 0 where :math:`p = 0`."""
    return jnp.where(p == 0.0, 0.0, p * (log_p - jnp.where(p == 0.0, 0.0, log_m)))


def jsd_sums(div: Divergence, s: jax.Array, u: jax.Array, pair: PairStats) -> jax.Array:
    """A block's share of ``(KL(P||M), KL(Q||M))`` ``[2, R]`` (the JSD's second pass)."""
    p, q, log_p, log_q, log_m = _mixture(div, s, u, pair)
    return jnp.stack(
        [jnp.sum(_xlogy_ratio(p, log_p, log_m), -1), jnp.sum(_xlogy_ratio(q, log_q, log_m), -1)]
    )


def jsd_terms(div: Divergence, sums: jax.Array) -> RowTerms:
    """The JSD and its derivatives' constants from the summed ``(KL(P||M), KL(Q||M))``."""
    kl_pm, kl_qm = sums[0], sums[1]
    return RowTerms(div.beta * kl_pm + (1.0 - div.beta) * kl_qm, kl_qm, kl_pm)


def score_grads(
    div: Divergence, s: jax.Array, u: jax.Array, pair: PairStats, terms: RowTerms, teacher: bool
) -> tuple[jax.Array, jax.Array | None]:
    """The divergence's derivatives w.r.t. a block's student and (``teacher``) teacher scores."""
    kind = div.effective
    log_q, log_p = log_probs(s, pair.s), log_probs(u, pair.t)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    if kind == "forward_kl":
        d_s = q - p
        d_u = _xlogy_ratio(p, log_p, log_q) - p * terms.k_t[:, None] if teacher else None
    elif kind == "reverse_kl":
        d_s = _xlogy_ratio(q, log_q, log_p) - q * terms.k_s[:, None]
        d_u = p - q if teacher else None
    else:
        p, q, log_p, log_q, log_m = _mixture(div, s, u, pair)
        d_s = (1.0 - div.beta) * (_xlogy_ratio(q, log_q, log_m) - q * terms.k_s[:, None])
        d_u = None
        if teacher:
            d_u = div.beta * (_xlogy_ratio(p, log_p, log_m) - p * terms.k_t[:, None])
    # A class outside a softmax (score -inf) has no derivative, whatever the other holds.
    d_s = jnp.where(s == NEG_INF, 0.0, d_s)
    return d_s, None if d_u is None else jnp.where(u == NEG_INF, 0.0, d_u)
