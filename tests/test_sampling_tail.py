"""Labels drawn from the model carry its tail: far-below-the-top classes in proportion.

A row with one class at 0 and 65,535 classes at -15 puts 1.97 % of its mass on the tail; one
with 262,143 classes at -16 (a 256k vocabulary) 2.87 %. Gumbel noise from default-resolution
float32 uniforms stops near 16 and under-draws such tails (z = -3.8 and -10 at these sample
sizes before the fix); the samplers now draw ``mode="high"`` noise. Each test draws enough to
see that bias and asserts the tail's frequency within 3 standard deviations of its mass
(computed in float64 from the same scores). Slow tier: about 4e9 Gumbel draws in all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

DRAWS = 32768


def _tail_mass(top: float, tail: float, count: int, cap: float | None = None) -> float:
    if cap is not None:
        top, tail = cap * np.tanh(top / cap), cap * np.tanh(tail / cap)
    tail_weight = count * np.exp(np.float64(tail) - top)
    return float(tail_weight / (1.0 + tail_weight))


def _assert_in_proportion(labels: jax.Array, mass: float) -> None:
    labels = np.asarray(labels)
    assert labels.min() >= 0
    n = labels.size
    frequency = float(np.mean(labels != 0))
    sigma = np.sqrt(mass * (1 - mass) / n)
    z = (frequency - mass) / sigma
    assert abs(z) <= 3, f"tail drawn {frequency:.4%} of {n}, its mass is {mass:.4%} (z = {z:.1f})"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "cap"),
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, 30.0)],
    ids=["float32", "bfloat16", "softcap"],
)
def test_sample_labels_draws_a_65k_tail_at_minus_15_in_proportion(dtype, cap):
    row = jnp.full((65536,), -15.0, dtype).at[0].set(0.0)
    rows = 512  # 32,768 draws in 64 batches of 512 rows (128 MiB of scores each)
    draw = jax.jit(
        lambda k: jxent.sample_labels(k, jnp.broadcast_to(row, (rows, 65536)), logit_softcap=cap)
    )
    keys = jax.random.split(jax.random.key(0), DRAWS // rows)
    labels = jnp.concatenate([draw(k) for k in keys])
    _assert_in_proportion(labels, _tail_mass(0.0, -15.0, 65535, cap))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "cap"),
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, 30.0)],
    ids=["float32", "bfloat16", "softcap"],
)
def test_linear_sample_labels_draws_a_256k_tail_at_minus_16_in_proportion(dtype, cap):
    vocab, tokens = 262144, 8192  # z = -5 for the old noise at this count; 2e9 scores
    w = jnp.zeros((2, vocab), dtype).at[0, 1:].set(-16.0)  # x = (1, 0): logits = w[0]
    x = jnp.zeros((tokens, 2), dtype).at[:, 0].set(1.0)
    labels = jxent.linear_sample_labels(jax.random.key(1), x, w, logit_softcap=cap)
    _assert_in_proportion(labels, _tail_mass(0.0, -16.0, vocab - 1, cap))
