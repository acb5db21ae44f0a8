"""Training with the hand-derived gradient: a jitted optax step, data parallel, micro-batched.

``make_step`` builds ``step(state, x, labels) -> (state, metrics)`` around
:func:`jxent.value_and_grad`, or with ``head=LinearHead(...)`` around the fused
:func:`jxent.linear_cross_entropy` on the predictor's hidden states (``_linear_head``); with
``mesh=`` the batch is sharded over the mesh's ``"data"`` axis and the parameters replicated;
with ``microbatches=k`` one exact update comes from ``k`` micro-batches (``_microbatch``).
``fit`` is the plain loop around it.
"""

from jxent.train._linear_head import LinearHead
from jxent.train._microbatch import mean_denominators
from jxent.train._training import (
    DATA_AXIS,
    GNBState,
    TrainState,
    accuracy,
    data_mesh,
    evaluate,
    fit,
    gnb_estimator,
    init_state,
    make_step,
    mixed_precision,
)

__all__ = [
    "DATA_AXIS",
    "GNBState",
    "LinearHead",
    "TrainState",
    "accuracy",
    "data_mesh",
    "evaluate",
    "fit",
    "gnb_estimator",
    "init_state",
    "make_step",
    "mean_denominators",
    "mixed_precision",
]
