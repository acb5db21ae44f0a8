r"""Curvature-vector products of the cross-entropy of any predictor, hand-derived like the gradient.

With logits :math:`h(\theta, x)`, the logits gradient :math:`g = \partial J/\partial h` and the
logits Hessian :math:`H = \partial^2 J/\partial h^2` (:func:`jxent.logits_hvp`):

.. math::

    \nabla^2_\theta J\,v = J_h^\top H J_h v + \sum_l g_l\,\nabla^2_\theta h_l\,v, \qquad
    G v = J_h^\top H_{\text{GGN}} J_h v,

where :math:`J_h = \partial h/\partial\theta`. The generalised Gauss-Newton product :math:`Gv`
is one ``jax.linearize`` of the predictor (:math:`J_h v`), the hand-derived :math:`H_{\text{GGN}}`
in between, and the transpose of the same linear map (:math:`J_h^\top u`). The Hessian product is
forward-over-reverse on the hand-derived gradient: ``jax.jvp`` of :func:`jxent.grad`, whose
logits gradient :math:`g` is a ``jax.custom_jvp`` with tangent :math:`Hv` -- so the loss's part
is hand-derived, and JAX supplies the predictor's second derivative.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent import _options
from jxent._loss import logits_hvp
from jxent._vjp import (
    Predictor,
    PyTree,
    logits_and_aux,
    logits_only,
    loss_grads_and_logits,
    named_after,
)


class CurvatureProductFn(Protocol):
    """``f(params, x, labels, v, **options) -> product`` (``(product, aux)`` with ``has_aux``)."""

    def __call__(
        self, params: PyTree, x: Any, labels: ArrayLike, v: PyTree, **options: Any
    ) -> Any: ...


def ggn_vector_product(
    predictor: Predictor, *, has_aux: bool = False, **loss_options: Any
) -> CurvatureProductFn:
    r"""The generalised Gauss-Newton (= Fisher) product of softmax cross-entropy on ``predictor``.

    Returns ``f(params, x, labels, v, **options)`` computing

    .. math::

        G v = J_h^\top\, H_{\text{GGN}}\, J_h v, \qquad J_h = \partial h(\theta, x)/\partial\theta,

    with :math:`J_h v` from ``jax.linearize`` of the predictor, :math:`H_{\text{GGN}}` the
    hand-derived positive semi-definite logits curvature of :func:`jxent.logits_hvp`
    (``curvature="ggn"``: :math:`T(\operatorname{diag}(p) - pp^\top) + 2z\,pp^\top` per example,
    the soft cap counted as part of the model) and :math:`J_h^\top u` the transpose of the same
    linear map (no second forward pass). :math:`G` is symmetric and positive semi-definite for
    non-negative targets and class weights.

    For softmax cross-entropy with plain labels and no z-loss, :math:`G` is also the (true)
    Fisher information :math:`\mathbb{E}_{y\sim p}[\nabla_\theta\log p_y\,\nabla_\theta\log
    p_y^\top]` of the model's predictive distribution (summed or averaged over examples as the
    reduction says): the expectation is over labels *drawn from the model*, so the given labels
    do not enter. The *empirical* Fisher :math:`\sum_i \nabla\ell_i\nabla\ell_i^\top` uses the
    given labels instead; it equals neither :math:`G` nor the Hessian in general (Kunstner et
    al. 2019) and is not what this function computes.

    Args:
        predictor: ``predictor(params, x) -> logits`` (``-> (logits, aux)`` with ``has_aux``).
        has_aux: Whether the predictor returns ``(logits, aux)``; ``f`` then returns
            ``(product, aux)``.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad` (``reduction``, ...);
            options given to ``f`` override them. ``reduction="none"`` gives the product for the
            sum of the per-example losses, as :func:`jxent.grad` gives their sum's gradient.

    Returns:
        ``f(params, x, labels, v, **options)``; ``v`` and the product are pytrees like
        ``params`` (the product in the parameters' dtypes).

    Raises:
        TypeError: (when ``f`` is called) as :func:`jxent.value_and_grad`; a floating leaf of
            ``v`` whose dtype differs from the parameter's.
        ValueError: (when ``f`` is called) ``v`` not shaped like ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> ggn = jax.jit(jxent.ggn_vector_product(linear.apply))
        >>> v = jax.tree.map(jnp.ones_like, params)
        >>> gv = ggn(params, jnp.ones((2, 4)), jnp.array([0, 2]), v)
        >>> gv["w"].shape
        (4, 3)

    References:
        Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient
        descent"; Martens 2020, "New insights and perspectives on the natural gradient method";
        Kunstner, Hennig and Balles 2019, "Limitations of the empirical Fisher approximation";
        BackPACK and curvlinops (``GGNLinearOperator``) for PyTorch.
    """
    _options.check_option_names(loss_options, "ggn_vector_product")

    def ggn_fn(params: PyTree, x: Any, labels: ArrayLike, v: PyTree, **options: Any) -> Any:
        _options.check_option_names(options, "ggn_vector_product")
        _check_like_params(v, params)
        # Linearised in the floating leaves only: linear_transpose has no integer (float0) inputs.
        leaves, treedef = jax.tree.flatten(params)
        floating = [_is_floating(a) for a in leaves]

        def of_floats(float_leaves: list) -> Any:
            it = iter(float_leaves)
            full = [next(it) if f else a for a, f in zip(leaves, floating, strict=True)]
            out = predictor(jax.tree.unflatten(treedef, full), x)
            return logits_and_aux(out) if has_aux else (logits_only(out), None)

        primals = [a for a, f in zip(leaves, floating, strict=True) if f]
        logits, jvp, aux = jax.linearize(of_floats, primals, has_aux=True)
        v_floats = [t for t, f in zip(jax.tree.leaves(v), floating, strict=True) if f]
        opts = _options.merged(loss_options, options, "ggn_vector_product")
        u = logits_hvp(logits, labels, jvp(v_floats), curvature="ggn", **opts)
        (product_floats,) = jax.linear_transpose(jvp, primals)(u)
        it = iter(product_floats)
        product = [
            next(it) if f else _float0_zeros(a) for a, f in zip(leaves, floating, strict=True)
        ]
        product = jax.tree.unflatten(treedef, product)
        return (product, aux) if has_aux else product

    return named_after(ggn_fn, "ggn_vector_product", predictor)


def hessian_vector_product(
    predictor: Predictor, *, has_aux: bool = False, **loss_options: Any
) -> CurvatureProductFn:
    r"""The exact Hessian product of softmax cross-entropy on ``predictor``.

    Returns ``f(params, x, labels, v, **options)`` computing

    .. math::

        \nabla^2_\theta J\,v = J_h^\top \big(\nabla^2_h \ell\big) J_h v
        + \sum_l g_l\,\nabla^2_\theta h_l\,v,

    the Gauss-Newton term (with the exact logits Hessian of :func:`jxent.logits_hvp`, including
    the soft cap's :math:`s''` and the z-loss's :math:`\operatorname{lse}` terms) plus the
    predictor's curvature weighted by the logits gradient :math:`g`. It is forward-over-reverse:
    ``jax.jvp`` of :func:`jxent.grad` along ``v``, whose logits gradient carries the
    hand-derived Hessian as its ``custom_jvp`` tangent. Not positive semi-definite in general.

    Args:
        predictor: ``predictor(params, x) -> logits`` (``-> (logits, aux)`` with ``has_aux``).
        has_aux: Whether the predictor returns ``(logits, aux)``; ``f`` then returns
            ``(product, aux)``.
        **loss_options: Options of :func:`jxent.loss_and_logits_grad`; ``reduction="none"``
            gives the product for the sum of the per-example losses.

    Returns:
        ``f(params, x, labels, v, **options)``; ``v`` and the product are pytrees like
        ``params``.

    Raises:
        TypeError: (when ``f`` is called) as :func:`jxent.value_and_grad`; a floating leaf of
            ``v`` whose dtype differs from the parameter's.
        ValueError: (when ``f`` is called) ``v`` not shaped like ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import mlp
        >>> params = mlp.init(jax.random.key(0), [4, 8, 3])
        >>> hvp = jax.jit(jxent.hessian_vector_product(mlp.apply))
        >>> v = jax.tree.map(jnp.ones_like, params)
        >>> hv = hvp(params, jnp.ones((2, 4)), jnp.array([0, 2]), v)
        >>> jax.tree.structure(hv) == jax.tree.structure(params)
        True

    References:
        Pearlmutter 1994, "Fast exact multiplication by the Hessian"; the JAX autodiff cookbook
        (forward-over-reverse); PyHessian and curvlinops (``HessianLinearOperator``).
    """
    _options.check_option_names(loss_options, "hessian_vector_product")

    def hvp_fn(params: PyTree, x: Any, labels: ArrayLike, v: PyTree, **options: Any) -> Any:
        def grads(p: PyTree) -> Any:
            out = loss_grads_and_logits(
                predictor, p, x, labels, loss_options, options, "hessian_vector_product", has_aux
            )
            return out.grads, out.aux

        _check_like_params(v, params)
        _, product, aux = jax.jvp(grads, (params,), (v,), has_aux=True)
        return (product, aux) if has_aux else product

    return named_after(hvp_fn, "hessian_vector_product", predictor)


def _is_floating(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _float0_zeros(a: Any) -> np.ndarray:
    """The tangent of an integer leaf, as ``jax.jvp`` and ``jax.grad`` give it."""
    return np.zeros(jnp.shape(a), jax.dtypes.float0)


def _check_like_params(v: PyTree, params: PyTree) -> None:
    """``v`` must be a pytree of the parameters' structure, shapes and (floating) dtypes."""
    if jax.tree.structure(v) != jax.tree.structure(params):
        raise ValueError(
            f"v must have the structure of params, {jax.tree.structure(params)}; found "
            f"{jax.tree.structure(v)}"
        )
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, p), t in zip(leaves, jax.tree.leaves(v), strict=True):
        name = jax.tree_util.keystr(path)
        if jnp.shape(t) != jnp.shape(p):
            raise ValueError(
                f"v{name} must have the shape of params{name}, {jnp.shape(p)}; found {jnp.shape(t)}"
            )
        if _is_floating(p) and jnp.result_type(t) != jnp.result_type(p):
            raise TypeError(
                f"v{name} must have the dtype of params{name}, {jnp.result_type(p)}; found "
                f"{jnp.result_type(t)} (cast it: jax.tree.map(lambda t, p: t.astype(p.dtype), "
                "v, params))"
            )
