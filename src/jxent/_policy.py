r"""The clipped policy objective of PPO and GRPO, with normalisers exact over micro-batches.

Per token :math:`t` of sequence :math:`i`, with the importance ratio
:math:`r = \exp(\log\pi_\theta - \log\pi_{\text{old}})`, the advantage :math:`A`, the
reference log-probability :math:`\log\pi_{\text{ref}}` and the entropy :math:`H`,

.. math::

    \ell_{it} = -\min\bigl(r A,\ \operatorname{clip}(r, 1 - \epsilon, 1 + \epsilon_{high}) A\bigr)
        + \beta\,\bigl(e^{\delta} - \delta - 1\bigr) - c_H H,
    \qquad \delta = \log\pi_{\text{ref}} - \log\pi_\theta,

the middle term Schulman's k3 estimator of :math:`KL(\pi_\theta \| \pi_{\text{ref}})`. The
objective sums the counted tokens (:math:`m_{it}`) with a weight and one denominator:

.. math::

    J = \frac{1}{D} \sum_{i,t} m_{it}\, w_{it}\, \ell_{it}, \qquad
    \begin{array}{lll}
    \texttt{token\_mean} & w = 1 & D = \sum_{i,t} m_{it} \\
    \texttt{sequence\_mean} & w = 1/n_i & D = S \\
    \texttt{token\_sum} & w = 1 & D = S\,T
    \end{array}

with :math:`n_i = \sum_t m_{it}` the length of sequence :math:`i`, :math:`S` the number of
sequences with at least one counted token and :math:`T` the padded length. Only :math:`D`
couples the sequences, and it depends on the masks alone: taken over the *whole* batch
(:func:`policy_denominator`) and passed to each micro-batch's :func:`policy_loss`, the
micro-batches' losses and gradients add up to the whole batch's exactly. Under ``jit`` on a
data-sharded batch ``jnp.sum`` already covers every device. Recipe: docs/rl.md.
"""

from __future__ import annotations

import numbers
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

LossType = Literal["token_mean", "sequence_mean", "token_sum"]
LOSS_TYPES = ("token_mean", "sequence_mean", "token_sum")
MAX_LOG = 20.0  # log-ratios are clamped to [-20, 20] before exponentials, as verl does


class PolicyMetrics(NamedTuple):
    """The objective's parts, each aggregated as the loss is (same weights, same denominator).

    So ``loss == pg_loss + kl_coef * kl - entropy_coef * entropy``, and each field adds up over
    micro-batches as the loss does. With ``"token_mean"`` and ``"sequence_mean"`` they are
    means (``clip_low`` and ``clip_high`` fractions of tokens); with ``"token_sum"`` they carry
    its constant normaliser.
    """

    pg_loss: jax.Array  # the clipped surrogate, -min(r A, clip(r) A)
    kl: jax.Array  # k3 estimate of KL(policy || reference); 0 without ref_log_prob
    entropy: jax.Array  # 0 without entropy
    clip_low: jax.Array  # tokens whose ratio is clipped at 1 - epsilon (A < 0): no gradient
    clip_high: jax.Array  # tokens whose ratio is clipped at 1 + epsilon_high (A > 0)


def _check_loss_type(loss_type: str, ndim: int, name: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, found {loss_type!r}")
    if ndim == 0:
        raise ValueError(f"{name} must be per token ([N] or [..., T]), found a scalar")
    if ndim == 1 and loss_type != "token_mean":
        raise ValueError(
            f"loss_type={loss_type!r} needs sequences: {name} shaped [..., T] (sequences by "
            f"tokens), found one axis; flat tokens [N] take loss_type='token_mean'"
        )


def _check_where(where: jax.typing.ArrayLike, shape: tuple[int, ...] | None) -> jax.Array:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, found dtype {where.dtype}")
    if shape is not None and where.shape != shape:
        raise ValueError(f"where must be shaped like log_prob, {shape}, found {where.shape}")
    return where


def _shaped(a: jax.typing.ArrayLike, name: str, shape: tuple[int, ...]) -> jax.Array:
    a = jnp.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{name} must be shaped like log_prob, {shape}, found {a.shape}")
    return a


def _per_token_advantages(advantages: jax.typing.ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    advantages = jnp.asarray(advantages)
    if len(shape) >= 2 and advantages.shape == shape[:-1]:
        return advantages[..., None]  # one per sequence
    if advantages.shape != shape:
        per_sequence = f"or per sequence, {shape[:-1]}, " if len(shape) >= 2 else ""
        raise ValueError(
            f"advantages must be per token, {shape}, {per_sequence}found {advantages.shape}"
        )
    return advantages


def _is_zero(coef: object) -> bool:
    return isinstance(coef, numbers.Real) and coef == 0


def policy_denominator(
    where: jax.typing.ArrayLike, *, loss_type: LossType = "token_mean"
) -> jax.Array:
    r"""The denominator :math:`D` of :func:`policy_loss` over a whole batch, from its mask.

    .. math::

        D_{\texttt{token\_mean}} = \sum_{i,t} m_{it}, \qquad
        D_{\texttt{sequence\_mean}} = S, \qquad D_{\texttt{token\_sum}} = S\,T,

    :math:`S` the number of sequences with at least one counted token (fully masked rows, e.g.
    padding to fill a micro-batch, do not count), :math:`T` the padded length. Compute it on
    the whole batch's mask and pass it to each micro-batch's ``policy_loss(...,
    denominator=D)``: their losses and gradients then add up to the whole batch's. It is a
    count, so the counts of disjoint parts of a batch add up: under ``jit`` on a sharded
    ``where`` the sum covers every device; inside ``shard_map``, ``jax.lax.psum`` each
    device's count over the batch axes.

    Args:
        where: Boolean mask of the counted tokens, ``[N]`` (``"token_mean"`` only) or
            ``[..., T]`` (sequences by tokens).
        loss_type: As given to :func:`policy_loss`.

    Returns:
        A float32 scalar (float64 under x64); 0 when nothing counts (``policy_loss`` then
        returns 0).

    Raises:
        ValueError: An unknown ``loss_type``, or a sequence ``loss_type`` for ``[N]``.
        TypeError: ``where`` not boolean.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> where = jnp.array([[True, True, False], [True, False, False], [False] * 3])
        >>> [float(jxent.policy_denominator(where, loss_type=t))
        ...  for t in ("token_mean", "sequence_mean", "token_sum")]
        [3.0, 2.0, 6.0]
    """
    where = _check_where(where, None)
    _check_loss_type(loss_type, where.ndim, "where")
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(float))
    if loss_type == "token_mean":
        return jnp.sum(where, dtype=dtype)
    sequences = jnp.sum(jnp.any(where, axis=-1), dtype=dtype)
    return sequences * where.shape[-1] if loss_type == "token_sum" else sequences


def policy_loss(
    log_prob: jax.typing.ArrayLike,
    old_log_prob: jax.typing.ArrayLike,
    advantages: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None,
    ref_log_prob: jax.typing.ArrayLike | None = None,
    entropy: jax.typing.ArrayLike | None = None,
    epsilon: float | jax.Array = 0.2,
    epsilon_high: float | jax.Array | None = None,
    kl_coef: float | jax.Array = 0.0,
    entropy_coef: float | jax.Array = 0.0,
    loss_type: LossType = "token_mean",
    denominator: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, PolicyMetrics]:
    r"""The clipped policy-gradient objective (PPO, GRPO, DAPO, Dr. GRPO) from per-token arrays.

    .. math::

        J = \frac{1}{D} \sum_{i,t} m_{it}\, w_{it} \Bigl[
            -\min\bigl(r A, \operatorname{clip}(r, 1 - \epsilon, 1 + \epsilon_{high}) A\bigr)
            + \beta\,(e^{\delta} - \delta - 1) - c_H H \Bigr],

    :math:`r = e^{\log\pi_\theta - \log\pi_{old}}`, :math:`\delta = \log\pi_{ref} -
    \log\pi_\theta`, :math:`\beta` = ``kl_coef``, :math:`c_H` = ``entropy_coef``; the weights
    :math:`w` and the denominator :math:`D` by ``loss_type`` (module docstring). Its gradient
    in :math:`\log\pi_\theta` per counted token is :math:`\frac{w}{D}\bigl[-r A\,[\text{not
    clipped}] + \beta(1 - e^{\delta})\bigr]`, plus :math:`-\frac{w}{D} c_H` along the
    entropy; clipped tokens (``clip_low``, ``clip_high``) pass no surrogate gradient.

    ``loss_type`` and the field's names for it: ``"token_mean"`` is DAPO's token-level mean
    (TRL ``loss_type="dapo"``, verl ``loss_agg_mode="token-mean"``; TRL's ``"bnpo"`` is the same
    with each micro-batch's own count), ``"sequence_mean"`` GRPO's mean of per-sequence means
    (TRL ``"grpo"``, verl ``"seq-mean-token-mean"``), ``"token_sum"`` Dr. GRPO's sum over a
    constant (TRL ``"dr_grpo"``, verl ``"seq-mean-token-sum-norm"``; pass ``denominator=B *
    max_completion_length`` for TRL's exact constant, ``denominator=S`` for verl's
    ``"seq-mean-token-sum"``).

    Tokens outside ``where`` contribute nothing and pass no gradient, whatever their values
    (NaN and infinite log-probabilities included): they are replaced before the exponentials.
    The log-ratios :math:`\log\pi_\theta - \log\pi_{\text{old}}` and
    :math:`\log\pi_{\text{ref}} - \log\pi_\theta` are clamped to :math:`[-20, 20]` first
    (verl's convention): a ratio of :math:`e^{99}` would overflow float32, and its product
    with an advantage of 0 be NaN; beyond the clamp the token passes no gradient.

    Args:
        log_prob: The policy's log-probability of each sampled token, ``[..., T]`` (sequences
            by tokens) or ``[N]`` (flat tokens, ``"token_mean"`` only); what
            ``jxent.linear_log_probs(...).log_prob`` gives, reshaped.
        old_log_prob: The sampling policy's, shaped like ``log_prob`` (constants; for an
            on-policy step ``jax.lax.stop_gradient(log_prob)``).
        advantages: Per token (``log_prob``'s shape) or per sequence (its shape without the
            token axis, broadcast over the tokens).
        where: Boolean mask of the counted tokens (the completion mask), shaped like
            ``log_prob``; None counts every token.
        ref_log_prob: The reference policy's log-probabilities for the KL term, or None.
        entropy: The policy's per-token entropy for the bonus (``linear_log_probs(...)
            .entropy``), or None.
        epsilon: The lower clip, :math:`r \ge 1 - \epsilon` (PPO's 0.2).
        epsilon_high: The upper clip, :math:`r \le 1 + \epsilon_{high}` (DAPO's clip-higher:
            0.28); None: ``epsilon``.
        kl_coef: :math:`\beta` (TRL's ``beta``); nonzero needs ``ref_log_prob``.
        entropy_coef: :math:`c_H`; nonzero needs ``entropy``.
        loss_type: ``"token_mean"``, ``"sequence_mean"`` or ``"token_sum"``.
        denominator: :math:`D` of the whole batch (:func:`policy_denominator` of its mask) when
            this call sees one micro-batch or one device's share; None: this call's own.

    Returns:
        ``(loss, metrics)``: the scalar :math:`J` (float32, or float64 when an input is) and a
        :class:`PolicyMetrics` of its parts, aggregated as the loss is.

    Raises:
        ValueError: An array not shaped like ``log_prob``, an unknown ``loss_type``, a negative
            ``epsilon``, a non-scalar ``denominator``, or a nonzero coefficient without its
            array.
        TypeError: ``log_prob`` not floating, ``where`` not boolean.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> log_prob = jnp.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
        >>> where = jnp.array([[True, True, False], [True, False, False]])
        >>> advantages = jnp.array([1.0, -1.0])  # one per sequence
        >>> loss, metrics = jxent.policy_loss(log_prob, log_prob - 0.5, advantages, where=where)
        >>> # r = e^0.5 on every token: clipped to 1.2 where A > 0, so (2 (-1.2) + e^0.5) / 3
        >>> round(float(loss), 4), round(float(metrics.clip_high), 4)
        (-0.2504, 0.6667)

    References:
        Schulman et al., *Proximal Policy Optimization Algorithms* (2017); Shao et al.,
        *DeepSeekMath* (2024, GRPO); Yu et al., *DAPO* (2025); Liu et al., *Understanding
        R1-Zero-Like Training* (2025, Dr. GRPO); Schulman, *Approximating KL Divergence*
        (2020, k3).
    """
    log_prob = jnp.asarray(log_prob)
    if not jnp.issubdtype(log_prob.dtype, jnp.floating):
        raise TypeError(f"log_prob must have a floating dtype, found {log_prob.dtype}")
    shape = log_prob.shape
    _check_loss_type(loss_type, log_prob.ndim, "log_prob")
    counted = jnp.ones(shape, bool) if where is None else _check_where(where, shape)
    old_log_prob = _shaped(old_log_prob, "old_log_prob", shape)
    advantages = _per_token_advantages(advantages, shape)
    if ref_log_prob is not None:
        ref_log_prob = _shaped(ref_log_prob, "ref_log_prob", shape)
    elif not _is_zero(kl_coef):
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_log_prob, found None")
    if entropy is not None:
        entropy = _shaped(entropy, "entropy", shape)
    elif not _is_zero(entropy_coef):
        raise ValueError(f"entropy_coef={entropy_coef!r} needs entropy, found None")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
        if isinstance(value, numbers.Real) and value < 0:
            raise ValueError(f"{name} must be >= 0, found {value!r}")
    if denominator is None:
        denominator = policy_denominator(counted, loss_type=loss_type)
    elif jnp.shape(denominator) != ():
        raise ValueError(f"denominator must be a scalar, found shape {jnp.shape(denominator)}")

    given = [
        a for a in (log_prob, old_log_prob, advantages, ref_log_prob, entropy) if a is not None
    ]
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(*given))

    def counted_only(a: jax.Array | None) -> jax.Array:
        # Before any exponential: a masked token's NaN or inf must not reach the gradient.
        return jnp.zeros(shape, dtype) if a is None else jnp.where(counted, a.astype(dtype), 0)

    log_policy = counted_only(log_prob)
    # Log-ratios clamped to [-20, 20] before the exponentials (verl's convention): exp(99) is
    # inf in float32, and inf * 0 (an advantage of 0, common in GRPO groups) would be NaN.
    ratio = jnp.exp(jnp.clip(log_policy - counted_only(old_log_prob), -MAX_LOG, MAX_LOG))
    advantages = counted_only(advantages)
    pg = -jnp.minimum(
        ratio * advantages, jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    )
    delta = jnp.clip(counted_only(ref_log_prob) - log_policy, -MAX_LOG, MAX_LOG)
    kl = jnp.zeros(shape, dtype) if ref_log_prob is None else jnp.expm1(delta) - delta
    bonus = counted_only(entropy)

    weights = counted.astype(dtype)
    if loss_type == "sequence_mean":
        lengths = jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights / jnp.where(lengths == 0, 1, lengths)
    denominator = jnp.asarray(denominator, dtype)
    weights = weights / jnp.where(denominator == 0, 1, denominator)  # 0 counted: loss 0

    def aggregate(per_token: jax.Array) -> jax.Array:
        return jnp.sum(weights * per_token.astype(dtype))

    metrics = PolicyMetrics(
        pg_loss=aggregate(pg),
        kl=aggregate(kl),
        entropy=aggregate(bonus),
        clip_low=aggregate((ratio < 1 - epsilon) & (advantages < 0)),
        clip_high=aggregate((ratio > 1 + epsilon_high) & (advantages > 0)),
    )
    return aggregate(pg + kl_coef * kl - entropy_coef * bonus), metrics
