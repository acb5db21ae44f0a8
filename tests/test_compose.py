"""jxent inside programs it did not write: export and serialization, checks without effects,
float16 inputs to the fused head, and (8-device subprocess, ``tests/scripts/compose.py``) the
user's own ``shard_map``, ``vmap`` over a sharded axis, sharded class weights, export and second
derivatives with tokens sharded on an Auto mesh; and the persistent compilation cache across two
processes (``tests/scripts/compose_cache.py``). Compared with the plain loss in float64 (float32
on 8 devices), with the same function called directly, or with the compiled program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import jxent
from _reference import reference_loss
from _scripts import run_script
from jxent.predictors import linear


def _round_trip(fn, *args):
    """``fn`` exported, serialized, deserialized and called: what serving and checkpoints do."""
    exported = export.deserialize(export.export(jax.jit(fn))(*args).serialize())
    return exported.call(*args)


def _head(key, n=40, d=8, num_classes=30, dtype=jnp.float64):
    k = jax.random.split(key, 3)
    x = jax.random.normal(k[0], (n, d), dtype)
    w = jax.random.normal(k[1], (d, num_classes), dtype)
    return x, w, jax.random.randint(k[2], (n,), 0, num_classes)


def _plain_head_loss(x, w, y, **options):
    return reference_loss(x @ w, y, **options)


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}, {"ignore_index": 3}]
)
def test_the_materialised_loss_exports_serializes_and_runs(x64, key, options):
    x, w, y = _head(key)
    logits = x @ w
    fn = jax.value_and_grad(lambda z, y: jxent.softmax_cross_entropy(z, y, **options))
    loss, grad = _round_trip(fn, logits, y)
    want_loss, want_grad = jax.value_and_grad(reference_loss)(logits, y, **options)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_the_fused_head_value_and_grad_exports_serializes_and_runs(x64, key):
    x, w, y = _head(key)
    fn = jax.value_and_grad(
        lambda x, w, y: jxent.linear_cross_entropy(x, w, y, chunk_size=16, vocab_block_size=8),
        argnums=(0, 1),
    )
    loss, grads = _round_trip(fn, x, w, y)
    want_loss, want_grads = jax.value_and_grad(_plain_head_loss, argnums=(0, 1))(x, w, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    for g, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-14)


def test_the_training_step_exports_serializes_and_runs(x64, key):
    x, _, y = _head(key)
    opt = optax.sgd(0.1)
    state = jxent.train.init_state(linear.init(key, x.shape[1], 30), opt)
    step = jxent.train.make_step(linear.apply, opt)
    leaves, tree = jax.tree.flatten(state)  # optax's state types are the user's to register

    def flat_step(leaves, x, y):
        new, metrics = step(jax.tree.unflatten(tree, leaves), x, y)
        return jax.tree.leaves(new), metrics

    plain = reference_loss(linear.apply(state.params, x), y)
    got_leaves, got_metrics = _round_trip(flat_step, leaves, x, y)
    want_state, want_metrics = step(jax.tree.map(jnp.copy, state), x, y)  # the step donates
    for a, b in zip(got_leaves, jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-12)
    np.testing.assert_allclose(got_metrics["loss"], plain, rtol=1e-6)  # float32 parameters


def test_no_jxent_program_carries_an_effect(key):
    x, w, y = _head(key, dtype=jnp.float32)
    programs = [
        lambda: jax.make_jaxpr(jax.grad(jxent.softmax_cross_entropy))(x @ w, y),
        lambda: jax.make_jaxpr(jax.grad(jxent.linear_cross_entropy))(x, w, y),
        lambda: jax.make_jaxpr(jxent.value_and_grad(linear.apply))({"w": w, "b": w[0]}, x, y),
    ]
    for make in programs:
        assert make().effects == set()


def test_checked_still_raises_on_the_same_function_exported_without_a_check(key):
    x, w, y = _head(key, dtype=jnp.float32)
    bad = y.at[2].set(30)
    fn = jax.jit(lambda z, y: jxent.softmax_cross_entropy(z, y, reduction="none"))
    assert np.isnan(_round_trip(fn, x @ w, bad)[2])  # the NaN contract: that row only
    with pytest.raises(ValueError, match="flat position 2 has label 30"):
        jxent.checked(fn)(x @ w, bad)


def test_the_vocab_parallel_loss_inside_a_shard_map_not_over_its_axis_is_refused(key):
    x, w, y = _head(key, dtype=jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "vocab"))
    spec = jax.sharding.PartitionSpec

    def local(x, y):
        return jxent.vocab_parallel_linear_cross_entropy(x, w, y, mesh=mesh)

    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(spec("data"), spec("data")), out_specs=spec(),
        axis_names={"data"},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"needs the vocabulary axis 'vocab' among its manual"):
        jax.jit(mapped)(x, y)


def test_float16_inputs_get_a_float32_gradient_of_the_logits(x64, key):
    """dW of the mean over N = 16384 tokens: G / N is about 1e-6, below float16's normal range.

    Rounded to float16 before ``x^T G`` it lost 3.7 % of dW; kept in float32 dW is within
    float16's own rounding of its result (eps / 2 = 4.9e-4), here bounded by 3x that.
    """
    n, d, num_classes = 16384, 16, 64
    k = jax.random.split(key, 3)
    x = jax.random.normal(k[0], (n, d)).astype(jnp.float16)
    w = (0.3 * jax.random.normal(k[1], (d, num_classes))).astype(jnp.float16)
    y = jax.random.randint(k[2], (n,), 0, num_classes)
    dx, dw = jax.grad(jxent.linear_cross_entropy, argnums=(0, 1))(x, w, y)
    assert dx.dtype == dw.dtype == jnp.float16
    want = jax.grad(_plain_head_loss, argnums=(0, 1))(
        x.astype(jnp.float64), w.astype(jnp.float64), y
    )
    rounding = float(jnp.finfo(jnp.float16).eps) / 2
    for got, ref in zip((dx, dw), want, strict=True):
        error = jnp.linalg.norm(got.astype(jnp.float64) - ref) / jnp.linalg.norm(ref)
        assert float(error) <= 3 * rounding


FLOAT32_RTOL = 1e-5  # float32 sums taken in another order (relative to the largest entry)


@pytest.fixture(scope="module")
def on_8_devices():
    return run_script("compose.py", devices=8)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "shard_map_auto",  # jax.grad inside the user's shard_map, check_vma on
        "shard_map_explicit",
        "shard_map_partial_2d",  # manual over "data" of a 2-D Auto mesh
        "vocab_parallel_shard_map_auto",  # the user's shard_map over "vocab", check_vma on
        "vocab_parallel_shard_map_explicit",
        "vocab_parallel_shard_map_2d",  # over "data" and "vocab"
        "vocab_weights_jit",  # class weights P("vocab"), labels replicated
        "vocab_weights_eager",
        "vmap_sharded_explicit",  # vmap over an axis sharded on an Explicit mesh
        "export_explicit",  # the fused head exported with its tokens sharded
        "export_auto",  # the same on an Auto mesh: the plain scan, XLA's own partitioning
        "mean_denominators_sharded_weights",
    ],
)
def test_inside_the_users_sharded_programs_equals_the_plain_loss(on_8_devices, case):
    result = on_8_devices[case]
    assert not isinstance(result, str), result  # a message: it raised
    assert result <= FLOAT32_RTOL


@pytest.mark.slow
def test_vmap_of_the_fused_head_on_an_auto_mesh_keeps_each_devices_tokens(on_8_devices):
    result = on_8_devices["vmap_auto"]
    assert not isinstance(result, str), result
    assert result["error"] <= FLOAT32_RTOL
    share = 64 // 8 * 8  # one device's share of x [64, 8], in elements
    assert not [g for g in result["gathers"] if g >= share], result["gathers"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "hvp",
        "grad_of_grad",
        "hessian",
        "none_grad",
        "none_jvp",
        "log_probs_grad",
        "distillation_grad",
    ],
)
def test_derivatives_on_an_auto_mesh_keep_each_devices_tokens(on_8_devices, case):
    """jvp(grad) (the HVP), grad(grad), jax.hessian, reduction="none" in both modes, and the
    gradients of the per-token log-probabilities and distillation loss (the same tangent map).

    Before, the rule's tangent ran unpartitioned and XLA gathered all of x (512 elements).
    """
    result = on_8_devices[f"auto_{case}"]
    assert not isinstance(result, str), result
    assert result["error"] <= FLOAT32_RTOL
    share = 64 // 8 * 8  # one device's share of x [64, 8], in elements
    assert not [g for g in result["gathers"] if g >= share], result["gathers"]


@pytest.mark.slow
def test_a_second_process_hits_the_persistent_compilation_cache(tmp_path, monkeypatch):
    """Auto (the partitioning rule, its tangent map) and Explicit meshes: no new entry.

    Before, the rule's key in the program was the id() of a Python object (9 -> 10 entries).
    """
    monkeypatch.setenv("JXENT_CACHE_DIR", str(tmp_path))
    first = run_script("compose_cache.py", devices=8)
    second = run_script("compose_cache.py", devices=8)
    assert first["entries"]
    assert second["entries"] == first["entries"]
    for run in (first, second):  # the second from the cache: still the plain loss's values
        for case, err in run["errors"].items():
            assert err <= FLOAT32_RTOL, (case, err)
