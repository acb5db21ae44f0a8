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
from jxent._curvature import (
    LanczosResult,
    ggn_diagonal,
    ggn_vector_product,
    gnb_diagonal,
    hessian_vector_product,
    hutchinson_diagonal,
    lanczos,
    linear_sample_labels,
    sample_labels,
    spectral_density,
    top_eigenvalues,
)
from jxent._fd import finite_difference_entries, finite_difference_grad
from jxent._head import (
    linear_cross_entropy,
    linear_cross_entropy_ggn_vector_product,
    linear_distillation_loss,
    linear_log_probs,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_distillation_loss,
    vocab_parallel_linear_log_probs,
)
from jxent._kernel import CrossEntropyStats
from jxent._log_probs import LogProbs, log_probs
from jxent._loss import logits_grad, logits_hvp, loss_and_logits_grad, softmax_cross_entropy
from jxent._policy import PolicyMetrics, policy_denominator, policy_loss
from jxent._vjp import batched, grad, value_and_grad

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyStats",
    "Diagnosis",
    "GradCheckReport",
    "GradientCheckError",
    "Kind",
    "LanczosResult",
    "LeafReport",
    "LogProbs",
    "PolicyMetrics",
    "batched",
    "check_grads",
    "checked",
    "finite_difference_entries",
    "finite_difference_grad",
    "ggn_diagonal",
    "ggn_vector_product",
    "gnb_diagonal",
    "grad",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "lanczos",
    "linear_cross_entropy",
    "linear_cross_entropy_ggn_vector_product",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_sample_labels",
    "log_probs",
    "logits_grad",
    "logits_hvp",
    "loss_and_logits_grad",
    "policy_denominator",
    "policy_loss",
    "predictors",
    "sample_labels",
    "softmax_cross_entropy",
    "spectral_density",
    "top_eigenvalues",
    "train",
    "value_and_grad",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_distillation_loss",
    "vocab_parallel_linear_log_probs",
]
