"""Tail frequencies of both samplers, measured at XLA's default optimisation level.

    python sampling_tail.py

The test suite compiles at backend optimisation level 0 (``tests/conftest.py``), which makes
billions of Gumbel draws several times slower; this script runs in its own process with the
default level. Prints one JSON line: for each case, the draws, how many fell in the tail, and
the tail's mass computed in float64 from the same scores.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

import jxent

VARIANTS = {
    "float32": (jnp.float32, None, 1),
    "bfloat16": (jnp.bfloat16, None, 4),
    "softcap": (jnp.float32, 30.0, 4),
}


def tail_mass(top, tail, count, cap=None):
    if cap is not None:
        top, tail = cap * np.tanh(top / cap), cap * np.tanh(tail / cap)
    weight = count * np.exp(np.float64(tail) - top)
    return float(weight / (1.0 + weight))


def sample_labels_case(dtype, cap, fraction):
    """One class at 0 and 65,535 at -15: 32,768 draws (in batches of 512 rows)."""
    row = jnp.full((65536,), -15.0, dtype).at[0].set(0.0)

    @jax.jit
    def draw(key):
        return jxent.sample_labels(key, jnp.broadcast_to(row, (512, 65536)), logit_softcap=cap)

    keys = jax.random.split(jax.random.key(0), 32768 // fraction // 512)
    labels = np.concatenate([np.asarray(draw(k)) for k in keys])
    return labels, tail_mass(0.0, -15.0, 65535, cap)


def linear_case(dtype, cap, fraction):
    """One class at 0 and 262,143 at -16, through x W: 8,192 tokens."""
    vocab, tokens = 262144, 8192 // fraction
    w = jnp.zeros((2, vocab), dtype).at[0, 1:].set(-16.0)  # x = (1, 0): logits = w[0]
    x = jnp.zeros((tokens, 2), dtype).at[:, 0].set(1.0)
    labels = jxent.linear_sample_labels(jax.random.key(1), x, w, logit_softcap=cap)
    return np.asarray(labels), tail_mass(0.0, -16.0, vocab - 1, cap)


out = {}
for sampler, case in (("sample_labels", sample_labels_case), ("linear", linear_case)):
    for name, variant in VARIANTS.items():
        labels, mass = case(*variant)
        out[f"{sampler}-{name}"] = {
            "draws": int(labels.size),
            "tail": int(np.sum(labels != 0)),
            "invalid": int(np.sum(labels < 0)),
            "mass": mass,
        }
print(json.dumps(out))
