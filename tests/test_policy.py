"""The clipped policy objective (``jxent.policy_loss``): the whole batch's objective, written
plainly here from its definition (a loop over sequences), and its ``jax.grad`` in the model's
parameters equal the micro-batched one (k = 1, 2, 4, summed under ``lax.scan`` with the whole
batch's ``policy_denominator``) in float64, with ragged masks, clipping on both sides, the KL and
the entropy terms on. Eight devices: ``tests/scripts/policy_sharded.py``.
"""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from _reference import max_rel_error
from _scripts import run_script

B, T, D, V = 8, 6, 5, 7
LOSS_TYPES = ["token_mean", "sequence_mean", "token_sum"]
OPTIONS = {"epsilon": 0.2, "epsilon_high": 0.28, "kl_coef": 0.05, "entropy_coef": 0.01}
# Sequence i counts tokens STARTS[i] .. STARTS[i] + LENGTHS[i] - 1 (a prompt before, padding
# after). In micro-batches of 2 sequences, the second holds one token; sequence 3 holds none.
LENGTHS = np.array([6, 4, 1, 0, 5, 2, 6, 3])
STARTS = np.array([0, 1, 2, 0, 1, 3, 0, 2])
WHERE = (np.arange(T) >= STARTS[:, None]) & (np.arange(T) < (STARTS + LENGTHS)[:, None])


class Batch(NamedTuple):
    x: jax.Array  # [B, T, D] hidden states
    y: jax.Array  # [B, T] sampled tokens
    where: jax.Array  # [B, T] completion mask
    advantages: jax.Array  # [B] or [B, T]
    old_log_prob: jax.Array  # [B, T], from the sampling policy
    ref_log_prob: jax.Array  # [B, T], from the reference policy


def log_probs(params, x, y):
    """A linear policy's log-probability of each token and its entropy, textbook style."""
    logits = x @ params["w"] + params["b"].reshape(1, 1, V)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def perturbed(params, key, scale):
    keys = jax.random.split(key, 2)
    return {
        "w": params["w"] + scale * jax.random.normal(keys[0], params["w"].shape),
        "b": params["b"] + scale * jax.random.normal(keys[1], params["b"].shape),
    }


def make_problem(key, per_token_advantages=False):
    k = jax.random.split(key, 7)
    params = {"w": jax.random.normal(k[0], (D, V)), "b": 0.3 * jax.random.normal(k[1], (V,))}
    x = jax.random.normal(k[2], (B, T, D))
    y = jax.random.randint(k[3], (B, T), 0, V)
    advantages = jax.random.normal(k[4], (B, T) if per_token_advantages else (B,))
    old, _ = log_probs(perturbed(params, k[5], 0.4), x, y)
    ref, _ = log_probs(perturbed(params, k[6], 0.3), x, y)
    return params, Batch(x, y, jnp.asarray(WHERE), advantages, old, ref)


def reference(params, batch, loss_type):
    """The objective from its definition, sequence by sequence, on the whole batch."""
    log_prob, entropy = log_probs(params, batch.x, batch.y)
    eps_low, eps_high = OPTIONS["epsilon"], OPTIONS["epsilon_high"]
    parts = []  # per counted sequence: its tokens' (pg, kl, entropy, clip_low, clip_high)
    for i in range(B):
        t = np.flatnonzero(WHERE[i])
        if t.size == 0:
            continue
        a = batch.advantages[i, t] if batch.advantages.ndim == 2 else batch.advantages[i]
        r = jnp.exp(log_prob[i, t] - batch.old_log_prob[i, t])
        pg = -jnp.minimum(r * a, jnp.clip(r, 1 - eps_low, 1 + eps_high) * a)
        log_rho = batch.ref_log_prob[i, t] - log_prob[i, t]
        kl = jnp.exp(log_rho) - log_rho - 1
        low = 1.0 * ((r < 1 - eps_low) & (a < 0))
        high = 1.0 * ((r > 1 + eps_high) & (a > 0))
        parts.append((pg, kl, entropy[i, t], low, high))
    sequences = len(parts)
    tokens = sum(p[0].size for p in parts)

    def aggregate(j):
        if loss_type == "token_mean":
            return sum(jnp.sum(p[j]) for p in parts) / tokens
        if loss_type == "sequence_mean":
            return sum(jnp.mean(p[j]) for p in parts) / sequences
        return sum(jnp.sum(p[j]) for p in parts) / (sequences * T)  # Dr. GRPO

    pg, kl, ent, low, high = (aggregate(j) for j in range(5))
    loss = pg + OPTIONS["kl_coef"] * kl - OPTIONS["entropy_coef"] * ent
    return loss, jxent.PolicyMetrics(pg, kl, ent, low, high)


def objective(params, batch, loss_type, denominator=None):
    log_prob, entropy = log_probs(params, batch.x, batch.y)
    return jxent.policy_loss(
        log_prob,
        batch.old_log_prob,
        batch.advantages,
        where=batch.where,
        ref_log_prob=batch.ref_log_prob,
        entropy=entropy,
        loss_type=loss_type,
        denominator=denominator,
        **OPTIONS,
    )


@functools.partial(jax.jit, static_argnames=("loss_type", "microbatches"))
def microbatched(params, batch, loss_type, microbatches):
    """The recipe of docs/rl.md: the whole batch's denominator, the micro-batches summed."""
    denominator = jxent.policy_denominator(batch.where, loss_type=loss_type)
    micro = jax.tree.map(lambda a: a.reshape(microbatches, -1, *a.shape[1:]), batch)
    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def add(total, one):
        (loss, metrics), grads = value_and_grad(params, one, loss_type, denominator)
        return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

    zero = jax.tree.map(jnp.zeros_like, (denominator, jxent.PolicyMetrics(*[denominator] * 5)))
    total, _ = jax.lax.scan(add, (*zero, jax.tree.map(jnp.zeros_like, params)), micro)
    return total


@pytest.mark.parametrize(
    "advantages", ["per_sequence", pytest.param("per_token", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_equal_the_whole_batch_objective_and_gradient(
    x64, key, loss_type, advantages
):
    params, batch = make_problem(key, per_token_advantages=advantages == "per_token")
    (want, want_metrics), want_grads = jax.value_and_grad(reference, has_aux=True)(
        params, batch, loss_type
    )
    assert want_metrics.clip_low > 0
    assert want_metrics.clip_high > 0
    for k in (1, 2, 4):
        loss, metrics, grads = microbatched(params, batch, loss_type, k)
        assert max_rel_error(loss, want) <= 1e-10, k
        assert max_rel_error(grads, want_grads) <= 1e-10, k
        for got, expected in zip(metrics, want_metrics):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_whole_batch_call_is_the_definition(x64, key, loss_type, jit):
    params, batch = make_problem(key)
    fn = jax.value_and_grad(objective, has_aux=True)
    fn = jax.jit(fn, static_argnums=2) if jit else fn
    (loss, metrics), grads = fn(params, batch, loss_type)
    (want, want_metrics), want_grads = jax.value_and_grad(reference, has_aux=True)(
        params, batch, loss_type
    )
    assert max_rel_error(loss, want) <= 1e-12
    assert max_rel_error(grads, want_grads) <= 1e-12
    np.testing.assert_allclose(np.array(metrics), np.array(want_metrics), rtol=1e-12, atol=1e-15)
    parts = metrics.pg_loss + OPTIONS["kl_coef"] * metrics.kl
    np.testing.assert_allclose(loss, parts - OPTIONS["entropy_coef"] * metrics.entropy, 1e-12)


def test_flat_tokens_take_the_token_mean(x64, key):
    params, batch = make_problem(key, per_token_advantages=True)

    def flat(params):
        log_prob, entropy = log_probs(params, batch.x, batch.y)
        arrays = (log_prob, batch.old_log_prob, batch.advantages, batch.ref_log_prob, entropy)
        lp, old, adv, ref, ent = (a.reshape(-1) for a in arrays)
        return jxent.policy_loss(
            lp, old, adv, where=batch.where.reshape(-1), ref_log_prob=ref, entropy=ent, **OPTIONS
        )[0]

    want, want_grads = jax.value_and_grad(lambda p: reference(p, batch, "token_mean")[0])(params)
    loss, grads = jax.value_and_grad(flat)(params)
    assert max_rel_error(loss, want) <= 1e-12
    assert max_rel_error(grads, want_grads) <= 1e-12


def test_masked_tokens_pass_nothing_whatever_their_values(x64, key):
    """Padding holds garbage (NaN, inf log-probs): the loss and gradient are the clean ones."""
    params, batch = make_problem(key, per_token_advantages=True)
    garbage = batch._replace(
        old_log_prob=jnp.where(batch.where, batch.old_log_prob, jnp.nan),
        ref_log_prob=jnp.where(batch.where, batch.ref_log_prob, -jnp.inf),
        advantages=jnp.where(batch.where, batch.advantages, jnp.inf),
    )
    fn = jax.value_and_grad(objective, has_aux=True)
    for loss_type in LOSS_TYPES:
        (loss, _), grads = fn(params, garbage, loss_type)
        (want, _), want_grads = fn(params, batch, loss_type)
        np.testing.assert_array_equal(loss, want)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_denominators_are_counts_that_add_up_over_parts(loss_type):
    parts = [jxent.policy_denominator(w, loss_type=loss_type) for w in WHERE.reshape(4, 2, T)]
    whole = {"token_mean": LENGTHS.sum(), "sequence_mean": 7, "token_sum": 7 * T}[loss_type]
    assert float(sum(parts)) == float(jxent.policy_denominator(WHERE, loss_type=loss_type))
    assert float(sum(parts)) == whole


def test_nothing_counted_is_zero_not_nan(x64):
    where = jnp.zeros((2, 3), bool)
    for loss_type in LOSS_TYPES:
        assert float(jxent.policy_denominator(where, loss_type=loss_type)) == 0.0
        loss, metrics = jxent.policy_loss(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2), where=where, loss_type=loss_type
        )
        assert float(loss) == 0.0
        assert not np.any(np.isnan(np.array(metrics)))


def test_where_none_counts_every_token_and_float32_stays_float32():
    log_prob = jnp.log(jnp.full((2, 4), 0.25))
    loss, metrics = jxent.policy_loss(log_prob, log_prob, jnp.array([1.0, 3.0]), where=None)
    assert loss.dtype == jnp.float32
    assert float(loss) == -2.0
    bf16 = jxent.policy_loss(log_prob.astype(jnp.bfloat16), log_prob, jnp.ones(2), where=None)
    assert bf16[0].dtype == jnp.float32  # bfloat16 log-probs: the objective in float32


LP = jnp.zeros((2, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"old_log_prob": jnp.zeros((2, 4))}, ValueError, "old_log_prob must be shaped like"),
        ({"advantages": jnp.zeros(3)}, ValueError, "advantages must be per token, (2, 3), or"),
        ({"where": jnp.ones((3, 2), bool)}, ValueError, "where must be shaped like log_prob"),
        ({"where": jnp.ones((2, 3))}, TypeError, "where must be a boolean mask"),
        ({"ref_log_prob": jnp.zeros(6)}, ValueError, "ref_log_prob must be shaped like"),
        ({"entropy": jnp.zeros((2, 1))}, ValueError, "entropy must be shaped like"),
        ({"loss_type": "seq-mean"}, ValueError, "loss_type must be one of"),
        ({"kl_coef": 0.1}, ValueError, "kl_coef=0.1 needs ref_log_prob"),
        ({"entropy_coef": 0.1}, ValueError, "entropy_coef=0.1 needs entropy"),
        ({"epsilon": -0.1}, ValueError, "epsilon must be >= 0"),
        ({"epsilon_high": -0.1}, ValueError, "epsilon_high must be >= 0"),
        ({"denominator": jnp.ones(2)}, ValueError, "denominator must be a scalar"),
        ({"log_prob": jnp.zeros((2, 3), int)}, TypeError, "log_prob must have a floating dtype"),
        ({"log_prob": jnp.zeros(())}, ValueError, "log_prob must be per token"),
        (
            {
                "log_prob": jnp.zeros(6),
                "old_log_prob": jnp.zeros(6),
                "advantages": jnp.zeros(6),
                "where": jnp.ones(6, bool),
                "loss_type": "sequence_mean",
            },
            ValueError,
            "loss_type='sequence_mean' needs sequences",
        ),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, message):
    args = {"log_prob": LP, "old_log_prob": LP, "advantages": jnp.zeros(2), "where": None}
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        jxent.policy_loss(
            args.pop("log_prob"), args.pop("old_log_prob"), args.pop("advantages"), **args
        )


@pytest.mark.parametrize(
    ("where", "loss_type", "error", "message"),
    [
        (jnp.ones((2, 3), bool), "tokens", ValueError, "loss_type must be one of"),
        (jnp.ones(3, bool), "token_sum", ValueError, "loss_type='token_sum' needs sequences"),
        (jnp.ones((2, 3), int), "token_mean", TypeError, "where must be a boolean mask"),
    ],
)
def test_bad_input_to_the_denominator_names_the_argument(where, loss_type, error, message):
    with pytest.raises(error, match=re.escape(message)):
        jxent.policy_denominator(where, loss_type=loss_type)


@pytest.mark.parametrize("loss_type", ["token_mean", "sequence_mean"])
def test_the_recipe_through_the_fused_head(x64, key, loss_type):
    """Per-token log-probs and entropy from ``jxent.linear_log_probs`` (chunked, never [N, V])."""
    params, batch = make_problem(key)

    def fused(params, batch, loss_type, denominator):
        out = jxent.linear_log_probs(
            batch.x.reshape(-1, D),
            params["w"],
            batch.y.reshape(-1),
            bias=params["b"],
            chunk_size=4,
            vocab_block_size=3,
        )
        shape = batch.y.shape
        return jxent.policy_loss(
            out.log_prob.reshape(shape),
            batch.old_log_prob,
            batch.advantages,
            where=batch.where,
            ref_log_prob=batch.ref_log_prob,
            entropy=out.entropy.reshape(shape),
            loss_type=loss_type,
            denominator=denominator,
            **OPTIONS,
        )

    denominator = jxent.policy_denominator(batch.where, loss_type=loss_type)
    micro = jax.tree.map(lambda a: a.reshape(2, -1, *a.shape[1:]), batch)
    value_and_grad = jax.jit(jax.value_and_grad(fused, has_aux=True), static_argnums=2)
    total_loss, total_grads = 0.0, jax.tree.map(jnp.zeros_like, params)
    for j in range(2):
        one = jax.tree.map(lambda a, j=j: a[j], micro)
        (loss, _), grads = value_and_grad(params, one, loss_type, denominator)
        total_loss, total_grads = total_loss + loss, jax.tree.map(jnp.add, total_grads, grads)
    (want, _), want_grads = jax.value_and_grad(reference, has_aux=True)(params, batch, loss_type)
    assert max_rel_error(total_loss, want) <= 1e-10
    assert max_rel_error(total_grads, want_grads) <= 1e-10


@pytest.mark.slow
def test_eight_devices_equal_the_whole_batch_float64():
    """Batch sharded over a "data" axis: jit (Auto), shard_map, and micro-batches on the mesh."""
    errors = run_script("policy_sharded.py", devices=8)
    assert len(errors) == 6, errors
    for case, error in errors.items():
        assert isinstance(error, float), (case, error)  # else the message of what raised
        assert error <= 1e-10, (case, error)


def test_an_overflowing_ratio_with_a_zero_advantage_is_not_nan():
    """exp(99) is inf in float32; times an advantage of 0 it would be NaN (GRPO groups whose
    rewards are all equal have advantage 0). The log-ratio is clamped to [-20, 20] first."""
    log_prob = jnp.array([-1.0, -1.0], jnp.float32)
    old = jnp.array([-100.0, -1.5], jnp.float32)
    advantages = jnp.array([0.0, 1.0], jnp.float32)

    def loss(lp):
        return jxent.policy_loss(lp, old, advantages, where=None, kl_coef=0.1, ref_log_prob=old)[0]

    value, grad = jax.value_and_grad(loss)(log_prob)
    assert bool(jnp.isfinite(value))
    assert bool(jnp.all(jnp.isfinite(grad)))
