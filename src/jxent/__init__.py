"""jxent: softmax cross-entropy for any JAX predictor, with a hand-derived, proven gradient."""

from jxent import predictors, train
from jxent._check import (
    Diagnosis,
    GradCheckReport,
    GradientCheckError,
    Kind,
    LeafReport,
    check_grads,
)
from jxent._checked import checked
from jxent._curvature import ggn_vector_product, hessian_vector_product
from jxent._fd import finite_difference_entries, finite_difference_grad
from jxent._linear import linear_cross_entropy, vocab_parallel_linear_cross_entropy
from jxent._linear_ggn import linear_cross_entropy_ggn_vector_product
from jxent._loss import logits_grad, logits_hvp, loss_and_logits_grad, softmax_cross_entropy
from jxent._vjp import batched, grad, value_and_grad

__version__ = "0.1.0"

__all__ = [
    "Diagnosis",
    "GradCheckReport",
    "GradientCheckError",
    "Kind",
    "LeafReport",
    "batched",
    "check_grads",
    "checked",
    "finite_difference_entries",
    "finite_difference_grad",
    "ggn_vector_product",
    "grad",
    "hessian_vector_product",
    "linear_cross_entropy",
    "linear_cross_entropy_ggn_vector_product",
    "logits_grad",
    "logits_hvp",
    "loss_and_logits_grad",
    "predictors",
    "softmax_cross_entropy",
    "train",
    "value_and_grad",
    "vocab_parallel_linear_cross_entropy",
]
