r"""Spectra of the Hessian and the GGN of the loss: Lanczos and stochastic Lanczos quadrature.

:func:`lanczos` builds an orthonormal Krylov basis of a symmetric linear map on pytrees (full
reorthogonalisation), :func:`top_eigenvalues` returns the Ritz values of the curvature,
:func:`spectral_density` the smoothed spectral density by stochastic Lanczos quadrature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from jxent import _options
from jxent._curvature._diagonals import rademacher_like
from jxent._curvature._products import ggn_vector_product, hessian_vector_product
from jxent._vjp import Predictor, PyTree

Curvature = Literal["hessian", "ggn"]


class LanczosResult(NamedTuple):
    r"""The tridiagonal :math:`T = V^\top A V` and the basis :math:`V`.

    Attributes:
        alphas: :math:`T`'s diagonal ``[m]``.
        betas: Its off-diagonal ``[m - 1]`` (0 where the Krylov space was exhausted and the
            iteration restarted from a new random direction).
        vectors: The orthonormal basis, a pytree like ``v0`` with a leading axis ``[m]``.
    """

    alphas: jax.Array
    betas: jax.Array
    vectors: PyTree


def lanczos(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    num_iters: int,
    *,
    key: jax.Array | None = None,
) -> LanczosResult:
    r"""``num_iters`` steps of Lanczos with full reorthogonalisation, on pytrees.

    For a symmetric linear map :math:`A` (e.g. a Hessian- or GGN-vector product) and a start
    :math:`v_0`, builds orthonormal :math:`V = [v_1, \dots, v_m]` and the tridiagonal
    :math:`T = V^\top A V`; the eigenvalues of :math:`T` (Ritz values) approximate :math:`A`'s
    extreme eigenvalues first. Each new vector is orthogonalised against all previous ones twice
    (classical Gram-Schmidt, twice is enough: Giraud et al. 2005), so no spurious copies of
    converged eigenvalues appear. When the Krylov space is exhausted (an invariant subspace:
    :math:`\beta_j \le \epsilon^{3/4}\|Av_j\|`), the iteration continues from a random direction
    orthogonal to :math:`V` with :math:`\beta_j = 0`. Memory: ``num_iters`` copies of ``v0``.

    Args:
        matvec: :math:`v \mapsto Av`, pytrees like ``v0``; symmetric.
        v0: Start vector (any non-zero pytree of floating leaves).
        num_iters: :math:`m \ge 1`; at most the number of entries of ``v0``.
        key: PRNG key of the restart directions, drawn (one per step, ``fold_in(key, j)``)
            only where the Krylov space is exhausted; ``None``: ``jax.random.key(0)``, so a
            call is deterministic.

    Returns:
        :class:`LanczosResult`.

    Raises:
        ValueError: ``num_iters`` not in ``[1, size of v0]``.

    Examples:
        >>> import jax.numpy as jnp, jxent
        >>> a = jnp.diag(jnp.array([1.0, 2.0, 5.0]))
        >>> res = jxent.lanczos(lambda v: a @ v, jnp.ones(3), 3)
        >>> T = jnp.diag(res.alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
        >>> print(jnp.round(jnp.linalg.eigvalsh(T), 4))
        [1. 2. 5.]

    References:
        Lanczos 1950; Golub and Van Loan, "Matrix Computations", 10.1; Ghorbani, Krishnan and
        Xiao 2019 (Hessian spectra of neural networks).
    """
    flat0, unravel = ravel_pytree(v0)
    size = flat0.size
    if not isinstance(num_iters, int) or not 1 <= num_iters <= size:
        raise ValueError(f"num_iters must be an int in [1, {size}] (v0's size), found {num_iters}")
    dtype = flat0.dtype
    tol = jnp.finfo(dtype).eps ** 0.75
    key = jax.random.key(0) if key is None else key

    def apply(v: jax.Array) -> jax.Array:
        return ravel_pytree(matvec(unravel(v)))[0].astype(dtype)

    def orthogonalise(w: jax.Array, basis: jax.Array) -> jax.Array:
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(j: Any, state: tuple) -> tuple:
        basis, alphas, betas = state
        v = basis[j]
        w = apply(v)
        scale = jnp.linalg.norm(w)
        alpha = jnp.vdot(v, w)
        w = orthogonalise(w, basis)  # removes alpha v and beta v_prev too, and rounding
        beta = jnp.linalg.norm(w)
        fresh = jax.random.normal(jax.random.fold_in(key, j), (size,), dtype)
        fresh = orthogonalise(fresh, basis)
        exhausted = beta <= tol * jnp.maximum(scale, jnp.finfo(dtype).tiny)
        nxt = jnp.where(exhausted, fresh / jnp.linalg.norm(fresh), w / beta)
        beta = jnp.where(exhausted, 0.0, beta)
        basis = lax.dynamic_update_index_in_dim(basis, nxt, j + 1, 0)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

    # One row more than needed: the last step's next vector lands there and is dropped.
    basis = jnp.zeros((num_iters + 1, size), dtype).at[0].set(flat0 / jnp.linalg.norm(flat0))
    state = (basis, jnp.zeros((num_iters,), dtype), jnp.zeros((num_iters,), dtype))
    basis, alphas, betas = lax.fori_loop(0, num_iters, step, state)
    return LanczosResult(alphas, betas[: num_iters - 1], jax.vmap(unravel)(basis[:num_iters]))


def tridiagonal_eigh(res: LanczosResult) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal ``T``."""
    t = jnp.diag(res.alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
    return jnp.linalg.eigh(t)


def _product(
    predictor: Predictor, curvature: Curvature, params: PyTree, x: Any, labels: ArrayLike, opts
) -> Callable[[PyTree], PyTree]:
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', found {curvature!r}")
    make = hessian_vector_product if curvature == "hessian" else ggn_vector_product
    product = make(predictor, **opts)
    return lambda v: product(params, x, labels, v)


def _size(params: PyTree) -> int:
    return int(sum(jnp.size(a) for a in jax.tree.leaves(params)))


def top_eigenvalues(
    predictor: Predictor,
    params: PyTree,
    x: Any,
    labels: ArrayLike,
    *,
    k: int = 5,
    curvature: Curvature = "hessian",
    num_iters: int | None = None,
    key: jax.Array | None = None,
    **options: Any,
) -> jax.Array:
    r"""The ``k`` largest eigenvalues of the loss's Hessian (or GGN) in the parameters.

    Lanczos (:func:`lanczos`, full reorthogonalisation) on :func:`jxent.hessian_vector_product`
    (``curvature="hessian"``) or :func:`jxent.ggn_vector_product` (``"ggn"``) from a Rademacher
    start vector; the answer is the ``k`` largest Ritz values. Extreme eigenvalues converge
    first; with ``num_iters`` equal to the number of parameters the Ritz values are the
    eigenvalues. "Largest" is algebraic: a Hessian's negative eigenvalues come last.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        params: The parameters (a pytree of floating arrays).
        x: Inputs.
        labels: Labels, as for the loss.
        k: How many eigenvalues.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_iters: Lanczos steps (default ``min(P, max(4k, 50))``, ``P`` the parameter count).
        key: PRNG key of the start vector (default ``jax.random.key(0)``).
        **options: Loss options.

    Returns:
        ``[k]``, descending, in the parameters' dtype.

    Raises:
        ValueError: ``k`` not in ``[1, num_iters]``; a bad ``curvature`` or ``num_iters``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> x, y = jnp.ones((8, 4)), jnp.zeros(8, int)
        >>> jxent.top_eigenvalues(linear.apply, params, x, y, k=2).shape
        (2,)

    References:
        Ghorbani, Krishnan and Xiao 2019; Yao et al. 2020 (PyHessian); curvlinops
        (``HessianLinearOperator`` with scipy's ``eigsh``).
    """
    _options.check_option_names(options, "top_eigenvalues")
    size = _size(params)
    num_iters = min(size, max(4 * k, 50)) if num_iters is None else num_iters
    if not isinstance(k, int) or not 1 <= k <= num_iters:
        raise ValueError(f"k must be an int in [1, num_iters={num_iters}], found {k!r}")
    matvec = _product(predictor, curvature, params, x, labels, options)
    v0 = rademacher_like(jax.random.key(0) if key is None else key, params)
    evals, _ = tridiagonal_eigh(lanczos(matvec, v0, num_iters))
    return evals[::-1][:k]


def slq_nodes(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    *,
    num_iters: int,
    num_probes: int,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    r"""Stochastic Lanczos quadrature nodes and weights ``[num_probes, num_iters]`` each.

    For each Rademacher probe :math:`v`, Lanczos from :math:`v` gives :math:`T = U\Theta U^\top`;
    the nodes are :math:`\Theta` and the weights :math:`U_{0j}^2` (summing to 1), so
    :math:`\frac1P\operatorname{tr} f(A) \approx \operatorname{mean}_v \sum_j U_{0j}^2 f(\theta_j)`.
    """
    keys = jax.random.split(key, num_probes)

    def one_probe(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        theta, u = tridiagonal_eigh(lanczos(matvec, rademacher_like(k, like), num_iters))
        return theta, u[0] ** 2

    return jax.vmap(one_probe)(keys)  # the probes' products run batched


def density_on_grid(
    nodes: jax.Array, weights: jax.Array, *, grid_size: int = 1000, sigma: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Gaussian-smoothed SLQ density on a grid spanning the nodes (PyHessian's convention)."""
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    span = jnp.maximum(hi - lo, 1e-12)
    if sigma is None:
        sigma = jnp.sqrt(1e-5 * jnp.maximum(1.0, span))  # PyHessian: sigma^2 = 1e-5 max(1, span)
    grid = jnp.linspace(lo - 0.01 * span - 3 * sigma, hi + 0.01 * span + 3 * sigma, grid_size)
    kernel = jnp.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2)
    kernel = kernel / (sigma * jnp.sqrt(2 * jnp.pi))
    density = jnp.mean(jnp.sum(kernel * weights[None], axis=-1), axis=-1)
    return grid, density


def spectral_density(
    predictor: Predictor,
    params: PyTree,
    x: Any,
    labels: ArrayLike,
    *,
    curvature: Curvature = "hessian",
    num_iters: int = 30,
    num_probes: int = 4,
    key: jax.Array | None = None,
    grid_size: int = 1000,
    sigma: float | None = None,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    r"""The spectral density of the Hessian (or GGN) by stochastic Lanczos quadrature.

    .. math::

        \phi(t) = \frac1P\sum_{i=1}^P \mathcal N(t;\,\lambda_i, \sigma^2)
        \approx \operatorname{mean}_{v}\sum_j U_{0j}^2\,\mathcal N(t;\,\theta_j, \sigma^2),

    with :math:`\theta_j, U` the eigen-decomposition of the Lanczos tridiagonal from each of
    ``num_probes`` Rademacher probes :math:`v` (Ghorbani et al. 2019; PyHessian). The density
    integrates to 1 over the grid; multiply by :math:`P` for a count of eigenvalues per unit.

    Args:
        predictor: ``predictor(params, x) -> logits``.
        params: The parameters.
        x: Inputs.
        labels: Labels, as for the loss.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_iters: Lanczos steps per probe (at most ``P``).
        num_probes: Independent probes averaged.
        key: PRNG key of the probes (default ``jax.random.key(0)``).
        grid_size: Points of the returned grid.
        sigma: Gaussian width (default :math:`\sqrt{10^{-5}\max(1, \lambda_{\max} -
            \lambda_{\min})}`, PyHessian's).
        **options: Loss options.

    Returns:
        ``(grid, density)``, each ``[grid_size]``.

    Raises:
        ValueError: As :func:`lanczos`; ``num_probes < 1``.

    Examples:
        >>> import jax, jax.numpy as jnp, jxent
        >>> from jxent.predictors import linear
        >>> params = linear.init(jax.random.key(0), 4, 3)
        >>> grid, density = jxent.spectral_density(
        ...     linear.apply, params, jnp.ones((8, 4)), jnp.zeros(8, int), num_iters=10)
        >>> grid.shape, density.shape
        ((1000,), (1000,))

    References:
        Lin, Saad and Yang 2016 (density of states); Ghorbani, Krishnan and Xiao 2019; Yao et
        al. 2020 (PyHessian).
    """
    _options.check_option_names(options, "spectral_density")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, found {num_probes!r}")
    matvec = _product(predictor, curvature, params, x, labels, options)
    nodes, weights = slq_nodes(
        matvec,
        params,
        num_iters=num_iters,
        num_probes=num_probes,
        key=jax.random.key(0) if key is None else key,
    )
    return density_on_grid(nodes, weights, grid_size=grid_size, sigma=sigma)
