r"""Per-token log-probabilities, entropy and statistics of materialised logits at a temperature.

With scores :math:`s = \operatorname{cap}(z)/T` and :math:`p = \operatorname{softmax}(s)`,
:func:`log_probs` returns each row's :math:`\log p_y`, entropy, log-sum-exp and argmax from one
softmax (``_kernel``'s statistics with the entropy's sum), and its derivative is a
``jax.custom_jvp`` whose tangent contracts :math:`\dot s` with the row's hand-derived
:math:`(e_y - p, -p\odot(\log p + H), p)` (``_kernel.log_prob_sums``): the one-block case of
:func:`jxent.linear_log_probs`, which runs the same kernel over vocabulary blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent import _kernel, _loss, _options
from jxent._problem import Problem


class LogProbs(NamedTuple):
    r"""Per-token fields of the softmax at a temperature (``[N]`` each, or the batch's shape).

    Attributes:
        log_prob: :math:`\log p_y`, float32 (float64 for float64 inputs); 0 where a token
            does not count (``where``, ``ignore_index``), NaN for a counted out-of-range label.
        entropy: :math:`H = -\sum_l p_l\log p_l` (nats); 0 where a token does not count.
        lse: :math:`\log\sum_l e^{s_l}` of the scores at the temperature; 0 where a token
            does not count.
        argmax: ``int32``: the most probable class (the first on ties), for every token.
    """

    log_prob: jax.Array
    entropy: jax.Array
    lse: jax.Array
    argmax: jax.Array


def check_temperature(temperature: ArrayLike, function: str) -> jax.Array:
    """A positive real scalar; raises eagerly on anything else (NaN rows under ``jit``)."""
    t = jnp.asarray(temperature)
    if t.shape != ():
        raise ValueError(f"{function}: temperature must be a scalar, found shape {t.shape}")
    if not jnp.issubdtype(t.dtype, jnp.floating) and not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"{function}: temperature must be a real number, found dtype {t.dtype}")
    if not isinstance(t, jax.core.Tracer) and not float(t) > 0:
        raise ValueError(f"{function}: temperature must be > 0, found {float(t)}")
    return t


def _scores(x: jax.Array, t: jax.Array, problem: Problem):
    """Scores, their derivative, the label's target piece and the extra statistics."""
    config = problem.config
    s, ds = _kernel.scaled_scores(config, x, t)
    if problem.class_mask is not None:
        s = jnp.where(problem.class_mask, s, _kernel.NEG_INF)
        ds = jnp.where(problem.class_mask, ds, 0.0)  # a masked logit may be NaN padding
    target = _kernel.target_block(config, problem.rows.labels, None, 0.0, s, 0)
    return s, ds, target, _kernel.block_stats(s, target, extra=True)


@jax.custom_jvp
def _fields(x: jax.Array, t: jax.Array, problem: Problem) -> tuple:
    """``(log_prob, entropy, lse, argmax)`` of rows ``x`` ``[R, L]``."""
    return _kernel.log_prob_fields(problem.rows, _scores(x, t, problem)[3])


def _fields_jvp(primals: tuple, tangents: tuple) -> tuple:
    (x, t, problem), (x_dot, t_dot, _) = primals, tangents
    s, ds, target, stats = _scores(x, t, problem)
    out = _kernel.log_prob_fields(problem.rows, stats)
    x_dot = None if isinstance(x_dot, SymbolicZero) else x_dot
    t_dot = None if isinstance(t_dot, SymbolicZero) else t_dot
    s_dot = _kernel.scores_dot(s, ds, x_dot, t_dot, t)
    sums = _kernel.log_prob_sums(problem.rows, s, s_dot, target, stats)
    zero_arg = np.zeros(out[3].shape, jax.dtypes.float0)
    return out, (*_kernel.log_prob_tangents(problem.rows, stats, sums), zero_arg)


_fields.defjvp(_fields_jvp, symbolic_zeros=True)
_fields_jit = jax.jit(_fields)


@_options.suggests_misspellings
def log_probs(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    temperature: ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> LogProbs:
    r"""Per-example log-probability, entropy, log-sum-exp and argmax of ``softmax(logits / T)``.

    With scores :math:`s = \operatorname{cap}(z)/T` (``logit_softcap`` first, then the
    ``temperature``) and :math:`p = \operatorname{softmax}(s)` over the class ``axis``:

    .. math::

        \log p_y = s_y - \operatorname{lse}(s), \qquad H = -\sum_l p_l\log p_l, \qquad
        \operatorname{lse}(s), \qquad \arg\max_l s_l,

    from one softmax. ``log_prob``, ``entropy`` and ``lse`` are differentiable in ``logits``
    and ``temperature`` in every autodiff mode by the hand-derived rule
    :math:`\partial\log p_y/\partial s = e_y - p`, :math:`\partial H/\partial s =
    -p\odot(\log p + H)`, :math:`\partial\operatorname{lse}/\partial s = p`
    (``docs/derivation.md``). The fused twin for an LM head is :func:`linear_log_probs`.

    Args:
        logits: Floating ``[..., L]`` (classes along ``axis``).
        labels: Integer class indices, the logits' shape without the class axis.
        axis: The class axis (or axes).
        temperature: :math:`T > 0`, a scalar.
        logit_softcap: :math:`c`: scores :math:`c\tanh(z/c)` before the temperature.
        where: Boolean mask of the examples' shape (examples that count) or of the logits'
            shape (classes outside the softmax).
        ignore_index: Label value of examples that do not count.

    Returns:
        :class:`LogProbs` in the examples' shape: float fields in the compute dtype (float32
        for bfloat16/float16 logits), 0 where an example does not count, NaN for a counted
        out-of-range label; ``argmax`` int32 (the first on ties).

    Raises:
        TypeError: Non-floating logits, probability labels, a non-real temperature.
        ValueError: Shapes that do not match, labels out of range, a temperature <= 0
            (eagerly; under ``jit`` the example's fields become NaN).

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> out = jxent.log_probs(jnp.array([[0.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1]))
        >>> print(out.log_prob, out.argmax)
        [-0.6931472 -2.126928 ] [0 0]

    References:
        ``torch.distributions.Categorical(logits=logits / T).log_prob``/``.entropy``; TRL's
        ``selective_log_softmax``.
    """
    options = {"axis": axis, "reduction": "none", "where": where, "ignore_index": ignore_index}
    prepared = _loss.prepare("log_probs", logits, labels, logit_softcap=logit_softcap, **options)
    problem = prepared.problem
    if problem.config.soft:
        raise TypeError(
            "log_probs: labels must be integer class indices, found probabilities of dtype "
            f"{jnp.asarray(labels).dtype}"
        )
    t = check_temperature(temperature, "log_probs").astype(prepared.logits.dtype)
    rows = problem.rows._replace(bad=problem.rows.bad | (problem.rows.counted & ~(t > 0)))
    problem = Problem(problem.config, rows, problem.options, problem.class_mask)
    out = _fields_jit(prepared.logits, t, problem)
    shape = prepared.layout.batch_shape
    return LogProbs(*(v.reshape(shape) for v in out))
