"""linear_cross_entropy (chunked) and its vocab-parallel version against materialised references."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from _reference import reference_loss
from jxent._head import _chunked

N, D, L = 37, 5, 23  # chunk sizes below do not divide N; a vocabulary block of 5 leaves 3
IGNORE = -100


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    monkeypatch.setattr(_chunked, "_VOCAB_BLOCK", 5)
    monkeypatch.setattr(_chunked, "_ONE_PASS_ELEMENTS", 0)  # blocks, not one pass per chunk


def inputs(key, soft=False):
    k = jax.random.split(key, 5)
    x = jax.random.normal(k[0], (N, D), jnp.float64)
    w = jax.random.normal(k[1], (D, L), jnp.float64)
    b = jax.random.normal(k[2], (L,), jnp.float64)
    if soft:
        y = jax.random.dirichlet(k[3], jnp.ones(L, jnp.float64), (N,))
    else:
        y = jax.random.randint(k[3], (N,), 0, L)
    return x, w, b, y, k[4]


OPTIONS = {
    "plain": {},
    "weights": "weights",
    "where": "where",
    "ignore_index": {"ignore_index": IGNORE},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.1},
    "logit_softcap": {"logit_softcap": 2.0},
}


def materialise(opts, key, y, soft):
    if opts == "weights":
        return {"weights": jax.random.uniform(key, (L,), jnp.float64, 0.2, 2.0)}, y
    if opts == "where":
        return {"where": jax.random.bernoulli(key, 0.7, (N,))}, y
    if "ignore_index" in opts:
        return opts, y.at[jnp.array([0, 8, 9, 36])].set(IGNORE)
    return opts, y


# "sum" is "none" with a cotangent of ones; ignore_index is for integer labels only.
@pytest.mark.parametrize(
    ("reduction", "soft", "option"),
    [
        (r, soft, o)
        for r in ("mean", "none")
        for soft in (False, True)
        for o in OPTIONS
        if not (soft and o == "ignore_index")
    ],
)
def test_value_and_all_gradients_match_materialised_and_fd(
    x64, key, small_vocab_blocks, reduction, soft, option
):
    x, w, b, y, k_opt = inputs(key, soft)
    opts, y = materialise(OPTIONS[option], k_opt, y, soft)
    # A per-token cotangent for "none": gradients must be exact for any, not only ones.
    ct = jnp.linspace(0.5, 2.0, N) if reduction == "none" else 1.0

    def chunked(x, w, b):
        loss = jxent.linear_cross_entropy(
            x, w, y, bias=b, chunk_size=8, reduction=reduction, **opts
        )
        return jnp.sum(loss * ct)

    def reference(x, w, b):
        return jnp.sum(reference_loss(x @ w + b[None], y, reduction=reduction, **opts) * ct)

    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(x, w, b)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(x, w, b)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(r))))
    if reduction != "none":  # finite differences once per option, on the hardest reduction
        return
    fd = jxent.finite_difference_grad(lambda p: reference(*p), (x, w, b))
    for g, r in zip(grads, fd):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-6 * float(jnp.max(jnp.abs(r)))


@pytest.mark.parametrize("chunk", [1, 7, 8, 36, 37, 64])
def test_chunk_sizes_and_labels_at_every_chunk_boundary(x64, key, small_vocab_blocks, chunk):
    x, w, b, _, _ = inputs(key)
    # Every token's label sits on a vocabulary-block edge (0, 4, 5, 9, 10, ..., L-1).
    edges = jnp.array(sorted({0, L - 1} | {e for k in range(0, L, 5) for e in (k, k - 1)} - {-1}))
    y = edges[jnp.arange(N) % edges.size]
    loss, grads = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: jxent.linear_cross_entropy(x, w, y, bias=b, chunk_size=chunk),
            argnums=(0, 1, 2),
        )
    )(x, w, b)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda x, w, b: reference_loss(x @ w + b[None], y), argnums=(0, 1, 2)
    )(x, w, b)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)


def test_all_ignored_batch_is_zero_not_nan(x64, key):
    x, w, b, _, _ = inputs(key)
    y = jnp.full((N,), IGNORE)
    for reduction in ("mean", "sum", "none"):
        loss, grads = jax.value_and_grad(
            lambda x, w, r=reduction: jnp.sum(
                jxent.linear_cross_entropy(x, w, y, ignore_index=IGNORE, reduction=r)
            ),
            argnums=(0, 1),
        )(x, w)
        assert float(loss) == 0.0
        for g in grads:
            np.testing.assert_array_equal(g, 0.0)


def test_default_chunk_size_is_picked_from_the_shapes():
    assert _chunked.default_chunk_size(2048, 65536) == 2048
    assert _chunked.default_chunk_size(2048, 1000) == 2048
    assert _chunked.default_chunk_size(8192, 1000) == 4096
    assert _chunked.default_chunk_size(5, 1000) == 8
    assert _chunked.default_chunk_size(4096, 262144) == 4096
    assert _chunked.default_chunk_size(4096, 1000) == 4096


def test_one_pass_per_chunk_where_the_whole_vocabulary_fits_the_budget():
    one = _chunked.schedule(2048, 8192, None, None)
    assert (one.chunk, one.block) == (256, 8192)  # [256, 8192] float32 logits: 8 MiB
    assert _chunked.schedule(8192, 1000, None, None).block == 1000
    assert _chunked.schedule(37, 23, None, None).chunk == 40  # all the tokens, rounded to 8
    blocks = _chunked.schedule(2048, 65536, None, None)
    assert (blocks.chunk, blocks.block) == (2048, 1024)  # past the budget: online softmax
    assert _chunked.schedule(2048, 8192, 512, None).block == 1024  # [512, 8192] does not fit
    assert _chunked.schedule(2048, 8192, 128, None).block == 8192
    assert _chunked.schedule(2048, 8192, None, 2048).block == 2048  # as given


def test_bad_inputs_raise():
    x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
    with pytest.raises(ValueError, match="D differs"):
        jxent.linear_cross_entropy(x, jnp.ones((4, 5)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"labels\[2\] = 5, expected 0..4"):
        jxent.linear_cross_entropy(x, w, jnp.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="bias must have shape"):
        jxent.linear_cross_entropy(x, w, jnp.zeros(4, jnp.int32), bias=jnp.ones(4))
    with pytest.raises(TypeError, match="floating dtype"):
        jxent.linear_cross_entropy(x.astype(jnp.int32), w, jnp.zeros(4, jnp.int32))
    loss, g = jax.jit(
        jax.value_and_grad(lambda x: jxent.linear_cross_entropy(x, w, jnp.array([0, 1, 5, 2])))
    )(x)
    assert np.isnan(loss)
    assert np.all(np.isnan(g[2]))


def test_bf16_at_256k_classes_accumulates_in_float32():
    """bf16 inputs, L = 262144: the log-sum-exp and dW accumulate in float32.

    Compared with the same computation on the bf16-rounded inputs in float32: the loss agrees
    to 1e-5 relative (only summation order differs) and dx/dW to bf16 output rounding (2^-8).
    A bf16 log-sum-exp over 262144 terms would be off by far more: summing 262144 terms of ~1
    in bf16 stalls at 256 (the step between bf16 numbers reaches 1 beyond 2^8).
    """
    n, d, vocab = 16, 32, 262144
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (n, d)).astype(jnp.bfloat16)
    w = (0.2 * jax.random.normal(k[1], (d, vocab))).astype(jnp.bfloat16)
    y = jax.random.randint(k[2], (n,), 0, vocab)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda x, w: jxent.linear_cross_entropy(x, w, y), argnums=(0, 1))
    )
    loss16, (dx16, dw16) = grad_fn(x, w)
    loss32, (dx32, dw32) = grad_fn(x.astype(jnp.float32), w.astype(jnp.float32))
    assert loss16.dtype == jnp.float32
    assert dw16.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss16, loss32, rtol=1e-5)
    for g16, g32 in ((dx16, dx32), (dw16, dw32)):
        err = float(jnp.max(jnp.abs(g16.astype(jnp.float32) - g32)))
        assert err <= 2**-8 * float(jnp.max(jnp.abs(g32))), err


def _vocab_parallel(cases):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    script = Path(__file__).parent / "scripts" / "vocab_parallel.py"
    out = subprocess.run(
        [sys.executable, str(script), *cases],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# One subprocess with 8 host devices (~20 s of the default tier's 5 minutes): the slow tier.
@pytest.mark.slow
def test_vocab_parallel_every_reduction_and_case():
    errors = _vocab_parallel([])
    assert len(errors) == 9
    for case, err in errors.items():
        assert err <= 1e-12, (case, err)


def test_vocab_parallel_rejects_bad_mesh_arguments():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("vocab",))
    with pytest.raises(ValueError, match="axis_name='model' is not an axis of the mesh"):
        jxent.vocab_parallel_linear_cross_entropy(
            jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.array([0, 1]), mesh=mesh, axis_name="model"
        )


@pytest.mark.parametrize("block", [1, 7, 23, 100])
def test_vocab_block_sizes_including_ragged_and_larger_than_l(x64, key, block):
    x, w, b, y, _ = inputs(key)
    f = lambda x, w, b: jxent.linear_cross_entropy(
        x, w, y, bias=b, chunk_size=16, vocab_block_size=block, label_smoothing=0.1
    )
    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda x, w, b: reference_loss(x @ w + b[None], y, label_smoothing=0.1), argnums=(0, 1, 2)
    )(x, w, b)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)
