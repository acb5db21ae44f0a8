"""The declared version floors are true: install exactly them and run the core tests.

Slow tier (a fresh virtual environment, ~100 MB of wheels, ~3 minutes); ``.ci/run`` runs it.
"""

import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_TESTS = ["tests/test_core.py", "tests/test_one_derivative.py", "tests/test_linear.py"]


def floors() -> list[str]:
    """``jax>=0.10.0`` -> ``jax==0.10.0`` for every run-time dependency in pyproject.toml."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep)
        assert match, f"dependency {dep!r} has no >= floor"
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def test_every_run_time_dependency_declares_a_floor():
    assert {p.split("==")[0] for p in floors()} == {"jax", "jaxlib", "optax"}


@pytest.mark.slow
def test_core_tests_pass_with_the_floor_versions(tmp_path):
    env_dir = tmp_path / "floor-venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    install = [python, "-m", "pip", "install", "-q", *floors()]
    install += ["pytest", "pytest-xdist", "hypothesis"]
    subprocess.run(install, check=True, timeout=600)
    # jxent itself without its dependencies (they are pinned above); also its `jxent` script
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True)
    versions = subprocess.run(
        [python, "-c", "import jax, optax; print(jax.__version__, optax.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert versions == [p.split("==")[1] for p in floors() if not p.startswith("jaxlib")]
    out = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=ROOT, env={"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert sys.version_info >= (3, 11)  # requires-python, which jax >= 0.8 needs
