"""The linear head without its logits: ``softmax(x W + b)`` over a large vocabulary.

``_chunked`` is the one chunk schedule (tokens in chunks, the vocabulary in blocks), ``_tokens``
runs it on each device's own tokens, ``_linear`` is the loss and its derivative, ``_ggn`` its
Gauss-Newton product. The names below are what the rest of jxent uses of them.
"""

from jxent._head._chunked import (
    Schedule,
    accumulation_dtype,
    block_logits,
    over_blocks,
    scan_tokens,
    schedule,
)
from jxent._head._distill import (
    linear_distillation_loss,
    vocab_parallel_linear_distillation_loss,
)
from jxent._head._ggn import linear_cross_entropy_ggn_vector_product
from jxent._head._linear import (
    Head,
    check_shapes,
    linear_cross_entropy,
    prepare,
    vocab_parallel_linear_cross_entropy,
)
from jxent._head._log_probs import LogProbs, linear_log_probs, vocab_parallel_linear_log_probs
from jxent._head._tokens import over_tokens

__all__ = [
    "Head",
    "LogProbs",
    "Schedule",
    "accumulation_dtype",
    "block_logits",
    "check_shapes",
    "linear_cross_entropy",
    "linear_cross_entropy_ggn_vector_product",
    "linear_distillation_loss",
    "linear_log_probs",
    "over_blocks",
    "over_tokens",
    "prepare",
    "scan_tokens",
    "schedule",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_distillation_loss",
    "vocab_parallel_linear_log_probs",
]
