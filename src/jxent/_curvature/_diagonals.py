r"""Diagonals of the curvature of the cross-entropy of any predictor: estimated and exact.

- :func:`gnb_diagonal`: Sophia-G's Gauss-Newton-Bartlett estimator :math:`B\,\hat g\odot\hat g`,
  :math:`\hat g` the gradient of the mean loss on labels drawn from the model.
- :func:`hutchinson_diagonal`: :math:`\mathbb{E}[v\odot Hv]` over Rademacher :math:`v`, with the
  hand-derived Hessian (or GGN) product.
- :func:`ggn_diagonal`: the exact GGN diagonal from the symmetric factorisation of each
  example's logits curvature, one vector-Jacobian product per factor column.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jxent import _options, _validate
from jxent._curvature._products import ggn_vector_product, hessian_vector_product
from jxent._curvature._sampling import sample_labels
from jxent._loss import ggn_factor, loss_and_grad, prepare
from jxent._vjp import Predictor, PyTree, logits_only, named_after

# The GNB estimator is unbiased for the GGN of the plain mean cross-entropy of the model's
# distribution; these options shape that distribution or which examples the mean counts.
GNB_OPTIONS = ("axis", "where", "logit_softcap")


class GNBFn(Protocol):
    """``f(params, x, key, **options) -> diagonal estimate`` (a pytree like ``params``)."""

    def __call__(self, params: PyTree, x: Any, key: jax.Array, **options: Any) -> PyTree: ...


def gnb_diagonal(predictor: Predictor, **options: Any) -> GNBFn:
    r"""Sophia-G's Gauss-Newton-Bartlett estimate of the GGN diagonal of the mean loss.

    Returns ``f(params, x, key, **options)`` computing

    .. math::

        \hat y_i \sim \operatorname{softmax}(s_i), \qquad
        \hat g = \nabla_\theta \frac1B\sum_i \ell(h(\theta, x_i), \hat y_i), \qquad
        \hat D = B\,\hat g\odot\hat g,

    with :math:`B` the number of examples the mean averages over. Since
    :math:`\mathbb{E}_{\hat y\sim p}[(p - e_{\hat y})(p - e_{\hat y})^\top] =
    \operatorname{diag}(p) - pp^\top` and the examples' draws are independent,
    :math:`\mathbb{E}[\hat D] = \operatorname{diag}(G)` for :math:`G` the GGN of the mean
    cross-entropy -- unbiased, one backward pass per estimate.

    Options: ``axis``, ``where`` (per example: those examples are left out of :math:`B`; per
    logit: masked classes are never drawn) and ``logit_softcap`` (the draw and the loss use the
    capped scores). The estimator is unbiased only for the plain cross-entropy of the model's
    own distribution, so class weights, label smoothing, a z-loss, ``ignore_index`` and the
    reduction are refused (they would change the loss but not the labels' distribution, and the
    expectation above would no longer be the GGN): use :func:`jxent.ggn_diagonal` or
    :func:`jxent.hutchinson_diagonal` for those.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        **options: ``axis``, ``where``, ``logit_softcap``.

    Returns:
        ``f(params, x, key, **options)``: a pytree like ``params``.

    Raises:
        TypeError: Another loss option, here or when ``f`` is called.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> gnb = jax.jit(jxent.gnb_diagonal(linear.apply))
        >>> d = gnb(params, jnp.ones((8, 4)), jax.random.key(1))
        >>> bool(jnp.all(d["w"] >= 0))
        True

    References:
        Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
        Model Pre-training" (Algorithm 2); levanter's and optax.contrib's ``sophia``.
    """
    _check_gnb_options(options)

    def gnb_fn(params: PyTree, x: Any, key: jax.Array, **call_options: Any) -> PyTree:
        _check_gnb_options(call_options)
        opts = _options.merged(options, call_options, "gnb_diagonal")
        logits, pullback = jax.vjp(lambda p: logits_only(predictor(p, x)), params)
        labels = sample_labels(key, lax.stop_gradient(logits), **opts)
        prepared = prepare("gnb_diagonal", logits, labels, **opts)
        (grads,) = pullback(loss_and_grad(prepared)[1].astype(logits.dtype))
        # B: the examples the mean averages over, counted as the loss counts them.
        counted = prepared.problem.counted_rows()
        count = jnp.sum(counted).astype(jnp.promote_types(logits.dtype, jnp.float32))
        return jax.tree.map(lambda g: (count * g * g).astype(g.dtype), grads)

    return named_after(gnb_fn, "gnb_diagonal", predictor)


def _check_gnb_options(options: dict[str, Any]) -> None:
    _options.check_option_names(options, "gnb_diagonal")
    for name in options:
        if name not in GNB_OPTIONS:
            raise TypeError(
                f"gnb_diagonal() does not take {name!r}: the Gauss-Newton-Bartlett estimator is "
                "unbiased only for the plain mean cross-entropy of the model's own distribution "
                f"(options: {', '.join(GNB_OPTIONS)}); use ggn_diagonal or hutchinson_diagonal"
            )


class HutchinsonFn(Protocol):
    """``f(params, x, labels, key, num_samples=1, **options) -> diagonal estimate``."""

    def __call__(
        self,
        params: PyTree,
        x: Any,
        labels: ArrayLike,
        key: jax.Array,
        num_samples: int = 1,
        **options: Any,
    ) -> PyTree: ...


def hutchinson_diagonal(
    predictor: Predictor,
    *,
    curvature: Literal["hessian", "ggn"] = "hessian",
    **loss_options: Any,
) -> HutchinsonFn:
    r"""Hutchinson's estimate of the Hessian (or GGN) diagonal: :math:`\mathbb{E}[v\odot Hv]`.

    Returns ``f(params, x, labels, key, num_samples=1, **options)`` averaging
    :math:`v\odot Hv` over ``num_samples`` Rademacher vectors :math:`v` (entries :math:`\pm1`),
    which is unbiased because :math:`\mathbb{E}[v_i v_j] = \delta_{ij}`. :math:`Hv` is
    :func:`jxent.hessian_vector_product` (or :func:`jxent.ggn_vector_product` for
    ``curvature="ggn"``) with every loss option. The samples run one after the other
    (``lax.fori_loop``): memory of one product. Summed over all entries it is Hutchinson's
    trace estimate.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        curvature: ``"hessian"`` or ``"ggn"``.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``f(params, x, labels, key, num_samples=1, **options)``: a pytree like ``params``.

    Raises:
        ValueError: An unknown ``curvature``; (when called) ``num_samples < 1``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> f = jxent.hutchinson_diagonal(linear.apply)
        >>> d = f(params, jnp.ones((8, 4)), jnp.zeros(8, int), jax.random.key(1), num_samples=4)
        >>> d["b"].shape
        (3,)

    References:
        Hutchinson 1990; Bekas, Kokiopoulou and Saad 2007 (diagonal estimation); Yao et al.
        2021 (AdaHessian); optax.contrib ``hutchinson_estimator_diag_hessian``.
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', found {curvature!r}")
    make = hessian_vector_product if curvature == "hessian" else ggn_vector_product
    product = make(predictor, **loss_options)

    def hutchinson_fn(
        params: PyTree,
        x: Any,
        labels: ArrayLike,
        key: jax.Array,
        num_samples: int = 1,
        **options: Any,
    ) -> PyTree:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, found {num_samples!r}")

        def add_one(i: Any, total: PyTree) -> PyTree:
            v = rademacher_like(jax.random.fold_in(key, i), params)
            hv = product(params, x, labels, v, **options)
            return jax.tree.map(lambda t, a, b: t + a * b, total, v, hv)

        zeros = jax.tree.map(jnp.zeros_like, params)
        total = lax.fori_loop(0, num_samples, add_one, zeros)
        return jax.tree.map(lambda t: t / num_samples, total)

    return named_after(hutchinson_fn, "hutchinson_diagonal", predictor)


def rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Independent +1/-1 entries shaped and typed like ``tree``'s leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    signs = [
        jax.random.rademacher(k, jnp.shape(a), jnp.result_type(a))
        for k, a in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, signs)


class GGNDiagonalFn(Protocol):
    """``f(params, x, labels, **options) -> GGN diagonal`` (a pytree like ``params``)."""

    def __call__(self, params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> PyTree: ...


def ggn_diagonal(predictor: Predictor, **loss_options: Any) -> GGNDiagonalFn:
    r"""The exact diagonal of the GGN of the loss, from a symmetric factorisation.

    Each example's (row's) logits curvature factors as :math:`H_r = F_r F_r^\top` with
    :math:`F_r = [\sqrt{aT}\,S,\ \sqrt{2bz}\,p]`, :math:`S_{:,k} = \sqrt{p_k}(e_k - p)`
    (:math:`SS^\top = \operatorname{diag}(p) - pp^\top`; BackPACK's trick), scaled by the cap's
    :math:`s'`. Then

    .. math::

        \operatorname{diag}(G) = \sum_r\sum_k \big(J_r^\top F_{r,:,k}\big)^{\odot 2},

    one vector-Jacobian product per row and factor column: ``jax.vjp`` of the predictor on each
    example ``x[i:i+1]`` alone (examples are ``x``'s leading axis, one after the other with
    ``lax.scan``), its rows and the :math:`L` (or :math:`L + 1`) columns vectorised with
    ``jax.vmap``. Cost: :math:`L` backward passes per row -- meant for classifiers with small
    :math:`L`. Every loss option; needs non-negative targets and class weights (the factor's
    square roots), else NaN.

    Args:
        predictor: ``predictor(params, x) -> logits``; it must accept a batch of one example.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`.

    Returns:
        ``f(params, x, labels, **options)``: a pytree like ``params``.

    Raises:
        TypeError: A misspelled loss option (here or in the call).
        ValueError: (from ``f``) logits whose leading axis is a class axis, no examples, and
            what the loss raises for its labels and options.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}  # p = 1/3 for every class
        >>> d = jxent.ggn_diagonal(linear.apply)(params, jnp.ones((2, 4)), jnp.array([0, 1]))
        >>> print(d["b"].round(6))  # the mean of diag(p) - pp^T over 2 examples: 1/3 - 1/9 = 2/9
        [0.222222 0.222222 0.222222]

    References:
        Dangel, Kunstner and Hennig 2020 (BackPACK: ``DiagGGNExact``); Martens 2020.
    """
    _options.check_option_names(loss_options, "ggn_diagonal")

    def ggn_diagonal_fn(params: PyTree, x: Any, labels: ArrayLike, **options: Any) -> PyTree:
        opts = _options.merged(loss_options, options, "ggn_diagonal")
        logits = logits_only(predictor(params, x))
        factor, layout = ggn_factor(lax.stop_gradient(logits), labels, **opts)
        examples = logits.shape[0]
        if layout.perm[0] != 0 or examples == 0:
            raise ValueError(
                "ggn_diagonal needs the logits' leading axis to be the examples' (not a class "
                f"axis), found logits of shape {logits.shape} with axis={opts.get('axis', -1)}"
            )
        one = _validate.Layout(layout.perm, (1, *layout.batch_shape[1:]), layout.class_shape)
        per_example = factor.reshape(examples, -1, *factor.shape[1:])  # [B, R_i, L, K]

        def add_example(total: PyTree, inputs: tuple) -> tuple[PyTree, None]:
            x_i, f_i = inputs
            x_one = jax.tree.map(lambda a: a[None], x_i)  # a batch of one example
            _, pullback = jax.vjp(lambda p: logits_only(predictor(p, x_one)), params)
            rows = f_i.shape[0]
            # cotangent (r, k): row r holds column k of F_r, every other row is zero
            columns = jnp.transpose(f_i, (2, 0, 1))  # [K, R_i, L]
            one_hot = jnp.eye(rows, dtype=f_i.dtype)[:, None, :, None]  # [R_i, 1, R_i, 1]
            cot = (one_hot * columns[None]).reshape(-1, rows, f_i.shape[1])  # [(r, k), R_i, L]

            def squared(c: jax.Array) -> PyTree:
                (g,) = pullback(one.from_rows(c).astype(logits.dtype))
                return jax.tree.map(jnp.square, g)

            sums = jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(squared)(cot))
            return jax.tree.map(jnp.add, total, sums), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, _ = lax.scan(add_example, zeros, (x, per_example))
        return total

    return named_after(ggn_diagonal_fn, "ggn_diagonal", predictor)
