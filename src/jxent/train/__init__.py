"""Training with the hand-derived gradient: a jitted optax step, data parallel, micro-batched.

``make_step`` builds ``step(state, x, labels) -> (state, metrics)`` around
:func:`jxent.value_and_grad`; with ``mesh=`` the batch is sharded over the mesh's ``"data"``
axis and the parameters replicated; with ``microbatches=k`` one exact update comes from ``k``
micro-batches (``_microbatch``). ``fit`` is the plain loop around it.
"""

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
