"""``make_step(..., head=LinearHead(...))``: the fused head in the training step.

The reference is a training step written by hand: the logits formed (``hidden @ w + b``), the
loss written plainly with ``jax.nn.log_softmax`` and a gather, ``jax.value_and_grad`` and the
same optax update. jxent's step never forms the logits (``jxent.linear_cross_entropy`` on the
hidden states, its own derivative rule), micro-batches sum ``"sum"`` losses over the whole
batch's denominators, and its metrics come from the fused pass's statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from _reference import FLOAT64_RTOL, assert_tree_close, reference_loss

B, T, D, L = 8, 5, 6, 13  # sequences, tokens per sequence, width, vocabulary


def init(key, dtype=jnp.float64):
    """A tiny tied-embedding LM: embedding [L, D] (also the head), positions, a mixing layer."""
    k = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k[0], (L, D), dtype),
        "pos": 0.5 * jax.random.normal(k[1], (T, D), dtype),
        "mix": jax.random.normal(k[2], (D, D), dtype) / np.sqrt(D),
        "bias": 0.3 * jax.random.normal(k[3], (L,), dtype),
    }


def hidden(params, tokens):
    """Tokens ``[B, T]`` -> hidden states ``[B, T, D]`` (a causal running mean, then a layer)."""
    h = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    steps = jnp.arange(1, tokens.shape[1] + 1, dtype=h.dtype)[None, :, None]
    h = jnp.cumsum(h, axis=1) / steps
    return jnp.tanh(h @ params["mix"])


TIED = jxent.train.LinearHead(w=lambda p: p["embed"].T, bias=lambda p: p["bias"])


plain_loss = reference_loss  # log_softmax, an explicit target, PyTorch's means


def plain_metrics(logits, labels, counted, logit_softcap=None):
    """Accuracy, count, mean entropy and mean log-sum-exp over the counted tokens."""
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    count = jnp.sum(counted)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)

    def mean(v):
        return jnp.sum(jnp.where(counted, v, 0)) / count

    right = counted & (jnp.argmax(logits, axis=-1) == labels)
    return {"accuracy": mean(right), "count": count, "entropy": mean(entropy), "lse": mean(lse)}


def reference_step(opt, options):
    """One hand-written materialised step: logits, the plain loss, jax.value_and_grad, optax."""

    @jax.jit
    def step(params, opt_state, tokens, labels, where):
        labels = labels.reshape(-1)
        where = where.reshape(-1)

        def logits_of(p):
            return hidden(p, tokens).reshape(-1, D) @ p["embed"].T + p["bias"][None, :]

        loss, grads = jax.value_and_grad(
            lambda p: plain_loss(logits_of(p), labels, where=where, **options)
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        counted = where if "ignore_index" not in options else where & (labels != 0)
        metrics = plain_metrics(logits_of(params), labels, counted, options.get("logit_softcap"))
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        metrics |= {"loss": loss, "grad_norm": norm}
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


OPTIONS = {
    "plain": {},
    "ignore_smoothing_z": {"ignore_index": 0, "label_smoothing": 0.1, "z_loss": 1e-2},
    "weights_softcap_sum": {
        "weights": np.linspace(0.5, 2.0, L),
        "logit_softcap": 3.0,
        "reduction": "sum",
        "z_loss": 1e-2,
    },
}
# The fused head's own schedule: ragged chunks of tokens and blocks of the vocabulary.
SCHEDULE = {"plain": {}, "ignore_smoothing_z": {"chunk_size": 8, "vocab_block_size": 5}}


def _batch(key):
    tokens = jax.random.randint(key, (B, T), 0, L)
    labels = jnp.roll(tokens, -1, axis=1).at[:, -1].set(0)
    labels = labels.at[0, :3].set(0).at[4, 1].set(0)  # micro-batches count different tokens
    # With k = 2 micro-batch 0 holds sequences 0, 2, 4, 6; k = 4: 0 and 4.
    where = jnp.ones((B, T), bool).at[2, :4].set(False).at[6].set(False)
    return tokens, labels, where


# time budget: k = 4 of the options with a schedule of many chunks and blocks in the slow tier
CASES = [
    pytest.param(name, k, marks=[pytest.mark.slow] if k == 4 and name != "plain" else [])
    for name in sorted(OPTIONS)
    for k in (1, 2, 4)
]


@pytest.mark.parametrize(("name", "microbatches"), CASES)
def test_fused_head_step_equals_a_materialised_step(x64, key, name, microbatches):
    options = OPTIONS[name]
    params = init(key)
    tokens, labels, where = _batch(jax.random.fold_in(key, 1))
    opt = optax.sgd(0.1, momentum=0.9)
    step = jxent.train.make_step(
        hidden, opt, head=TIED, microbatches=microbatches, **options, **SCHEDULE.get(name, {})
    )
    state = jxent.train.init_state(params, opt)
    reference = reference_step(opt, options)
    ref_params, ref_opt = params, opt.init(params)
    for _ in range(2):
        state, metrics = step(state, tokens, labels, where=where)
        ref_params, ref_opt, expected = reference(ref_params, ref_opt, tokens, labels, where)
        assert sorted(metrics) == sorted(expected)
        for metric, value in expected.items():
            # accuracy and count are float32, as the logits path's (counts)
            rtol = 1e-7 if metric in ("accuracy", "count") else FLOAT64_RTOL
            np.testing.assert_allclose(metrics[metric], value, rtol=rtol, err_msg=metric)
    assert_tree_close(state.params, ref_params, FLOAT64_RTOL)


def test_evaluate_with_a_head_equals_the_plain_loss_and_metrics(x64, key):
    params = init(key)
    tokens, labels, where = _batch(jax.random.fold_in(key, 1))
    options = {"ignore_index": 0, "z_loss": 1e-2, "label_smoothing": 0.1}
    got = jxent.train.evaluate(hidden, params, tokens, labels, head=TIED, where=where, **options)
    logits = hidden(params, tokens).reshape(-1, D) @ params["embed"].T + params["bias"][None, :]
    flat, mask = labels.reshape(-1), where.reshape(-1)
    expected = plain_metrics(logits, flat, mask & (flat != 0))
    expected["loss"] = plain_loss(logits, flat, where=mask, **options)
    assert sorted(got) == sorted(expected)
    for metric, value in expected.items():
        np.testing.assert_allclose(got[metric], value, rtol=1e-7, err_msg=metric)


def test_fit_with_a_head_trains_micro_batched_and_evaluates(key):
    params = init(key, jnp.float32)
    tokens = jax.random.randint(jax.random.fold_in(key, 1), (32, T), 1, L)
    labels = jnp.roll(tokens, -1, axis=1).at[:, -1].set(0)
    where = jnp.arange(32)[:, None] % 5 != 0
    where = jnp.broadcast_to(where, (32, T))
    trained, history = jxent.train.fit(
        hidden,
        params,
        optax.adam(3e-2),
        (tokens, labels, where),
        epochs=4,
        batch_size=8,
        key=jax.random.key(3),
        eval_data=(tokens, labels),
        progress=False,
        head=TIED,
        microbatches=2,
        ignore_index=0,
    )
    assert jax.tree.structure(trained) == jax.tree.structure(params)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0.0 <= h["eval_accuracy"] <= 1.0 for h in history)


def test_stateful_predictor_with_a_head_threads_its_state(x64, key):
    """``has_aux``: the model state passes through the micro-batches; the gradient is the same."""
    params = init(key)
    tokens, labels, where = _batch(jax.random.fold_in(key, 1))

    def stateful(params, tokens, calls, step_key):
        assert step_key is not None
        return hidden(params, tokens), calls + 1

    opt = optax.sgd(0.1)
    plain = jxent.train.make_step(hidden, opt, head=TIED, ignore_index=0)
    s1, m1 = plain(jxent.train.init_state(params, opt), tokens, labels, where=where)
    aux = jxent.train.make_step(
        stateful, opt, head=TIED, has_aux=True, microbatches=4, ignore_index=0
    )
    start = jxent.train.init_state(params, opt, model_state=jnp.zeros((), jnp.int32), key=key)
    s4, m4 = aux(start, tokens, labels, where=where)
    assert int(s4.model_state) == 4  # one call per micro-batch
    assert_tree_close(s4.params, s1.params, FLOAT64_RTOL)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=FLOAT64_RTOL)
    # fit: the inference-mode predictor evaluates with the head of (params, model_state)
    (trained, calls), history = jxent.train.fit(
        stateful,
        params,
        opt,
        (tokens, labels, where),
        epochs=1,
        batch_size=4,
        key=key,
        eval_data=(tokens, labels, where),
        progress=False,
        has_aux=True,
        model_state=jnp.zeros((), jnp.int32),
        eval_predictor=lambda params, tokens, calls: hidden(params, tokens),
        head=TIED,
        ignore_index=0,
    )
    assert int(calls) == 2  # two batches of four sequences
    expected = jxent.train.evaluate(
        hidden, trained, tokens, labels, head=TIED, where=where, ignore_index=0
    )
    np.testing.assert_allclose(history[0]["eval_loss"], expected["loss"], rtol=FLOAT64_RTOL)


def test_bfloat16_compute_and_a_one_device_mesh(key):
    params = init(key, jnp.float32)
    tokens, labels, where = _batch(jax.random.fold_in(key, 1))
    opt = optax.sgd(0.1)
    step32 = jxent.train.make_step(hidden, opt, head=TIED, ignore_index=0)
    step16 = jxent.train.make_step(
        hidden, opt, head=TIED, ignore_index=0, compute_dtype=jnp.bfloat16
    )
    meshed = jxent.train.make_step(
        hidden, opt, head=TIED, ignore_index=0, mesh=jxent.train.data_mesh(), microbatches=2
    )
    s32, m32 = step32(jxent.train.init_state(params, opt), tokens, labels, where=where)
    s16, m16 = step16(jxent.train.init_state(params, opt), tokens, labels, where=where)
    sm, mm = meshed(jxent.train.init_state(params, opt), tokens, labels, where=where)
    assert m16["loss"].dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16.params))
    # bf16 keeps 8 significant bits: the loss of an O(1) problem within a few percent
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)
    # float32, the same sums in two micro-batches
    np.testing.assert_allclose(mm["loss"], m32["loss"], rtol=1e-6)
    assert_tree_close(sm.params, s32.params, 1e-5)


def test_bad_heads_and_inputs_are_named(key):
    params = init(key, jnp.float32)
    tokens, labels, _ = _batch(key)
    opt = optax.sgd(0.1)
    state = jxent.train.init_state(params, opt)
    with pytest.raises(TypeError, match=r"make_step\(head=\.\.\.\) takes a jxent.train.LinearHead"):
        jxent.train.make_step(hidden, opt, head={"w": lambda p: p["embed"].T})
    with pytest.raises(TypeError, match=r"head\.w must be a function of the parameters"):
        jxent.train.make_step(hidden, opt, head=jxent.train.LinearHead(w=None))
    with pytest.raises(TypeError, match="'w'"):
        jxent.train.LinearHead()
    with pytest.raises(TypeError, match=r"evaluate\(head=\.\.\.\): head.bias must be None"):
        jxent.train.evaluate(hidden, params, tokens, labels, head=TIED.__class__(TIED.w, 1.0))
    narrow = jxent.train.LinearHead(w=lambda p: p["embed"].T[:-1])
    with pytest.raises(ValueError, match=r"hidden states \[\.\.\., D\] with D = 5.*\(8, 5, 6\)"):
        jxent.train.make_step(hidden, opt, head=narrow)(state, tokens, labels)
    flat = jxent.train.LinearHead(w=lambda p: p["bias"])
    with pytest.raises(ValueError, match=r"head.w\(params\) must give w of shape \[D, L\]"):
        jxent.train.make_step(hidden, opt, head=flat)(state, tokens, labels)
    step = jxent.train.make_step(hidden, opt, head=TIED)
    with pytest.raises(ValueError, match=r"labels must be shaped like the hidden states without D"):
        step(state, tokens, labels[:, :-1])
    with pytest.raises(ValueError, match=r"where must be a token mask shaped like the labels"):
        step(state, tokens, labels, where=jnp.ones((B, T, L), bool))
    with pytest.raises(TypeError, match="has no axis option"):
        jxent.train.make_step(hidden, opt, head=TIED, axis=-1)
    with pytest.raises(TypeError, match=r"chunk_size=, an option of the fused head"):
        jxent.train.make_step(hidden, opt, chunk_size=8)
    with pytest.raises(TypeError, match=r"did you mean 'chunk_size'"):
        jxent.train.make_step(hidden, opt, head=TIED, chunk_sise=8)
    with pytest.raises(TypeError, match=r"chunk_size= shapes the compiled step"):
        step(state, tokens, labels, chunk_size=8)


SHARDED = """
import json
import jax, jax.numpy as jnp, numpy as np, optax, jxent

jax.config.update("jax_enable_x64", True)
B, T, D, L = 16, 5, 6, 13
k = jax.random.split(jax.random.key(0), 3)
params = {"embed": jax.random.normal(k[0], (L, D)), "mix": jax.random.normal(k[1], (D, D))}
tokens = jax.random.randint(k[2], (B, T), 0, L)
labels = jnp.roll(tokens, -1, axis=1).at[:, -1].set(0).at[0, :3].set(0)
where = jnp.ones((B, T), bool).at[3].set(False)


def hidden(params, tokens):  # a one-hot matmul: shards like the tokens on any mesh
    return jnp.tanh(jax.nn.one_hot(tokens, L, dtype=jnp.float64) @ params["embed"] @ params["mix"])


head = jxent.train.LinearHead(w=lambda p: p["embed"].T)
opt = optax.sgd(0.1, momentum=0.9)


def run(mesh, microbatches):
    step = jxent.train.make_step(
        hidden, opt, head=head, mesh=mesh, microbatches=microbatches, ignore_index=0, z_loss=1e-2
    )
    state, losses = jxent.train.init_state(params, opt), []
    for _ in range(2):
        state, metrics = step(state, tokens, labels, where=where)
        losses.append(float(metrics["loss"]))
    return losses, [np.asarray(a).tolist() for a in jax.tree.leaves(state.params)]


single = run(None, 1)
errors = {}
for name, mesh in (("auto", jxent.train.data_mesh()), ("explicit", jax.make_mesh((8,), ("data",)))):
    for microbatches in (1, 2):
        losses, leaves = run(mesh, microbatches)
        errors[f"{name}-{microbatches}"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip([losses, *leaves], [single[0], *single[1]])
        )
print(json.dumps(errors))
"""


@pytest.mark.slow
def test_fused_head_step_on_8_devices_equals_one_device():
    """Auto (``data_mesh``) and Explicit (``jax.make_mesh``) meshes, with and without k = 2."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    done = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    assert sorted(errors) == ["auto-1", "auto-2", "explicit-1", "explicit-2"]
    for name, error in errors.items():
        assert error < 1e-12, (name, error)  # float64, sums in another order
