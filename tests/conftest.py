"""Shared test configuration: strict rank promotion, seeded keys, an x64 fixture."""

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
