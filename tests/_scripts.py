"""Runs a script of ``tests/scripts/`` in a subprocess and returns the JSON of its last line."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_script(name, *, devices=None, timeout=900):
    """``tests/scripts/<name>`` on CPU, with ``devices`` forced host devices (None: the default
    XLA flags, not the suite's)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    script = Path(__file__).parent / "scripts" / name
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])
