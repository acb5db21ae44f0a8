"""Training: the hand gradient is a drop-in for autodiff, sharded == single device, the demo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from _reference import max_rel_error, reference_loss
from jxent.predictors import mlp

HERE = Path(__file__).parent


def problem(seed=0, batch=16, steps=20):
    params = mlp.init(jax.random.key(seed), [6, 12, 4])
    x = jax.random.normal(jax.random.key(seed + 1), (steps, batch, 6))
    y = jax.random.randint(jax.random.key(seed + 2), (steps, batch), 0, 4)
    return params, x, y


def test_hand_gradient_training_equals_autodiff_training():
    params, x, y = problem()
    opt = optax.adam(1e-2)
    step = jxent.train.make_step(mlp.apply, opt)
    state = jxent.train.init_state(params, opt)

    @jax.jit
    def autodiff_step(p, opt_state, xb, yb):
        loss, g = jax.value_and_grad(lambda q: reference_loss(mlp.apply(q, xb), yb))(p)
        updates, opt_state = opt.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    p_ref, s_ref = params, opt.init(params)
    for i in range(20):
        state, metrics = step(state, x[i], y[i])
        p_ref, s_ref, loss_ref = autodiff_step(p_ref, s_ref, x[i], y[i])
        # float32: the two losses differ by a few ulps of an O(1) value.
        np.testing.assert_allclose(metrics["loss"], loss_ref, rtol=1e-5)
    assert int(state.step) == 20
    # 20 Adam steps of size ~1e-2 from the same start; per-step float32 rounding differences
    # (~1e-7 relative in the gradient) are amplified by Adam's normalisation at most ~1e-5.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_metrics_are_loss_accuracy_and_grad_norm():
    params, x, y = problem()
    opt = optax.sgd(0.1)
    state, metrics = jxent.train.make_step(mlp.apply, opt)(
        jxent.train.init_state(params, opt), x[0], y[0]
    )
    grads = jxent.grad(mlp.apply)(params, x[0], y[0])
    norm = np.sqrt(
        sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads))
    )
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-6)
    expected_acc = jnp.mean(jnp.argmax(mlp.apply(params, x[0]), -1) == y[0])
    np.testing.assert_allclose(metrics["accuracy"], expected_acc)
    np.testing.assert_allclose(
        metrics["loss"], reference_loss(mlp.apply(params, x[0]), y[0]), rtol=1e-6
    )


def test_make_step_needs_a_scalar_loss():
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        jxent.train.make_step(mlp.apply, optax.sgd(0.1), reduction="none")


def test_bfloat16_compute_with_float32_master_params():
    params, x, y = problem()
    opt = optax.adam(1e-2)
    step16 = jxent.train.make_step(mlp.apply, opt, compute_dtype=jnp.bfloat16)
    step32 = jxent.train.make_step(mlp.apply, opt)
    s16 = jxent.train.init_state(params, opt)
    s32 = jxent.train.init_state(params, opt)
    for i in range(10):
        s16, m16 = step16(s16, x[i], y[i])
        s32, m32 = step32(s32, x[i], y[i])
        assert np.isfinite(m16["loss"])
        assert m16["loss"].dtype == jnp.float32
        # bf16 has 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through two
        # layers and ten steps the loss stays within a few percent of float32 training.
        np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16.params))


def test_fit_is_deterministic_and_reports_history():
    params, x, y = problem(steps=1, batch=96)
    data = (x[0], y[0])
    seen = []
    kwargs = dict(epochs=3, batch_size=32, key=jax.random.key(5), eval_data=data, progress=False)
    p1, h1 = jxent.train.fit(
        mlp.apply, params, optax.adam(1e-2), data, callbacks=[seen.append], **kwargs
    )
    p2, h2 = jxent.train.fit(mlp.apply, params, optax.adam(1e-2), data, **kwargs)
    assert [r["epoch"] for r in h1] == [1, 2, 3]
    assert seen == h1
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]
    assert strip(h1) == strip(h2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    assert set(h1[0]) >= {"train_loss", "train_accuracy", "eval_loss", "eval_accuracy"}


def _launch(devices: int, *args: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, str(HERE / "scripts" / "sharded_train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Three processes (~15 s): the slow tier, beside the other 8-device tests (tests/test_sharded.py).
@pytest.mark.slow
def test_data_parallel_steps_on_8_devices_and_on_2_processes_equal_one_device():
    """1 process x 8 devices, and 2 processes x 4 devices (jax.distributed on localhost, each
    with its half of the batch), give the 5 steps of one device: one test, three processes."""
    port = str(_free_port())
    procs = [_launch(8), _launch(4, "0", "2", port), _launch(4, "1", "2", port)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = json.loads(outs[0][0].splitlines()[-1]) | json.loads(outs[1][0].splitlines()[-1])
    # Same math, different reduction order across shards: float32 tolerance.
    for run in ("sharded", "multiprocess"):
        np.testing.assert_allclose(res[run]["losses"], res["single"]["losses"], rtol=1e-5)
        for a, b in zip(res[run]["params"], res["single"]["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Curvature products with the batch sharded over the mesh equal those on one device.
    for name in ("ggn_vector_product", "hessian_vector_product"):
        one, sharded = res[name]
        # float32, summed in another order: relative to the largest entry (FLOAT32_RTOL's note)
        assert max_rel_error([np.asarray(a) for a in sharded], [np.asarray(a) for a in one]) < 1e-5
    # and the masked loss is what the plain loss gives on the first batch
    x = jax.random.normal(jax.random.key(1), (5, 32, 12))[0]
    y = jax.random.randint(jax.random.key(2), (5, 32), 0, 5)[0]
    params = mlp.init(jax.random.key(0), [12, 16, 5])
    want = reference_loss(
        mlp.apply(params, x), y, where=jnp.arange(32) % 8 != 3, label_smoothing=0.1
    )
    np.testing.assert_allclose(res["single"]["losses"][0], want, rtol=1e-5)


def test_demo_runs_end_to_end(tmp_path, capsys):
    from jxent._cli import main  # in-process: a subprocess would only add JAX's start-up

    # One demo run (its gradient check dominates the time) covers both plot paths: --no-plot
    # writes no PNG, then the demo's own plot function draws the history the run wrote.
    out_dir = tmp_path / "demo"
    assert main(["demo", "--epochs", "3", "--out", str(out_dir), "--no-plot"]) == 0
    assert not (out_dir / "training.png").exists()
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("test accuracy: ")
    assert lines[-1].endswith("%")
    assert "PASS" in stdout
    assert "first step" in stdout
    assert "ms per step" in stdout
    record = json.loads((out_dir / "history.json").read_text())
    assert len(record["history"]) == 3
    assert record["config"]["epochs"] == 3
    # compilation (in the first step) is reported apart from the steady-state step time; no
    # assertion on how the measured times compare (a loaded machine may reorder them)
    assert record["steady_step_seconds"] > 0
    assert record["first_step_seconds"] > 0
    from jxent._cli._demo import _plot

    _plot(record["history"], out_dir / "training.png")
    png = (out_dir / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out_dir / "training.png").shape[2] in (3, 4)


def test_step_times_separate_the_first_step_from_the_steady_state():
    from jxent._cli._demo import step_times

    history = [
        {"train_seconds": 3.0, "first_step_seconds": 2.0},  # 10 steps: 1 s for the other 9
        {"train_seconds": 0.5},
        {"train_seconds": 0.3},
    ]
    first, per_step = step_times(history, 10)
    assert first == 2.0
    assert per_step == pytest.approx(0.05)  # median of 1/9, 0.05 and 0.03 s per step
