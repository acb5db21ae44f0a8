"""Labels drawn from the model carry its tail: far-below-the-top classes in proportion.

A row with one class at 0 and 65,535 classes at -15 puts 1.97 % of its mass on the tail; one
with 262,143 classes at -16 (a 256k vocabulary) 2.87 %. Gumbel noise from default-resolution
float32 uniforms stops near 16 and under-draws such tails (z = -3.8 at 32,768 draws and -5 at
8,192 before the fix); the samplers now draw ``mode="high"`` noise. The float32 rows draw
that many; the bfloat16 and soft-capped variants a quarter (in proportion, with less power).
Each tail frequency must lie within 3 standard deviations of its mass (float64, from the same
scores). One subprocess at XLA's default optimisation level (``tests/scripts/sampling_tail.py``,
about 3 minutes on 2 cores): the slow tier.
"""

import numpy as np
import pytest

from _scripts import run_script

CASES = [
    f"{s}-{v}" for s in ("sample_labels", "linear") for v in ("float32", "bfloat16", "softcap")
]


@pytest.fixture(scope="module")
def measured():
    # The default optimisation level, not the suite's level 0.
    return run_script("sampling_tail.py", timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tail_is_drawn_in_proportion_to_its_mass(measured, case):
    m = measured[case]
    assert m["invalid"] == 0
    frequency, mass = m["tail"] / m["draws"], m["mass"]
    z = (frequency - mass) / np.sqrt(mass * (1 - mass) / m["draws"])
    assert abs(z) <= 3, f"{case}: tail {frequency:.4%} of {m['draws']}, mass {mass:.4%}, z={z:.1f}"
