"""Shared test configuration: strict rank promotion, seeded keys, an x64 fixture."""

import os

# The suite compiles hundreds of small XLA programs and its time is mostly compilation, which LLVM
# at optimisation level 0 shortens (figures: docs/testing.md). Only the tests' code generation
# changes; the numbers are checked at the same tolerances.
# Set before JAX starts its backend; subprocess tests pass their own XLA_FLAGS.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Scripts that tests run in subprocesses (with their own XLA flags), not test modules.
collect_ignore = ["scripts"]


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key(request):
    """A PRNG key seeded from the test's name, so each test is reproducible on its own."""
    import zlib

    return jax.random.key(zlib.crc32(request.node.name.encode()))
