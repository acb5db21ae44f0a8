"""The gradient checker: a candidate against the plain loss's autodiff and finite differences.

``_checker`` compares and diagnoses, ``_programs`` compiles the references (``jax.grad`` of
``jxent._plain.plain_loss`` and its finite differences), ``_mistakes`` holds the classic wrong
gradients the checker is shown catching.
"""

from jxent._check._checker import (
    DEFAULT_RTOL,
    Diagnosis,
    GradCheckReport,
    GradientCheckError,
    Kind,
    LeafReport,
    check_grads,
)
from jxent._check._mistakes import MISTAKES

__all__ = [
    "DEFAULT_RTOL",
    "MISTAKES",
    "Diagnosis",
    "GradCheckReport",
    "GradientCheckError",
    "Kind",
    "LeafReport",
    "check_grads",
]
