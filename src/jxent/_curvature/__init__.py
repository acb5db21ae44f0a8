"""Second order and the tools on it: curvature-vector products, diagonals, spectra, sampling.

``_products`` holds the GGN and Hessian products of any predictor, ``_diagonals`` the GNB,
Hutchinson and exact GGN diagonals, ``_spectrum`` Lanczos and spectral densities, ``_sampling``
labels drawn from the model (with and without the logits).
"""

from jxent._curvature._diagonals import (
    ggn_diagonal,
    gnb_diagonal,
    hutchinson_diagonal,
    rademacher_like,
)
from jxent._curvature._products import ggn_vector_product, hessian_vector_product
from jxent._curvature._sampling import linear_sample_labels, sample_labels
from jxent._curvature._spectrum import (
    LanczosResult,
    density_on_grid,
    lanczos,
    slq_nodes,
    spectral_density,
    top_eigenvalues,
    tridiagonal_eigh,
)

__all__ = [
    "LanczosResult",
    "density_on_grid",
    "ggn_diagonal",
    "ggn_vector_product",
    "gnb_diagonal",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "lanczos",
    "linear_sample_labels",
    "rademacher_like",
    "sample_labels",
    "slq_nodes",
    "spectral_density",
    "top_eigenvalues",
    "tridiagonal_eigh",
]
