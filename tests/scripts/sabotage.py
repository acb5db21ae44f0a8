"""The checker's references are independent of jxent: proven by sabotaging jxent's own rules.

    python sabotage.py

Before jxent is imported, ``jax.custom_jvp.defjvp`` is patched so that every derivative rule
jxent defines scales its output tangent by 1.5 (JAX's own rules were defined at its import and
stay right). Then, on a small tanh-linear model, ``jxent.check_grads``
- must PASS a correct candidate: ``jax.grad`` of a ``log_softmax`` loss written here, and
- must FAIL ``jax.grad`` of ``jxent.softmax_cross_entropy`` (which runs jxent's now wrong rule),
  as ``SCALED`` by 1.5 -- the check that, before the plain reference, compared jxent with itself.
``jxent.grad`` forms the logits cotangent by hand (not through the custom rule): reported too.
Prints one JSON line: the two verdicts, the fitted scale, and how far ``jax.grad`` of
``jxent.softmax_cross_entropy`` now is from the plain gradient (the sabotage took effect).
"""

import json

import jax
import jax.numpy as jnp

_defjvp = jax.custom_jvp.defjvp


def _sabotaged(self, jvp, symbolic_zeros=False):
    def scaled(primals, tangents):
        out, tangent_out = jvp(primals, tangents)
        return out, jax.tree.map(lambda t: 1.5 * t, tangent_out)

    return _defjvp(self, scaled, symbolic_zeros=symbolic_zeros)


jax.custom_jvp.defjvp = _sabotaged

import jxent  # noqa: E402  (after the patch: every rule jxent defines is sabotaged)


def predictor(params, x):
    w, b = params
    return jnp.tanh(x @ w + b)


def plain_loss(params, x, y):
    log_p = jax.nn.log_softmax(predictor(params, x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


keys = jax.random.split(jax.random.key(0), 4)
params = (jax.random.normal(keys[0], (6, 4)), jax.random.normal(keys[1], (4,)))
x = jax.random.normal(keys[2], (16, 6))
y = jax.random.randint(keys[3], (16,), 0, 4)

correct = jxent.check_grads(jax.grad(plain_loss), predictor, params, x, y)
jxent_rule = jax.grad(lambda p, x, y: jxent.softmax_cross_entropy(predictor(p, x), y))
jxent_own = jxent.check_grads(jxent_rule, predictor, params, x, y)
hand = jxent.check_grads(jxent.grad(predictor), predictor, params, x, y)
logits = predictor(params, x)
ratio = jax.grad(jxent.softmax_cross_entropy)(logits, y) / jax.grad(
    lambda s: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], axis=1))
)(logits)
print(
    json.dumps(
        {
            "correct_ok": correct.ok,
            "correct_report": str(correct),
            "jxent_ok": jxent_own.ok,
            "jxent_kind": jxent_own.diagnosis.kind.name,
            "jxent_scales": [leaf.diagnosis.scale for leaf in jxent_own.leaves],
            "jxent_report": str(jxent_own),
            "sabotage_ratio": float(jnp.nanmedian(ratio)),
            "hand_ok": hand.ok,
        }
    )
)
