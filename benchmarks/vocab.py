"""One large-vocabulary variant in this process: median time and honest peak memory.

    python -m benchmarks.vocab VARIANT N D L DTYPE REPEATS

prints one JSON line. Memory (Linux): build the inputs, compile, then reset the peak counter
(``echo 5 > /proc/self/clear_refs`` resets VmHWM), run once and read VmHWM. JAX variants are
compiled ahead of time (``lower().compile()``) so that the measured run is the first to allocate
buffers (XLA's allocator keeps them afterwards); torch variants are measured on their first run.
``above_inputs`` is that peak minus the resident set before the run (inputs, runtime, compiled
code); ``scratch`` subtracts the gradient outputs dx and dw too, which every method owes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

MIB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def jax_variants(name: str, n: int, d: int, vocab: int, dtype: str) -> tuple[Callable, int]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jxent

    dt = jnp.dtype(dtype)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = (jax.random.normal(k1, (n, d), jnp.float32)).astype(dt)
    w = (jax.random.normal(k2, (d, vocab), jnp.float32) / d**0.5).astype(dt)
    y = jax.random.randint(k3, (n,), 0, vocab)

    def plain(x, w):
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))

    if name == "jax.value_and_grad (materialised)":
        fn = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))
    elif name == "jxent.value_and_grad (materialised)":
        vg = jxent.value_and_grad(
            lambda p, _: jnp.dot(p[0], p[1], preferred_element_type=jnp.float32)
        )
        fn = jax.jit(lambda x, w: vg((x, w), None, y))
    elif name.startswith("jxent.vocab_parallel"):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(jax.devices()), ("vocab",))
        w = jax.device_put(w, NamedSharding(mesh, PartitionSpec(None, "vocab")))

        def parallel(x, w):
            return jxent.vocab_parallel_linear_cross_entropy(x, w, y, mesh=mesh)

        fn = jax.jit(jax.value_and_grad(parallel, argnums=(0, 1)))
    elif name.startswith("jxent.linear_cross_entropy"):
        chunk = int(os.environ.get("JXENT_CHUNK", "0")) or None
        block = int(os.environ.get("JXENT_BLOCK", "0")) or None

        def chunked(x, w):
            return jxent.linear_cross_entropy(x, w, y, chunk_size=chunk, vocab_block_size=block)

        fn = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))
    elif name.startswith("jxent.linear_log_probs"):

        def log_probs(x, w):  # an RL objective's per-token log-probs, with an entropy bonus
            out = jxent.linear_log_probs(x, w, y)
            return -jnp.mean(out.log_prob) - 0.01 * jnp.mean(out.entropy)

        fn = jax.jit(jax.value_and_grad(log_probs, argnums=(0, 1)))
    elif name in DISTILL_VOCAB:
        program = distill_programs(y, _teacher(x, w))[name]
        fn = jax.jit(program)
    elif "ggn" in name:
        return _ggn_variant(name, x, w, y)
    elif name in SAMPLE_VOCAB:
        program = sample_programs()[name]
        compiled = jax.jit(program).lower(jax.random.key(1), x, w).compile()

        def run():
            return jax.block_until_ready(compiled(jax.random.key(1), x, w))

        return run, 0  # the output is N labels: nothing every method owes

    else:
        raise SystemExit(f"unknown variant {name}")
    jax.block_until_ready((x, w, y))
    compiled = fn.lower(x, w).compile()  # compile without running: no buffers allocated yet

    def run():
        return jax.block_until_ready(compiled(x, w))

    return run, x.size * x.dtype.itemsize + w.size * w.dtype.itemsize


DISTILL_VOCAB = [
    "jax.value_and_grad (materialised forward KL)",
    "jxent.linear_distillation_loss (chunked, forward KL)",
]


def _teacher(x, w):
    """A teacher head of the student's shapes (other values)."""
    import jax.numpy as jnp

    return jnp.roll(x, 1, axis=0), jnp.roll(w, 1, axis=0) * 1.5


def distill_programs(y, teacher, divergence: str = "forward_kl"):
    """Distillation's value and gradient w.r.t. the student ``(x, w)``: materialised, fused."""
    import jax
    import jax.numpy as jnp

    import jxent

    teacher_x, teacher_w = teacher

    def materialised(x, w):
        log_q = jax.nn.log_softmax(jnp.dot(x, w, preferred_element_type=jnp.float32))
        teacher_logits = jnp.dot(teacher_x, teacher_w, preferred_element_type=jnp.float32)
        log_p = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits))
        p = jnp.exp(log_p)
        if divergence == "forward_kl":
            return jnp.mean(jnp.sum(p * (log_p - log_q), axis=-1))
        q = jnp.exp(log_q)
        log_m = jnp.log(0.5 * (p + q))
        d = jnp.sum(p * (log_p - log_m), -1) + jnp.sum(q * (log_q - log_m), -1)
        return jnp.mean(0.5 * d)

    def fused(x, w):
        return jxent.linear_distillation_loss(x, w, teacher_x, teacher_w, divergence=divergence)

    grad = {"argnums": (0, 1)}
    kind = "forward KL" if divergence == "forward_kl" else "JSD"
    return {
        f"jax.value_and_grad (materialised {kind})": jax.value_and_grad(materialised, **grad),
        f"jxent.linear_distillation_loss (chunked, {kind})": jax.value_and_grad(fused, **grad),
    }


GGN_VOCAB = [
    "jxent.ggn_vector_product (materialised)",
    "jxent.linear_cross_entropy_ggn_vector_product (chunked)",
]


def ggn_programs(x, w, y):
    """The head's GGN product along (x_dot, w_dot): materialised logits, or chunked."""
    import jax.numpy as jnp

    import jxent

    def materialised(x, w, x_dot, w_dot):
        head = lambda p, _: jnp.dot(p[0], p[1], preferred_element_type=jnp.float32)  # noqa: E731
        return jxent.ggn_vector_product(head)((x, w), None, y, (x_dot, w_dot))

    def chunked(x, w, x_dot, w_dot):
        return jxent.linear_cross_entropy_ggn_vector_product(x, w, y, (x_dot, w_dot, None))[:2]

    return dict(zip(GGN_VOCAB, (materialised, chunked), strict=True))


SAMPLE_VOCAB = [
    "jax.random.categorical (materialised logits)",
    "jxent.linear_sample_labels (chunked)",
]


def sample_programs():
    """Labels drawn from softmax(x w): from the materialised logits, or chunked."""
    import jax
    import jax.numpy as jnp

    import jxent

    def materialised(key, x, w):
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return jax.random.categorical(key, logits, axis=-1)

    def chunked(key, x, w):
        return jxent.linear_sample_labels(key, x, w)

    return dict(zip(SAMPLE_VOCAB, (materialised, chunked), strict=True))


def ggn_tangents(x, w):
    import jax

    k1, k2 = jax.random.split(jax.random.key(3))
    x_dot = jax.random.normal(k1, x.shape).astype(x.dtype)
    w_dot = (jax.random.normal(k2, w.shape) / w.shape[0] ** 0.5).astype(w.dtype)
    return x_dot, w_dot


def _ggn_variant(name, x, w, y):
    import jax

    x_dot, w_dot = ggn_tangents(x, w)
    jax.block_until_ready((x, w, y, x_dot, w_dot))
    compiled = jax.jit(ggn_programs(x, w, y)[name]).lower(x, w, x_dot, w_dot).compile()

    def run():
        return jax.block_until_ready(compiled(x, w, x_dot, w_dot))

    # The outputs (g_x, g_w) are shaped like (x, w): what every method owes, as for gradients.
    return run, x.size * x.dtype.itemsize + w.size * w.dtype.itemsize


def torch_variants(name: str, n: int, d: int, vocab: int, dtype: str) -> tuple[Callable, int]:
    import torch
    import torch.nn.functional as F

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dt).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(dt).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)

    def run():
        x.grad = w.grad = None
        if name == "torch F.cross_entropy (eager)":
            loss = F.cross_entropy((x @ w.T).float(), y)
        elif name == "torch F.linear_cross_entropy (reference)":
            loss = F.linear_cross_entropy(x, w, y)
        elif name == "torch F.linear_cross_entropy (chunked)":
            loss = F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())
        else:
            raise SystemExit(f"unknown variant {name}")
        loss.backward()
        return loss

    return run, x.numel() * x.element_size() + w.numel() * w.element_size()


def main(argv: list[str]) -> None:
    name, n, d, vocab, dtype, repeats = argv[0], *map(int, argv[1:4]), argv[4], int(argv[5])
    builder = torch_variants if name.startswith("torch") else jax_variants
    start = time.perf_counter()
    run, grad_bytes = builder(name, n, d, vocab, dtype)  # JAX: inputs built and compiled
    baseline = _status("VmRSS")
    _reset_peak()
    run()  # the first run allocates everything it needs: measure it
    peak = _status("VmHWM")
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    above = (peak - baseline) / MIB
    print(
        json.dumps(
            {
                "variant": name,
                "N": n,
                "D": d,
                "L": vocab,
                "dtype": dtype,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "runs": repeats,
                "first_call_s": first,
                "above_inputs_mib": above,
                "scratch_mib": above - grad_bytes / MIB,
                "gradient_outputs_mib": grad_bytes / MIB,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
