"""``jxent demo lm``: a small transformer language model trained with ``linear_cross_entropy``.

Data that needs no download (the Python standard library's own source files, or ``--corpus``),
a byte-level BPE tokenizer trained with the ``tokenizers`` library (cached), a decoder-only
transformer in plain JAX, AdamW, and ``jxent.train.make_step(body, adamw, head=LinearHead(...),
ignore_index=pad_id, z_loss=1e-4)``: the fused head ``jxent.linear_cross_entropy`` on the
transformer's hidden states, differentiated by ``jax.value_and_grad`` of the whole model, data
parallel over a ``"data"`` mesh axis. It prints and records training and validation loss,
perplexity, tokens per second and the validation tokens' unigram entropy, and measures -- each in
a process of its own -- the peak memory of one training step with the fused head against the same
step with materialised logits.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jxent import train
from jxent._cli import _base

SPECIALS = ["<pad>", "<eos>"]  # ids 0 and 1
PAD, EOS = 0, 1
Z_LOSS = 1e-4


# --- data -------------------------------------------------------------------------------------


def corpus_files(corpus: str | None) -> tuple[Path, list[Path]]:
    """``(root, files)``: the standard library's ``*.py`` (not site-packages), or ``corpus``'s."""
    if corpus is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    else:
        root = Path(corpus)
        if not root.is_dir():
            raise _base.CommandError(f"--corpus {corpus!r} is not a folder")
        hidden = lambda p: any(part.startswith(".") for part in p.relative_to(root).parts)  # noqa: E731
        files = sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))
    if len(files) < 2:
        raise _base.CommandError(
            f"found {len(files)} text file(s) in {root}; the split needs at least "
            "2 (one for training, one for validation)"
        )
    return root, files


def split(root: Path, files: list[Path], every: int = 10) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split by path hash.

    A file is validation when the SHA-1 of its path relative to ``root`` is 0 modulo ``every``:
    the same on every machine, in any listing order.
    """
    train, val = [], []
    for path in files:
        digest = hashlib.sha1(path.relative_to(root).as_posix().encode()).digest()
        (val if int.from_bytes(digest[:8], "big") % every == 0 else train).append(path)
    if not val or not train:  # a tiny corpus: hold out the last file
        train, val = files[:-1], files[-1:]
    return train, val


def read_texts(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


# The tokenizer learns its merges from at most this many characters of the training split (in
# the split's order): enough for 32k merges, and a first run stays within the time budget.
TOKENIZER_CHARS = 8_000_000


def train_tokenizer(texts: list[str], vocab_size: int, cache: Path) -> Any:
    """A byte-level BPE (``tokenizers``), cached under ``cache`` by a hash of data and size."""
    texts = _prefix(texts, TOKENIZER_CHARS)
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    key = hashlib.sha1(str(vocab_size).encode())
    for text in texts:
        key.update(hashlib.sha1(text.encode()).digest())
    path = cache / f"bpe-{vocab_size}-{key.hexdigest()[:16]}.json"
    if path.exists():
        return Tokenizer.from_file(str(path)), True
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False
    )
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return Tokenizer.from_file(str(path)), False


def _hash_order(root: Path, files: list[Path]) -> list[Path]:
    """The files in the order of their paths' SHA-1: a prefix is a sample of every folder."""
    return sorted(
        files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).digest()
    )


def _prefix(texts: list[str], chars: int) -> list[str]:
    """The leading texts until they hold ``chars`` characters (all of them if they hold fewer)."""
    out, total = [], 0
    for text in texts:
        if total >= chars:
            break
        out.append(text)
        total += len(text)
    return out


def encode(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """One stream of token ids, files separated by ``<eos>``."""
    ids = [np.asarray([*e.ids, EOS], np.int32) for e in tokenizer.encode_batch(texts)]
    return np.concatenate(ids)


def unigram_entropy(tokens: np.ndarray) -> float:
    """The entropy (nats) of the tokens' own empirical distribution: the best unigram model."""
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def windows(stream: np.ndarray, starts: np.ndarray, context: int) -> np.ndarray:
    """``[B, context + 1]`` token windows (inputs and next-token targets)."""
    return np.stack([stream[s : s + context + 1] for s in starts])


# --- model ------------------------------------------------------------------------------------


def init_model(key: jax.Array, vocab: int, width: int, layers: int, context: int) -> dict:
    """A pre-norm decoder-only transformer's parameters (GPT-2-like initialisation)."""
    keys = iter(jax.random.split(key, 4 + 4 * layers))

    def normal(shape: tuple[int, ...], scale: float = 0.02) -> jax.Array:
        return scale * jax.random.normal(next(keys), shape)

    def norm() -> dict:
        return {"scale": jnp.ones(width), "bias": jnp.zeros(width)}

    blocks = [
        {
            "norm1": norm(),
            "qkv": normal((width, 3 * width)),
            "proj": normal((width, width), 0.02 / math.sqrt(2 * layers)),
            "norm2": norm(),
            "up": normal((width, 4 * width)),
            "down": normal((4 * width, width), 0.02 / math.sqrt(2 * layers)),
        }
        for _ in range(layers)
    ]
    return {
        "embed": normal((vocab, width)),
        "pos": normal((context, width)),
        "blocks": blocks,
        "norm": norm(),
        "head": normal((width, vocab)),
        "bias": jnp.zeros(vocab),  # set to the log unigram frequencies by the demo
    }


def _layer_norm(h: jax.Array, p: dict) -> jax.Array:
    lead = (1,) * (h.ndim - 1)  # explicit broadcasting (strict rank promotion passes)
    scale, bias = p["scale"].reshape(*lead, -1), p["bias"].reshape(*lead, -1)
    return jax.nn.standardize(h, axis=-1, epsilon=1e-5) * scale + bias


def _embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """``table[tokens]``; with tokens sharded over Explicit mesh axes, sharded like them."""
    sharding = jax.typeof(tokens).sharding
    if sharding.mesh.empty or not any(sharding.spec):
        return table[tokens]
    out = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None))
    return table.at[tokens].get(out_sharding=out)


def body(params: dict, tokens: jax.Array, heads: int) -> jax.Array:
    """Tokens ``[B, T]`` -> final hidden states ``[B, T, D]`` (causal self-attention)."""
    batch, length = tokens.shape
    h = _embed(params["embed"], tokens) + params["pos"][None, :length]
    width = h.shape[-1]
    for blk in params["blocks"]:
        q, k, v = jnp.split(_layer_norm(h, blk["norm1"]) @ blk["qkv"], 3, axis=-1)
        shape = (batch, length, heads, width // heads)
        att = jax.nn.dot_product_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=True
        )
        h = h + att.reshape(batch, length, width) @ blk["proj"]
        h = h + jax.nn.gelu(_layer_norm(h, blk["norm2"]) @ blk["up"]) @ blk["down"]
    return _layer_norm(h, params["norm"])


# The output projection and bias, the head the fused loss takes: hidden [B, T, D] -> [B, T, L].
OUTPUT_HEAD = train.LinearHead(w=lambda params: params["head"], bias=lambda params: params["bias"])
LOSS_OPTIONS = {"ignore_index": PAD, "z_loss": Z_LOSS}


@functools.cache
def predictors(heads: int) -> tuple[Callable, Callable]:
    """``(hidden, logits)``: the transformer's hidden states, and its materialised logits.

    One pair of function objects per model, so the jitted step and evaluation compile once.
    """

    def hidden(params: dict, tokens: jax.Array) -> jax.Array:
        return body(params, tokens, heads)

    def logits(params: dict, tokens: jax.Array) -> jax.Array:
        # One [B * T, D] x [D, L] matmul, as the fused head's: a [B, T, D] one costs XLA's CPU
        # backend ~40 % more scratch at L = 32768 (a copy for dW), which is not the logits' cost.
        h = hidden(params, tokens)
        scores = h.reshape(-1, h.shape[-1]) @ params["head"] + params["bias"][None, :]
        return scores.reshape(*h.shape[:-1], -1)

    return hidden, logits


def lm_step(
    optimizer: optax.GradientTransformation, heads: int, head: str, mesh: Any = None
) -> Callable:
    """``step(state, inputs, targets)``: one AdamW step with the fused head or the logits.

    ``"fused"``: :func:`jxent.train.make_step` with the :data:`OUTPUT_HEAD` on the hidden
    states (no ``[B * T, L]`` logits); ``"materialised"``: the same step on the logits
    ``hidden @ w_out + b`` (what the memory comparison measures against).
    """
    hidden, logits = predictors(heads)
    if head == "fused":
        return train.make_step(hidden, optimizer, head=OUTPUT_HEAD, mesh=mesh, **LOSS_OPTIONS)
    return train.make_step(logits, optimizer, mesh=mesh, **LOSS_OPTIONS)


def _split(batch: Any) -> tuple[Any, Any]:
    """``[B, T + 1]`` windows -> ``(inputs [B, T], next-token targets [B, T])``."""
    return batch[:, :-1], batch[:, 1:]


def optimizer_for(args: argparse.Namespace) -> optax.GradientTransformation:
    warmup = max(1, args.steps // 10)
    total = max(args.steps, warmup + 1)  # optax needs a decay phase of at least one step
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, total, args.lr / 10)
    # No weight decay on vectors (norms, the output bias): the usual transformer recipe.
    decay = lambda params: jax.tree.map(lambda a: a.ndim > 1, params)  # noqa: E731
    return optax.adamw(schedule, weight_decay=0.01, mask=decay)


# --- memory, one process per head -------------------------------------------------------------


def measure_step(head: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory and time of one training step, in this process (see :func:`memory_rows`)."""
    params = init_model(jax.random.key(0), args.vocab, args.width, args.layers, args.context)
    optimizer = optimizer_for(args)
    state = train.init_state(params, optimizer)
    tokens = jax.random.randint(jax.random.key(1), (batch, args.context + 1), 2, args.vocab)
    inputs, targets = _split(tokens)
    compiled = _compiled(lm_step(optimizer, args.heads, head), state, inputs, targets)
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    jax.block_until_ready((state, inputs, targets))
    status = Path("/proc/self/status")
    rss_before = _status_bytes(status, "VmRSS")
    if rss_before is not None:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, inputs, targets))
    seconds = time.perf_counter() - start
    peak = _status_bytes(status, "VmHWM")
    mib = 2.0**20
    return {
        "head": head,
        "batch": batch,
        "tokens": batch * args.context,
        "peak_above_start_mib": None if peak is None else (peak - rss_before) / mib,
        "xla_temp_mib": None if temp is None else temp / mib,
        "first_step_s": seconds,
    }


def _compiled(step: Callable, state: train.TrainState, inputs: Any, targets: Any) -> Any:
    """The step compiled for these arguments (XLA's memory analysis; no buffers donated)."""
    return jax.jit(lambda s, x, y: step(s, x, y)).lower(state, inputs, targets).compile()


def _status_bytes(status: Path, field: str) -> int | None:
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


MODEL_FLAGS = ("vocab", "width", "layers", "heads", "context", "steps", "lr")


def memory_rows(args: argparse.Namespace, batches: list[int]) -> list[dict[str, Any]]:
    """:func:`measure_step` for both heads at each batch size, each in a fresh process.

    Peak resident memory during the step minus the resident memory before it (inputs, optimizer
    state, runtime and compiled code already there; Linux ``VmHWM``), and XLA's own count of the
    step's temporary buffers (``memory_analysis``, on every backend).
    """
    jobs = []
    for batch in batches:
        for head in ("fused", "materialised"):
            flags = [f"--{k}={getattr(args, k)}" for k in MODEL_FLAGS]
            cmd = [sys.executable, "-m", "jxent._cli._demo_lm", "measure", head, str(batch), *flags]
            # All at once: each process's peak is its own, and the wait is the longest one's.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            jobs.append((head, batch, proc))
    rows = []
    for head, batch, proc in jobs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            rows.append({"head": head, "batch": batch, "error": err[-400:]})
            continue
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


# --- the demo ---------------------------------------------------------------------------------


class _Data(NamedTuple):
    """The demo's token streams and what the report says of them."""

    train: np.ndarray
    val: np.ndarray
    entropy: float  # unigram entropy of the validation tokens (nats)
    corpus: dict[str, Any]


def run(args: argparse.Namespace) -> int:
    """Runs ``jxent demo lm``; returns the exit code."""
    _base.require("tokenizers", "tqdm", *([] if args.no_plot else ["matplotlib"]))
    _check_flags(args)
    _base.output_folder(args.out)
    start = time.perf_counter()
    data = _load_data(args)
    params = _initial_model(args, data.train)
    history, speed, state = _train(args, data, params)
    record: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "corpus": data.corpus,
        "unigram_entropy": data.entropy,
        "history": history,
        "tokens_per_second": speed,
        "tokens_per_second_per_device": speed / args.devices,
    }
    if args.memory:
        record["step_time"] = _time_heads(args, *state)  # first, on a quiet machine
        record["step_memory"] = memory_rows(args, [args.batch, 4 * args.batch])
        _print_memory(record)
    record["seconds"] = time.perf_counter() - start
    _write(args, record)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """What the flags must satisfy together, checked before any work; sets ``args.devices``."""
    if args.width % args.heads:
        raise _base.CommandError(
            f"--width {args.width} does not split into --heads {args.heads} attention heads"
        )
    visible = jax.device_count()
    args.devices = visible if args.devices is None else args.devices
    if args.devices > visible:
        raise _base.CommandError(
            f"--devices {args.devices} but {visible} {jax.default_backend()} "
            f"device{'s are' if visible > 1 else ' is'} visible"
        )
    if args.batch % args.devices:
        raise _base.CommandError(
            f"--batch {args.batch} sequences do not split over --devices "
            f"{args.devices}: make the batch a multiple of the device count"
        )


def _load_data(args: argparse.Namespace) -> _Data:
    """The corpus split by path hash, the tokenizer (cached), the encoded streams."""
    root, files = corpus_files(args.corpus)
    train_files, val_files = split(root, files)
    train_texts, val_texts = read_texts(_hash_order(root, train_files)), read_texts(val_files)
    size = sum(len(t) for t in train_texts + val_texts) / 1e6
    print(f"corpus: {len(files)} files ({size:.1f} M characters) from {root}")
    print(f"        split by path hash: {len(train_files)} training, {len(val_files)} validation")
    tokenizer, cached = train_tokenizer(train_texts, args.vocab, Path(args.cache))
    how = "cached" if cached else "trained"
    print(f"tokenizer: byte-level BPE, {tokenizer.get_vocab_size()} tokens ({how})")
    # Training draws random windows from a prefix of the (hash-ordered) training files: about
    # three times the tokens a run consumes, so encoding stays a few seconds.
    needed = 3 * args.steps * args.batch * (args.context + 1) * 4  # ~4 characters a token
    train_stream = encode(tokenizer, _prefix(train_texts, needed))
    val_stream = encode(tokenizer, val_texts)
    if len(train_stream) <= args.context + 1:
        raise _base.CommandError(
            f"the training split holds {len(train_stream)} tokens, fewer than one "
            f"window of --context {args.context} + 1; use a larger --corpus or a shorter --context"
        )
    entropy = unigram_entropy(val_stream)
    print(
        f"tokens: {len(train_stream):,} training, {len(val_stream):,} validation; unigram "
        f"entropy of the validation tokens {entropy:.3f} nats (perplexity {math.exp(entropy):.0f})"
    )
    corpus = {"root": str(root), "train_files": len(train_files), "val_files": len(val_files)}
    corpus |= {"train_tokens": len(train_stream), "val_tokens": len(val_stream)}
    return _Data(train_stream, val_stream, entropy, corpus)


def _initial_model(args: argparse.Namespace, train_stream: np.ndarray) -> dict:
    """The transformer's parameters, its output bias at the training tokens' log frequencies."""
    params = init_model(
        jax.random.key(args.seed), args.vocab, args.width, args.layers, args.context
    )
    # Step 0 is then the unigram model of the training data, and training spends its budget on
    # what context adds.
    counts = np.bincount(train_stream, minlength=args.vocab)[: args.vocab] + 1.0
    params["bias"] = jnp.asarray(np.log(counts / counts.sum()), jnp.float32)
    count = sum(a.size for a in jax.tree.leaves(params))
    print(
        f"model: {args.layers} layers, width {args.width}, {args.heads} heads, context "
        f"{args.context}, {count / 1e6:.1f} M parameters; loss: jxent.linear_cross_entropy "
        f"(ignore_index=<pad>, z_loss={Z_LOSS:g})"
    )
    return params


def _train(args: argparse.Namespace, data: _Data, params: dict) -> tuple[list, float, tuple]:
    """The training loop: ``(history, tokens per second, (params, last batch))``."""
    from tqdm.auto import tqdm

    optimizer = optimizer_for(args)
    step = lm_step(optimizer, args.heads, "fused", _mesh(args))
    state = train.init_state(params, optimizer)
    hidden, _ = predictors(args.heads)
    rng = np.random.default_rng(args.seed)
    val_batches = _validation_batches(data.val, args)
    history: list[dict[str, float]] = []
    train_time = 0.0
    bar = tqdm(range(1, args.steps + 1), desc="training", leave=False, disable=not args.progress)
    for i in bar:
        starts = rng.integers(0, len(data.train) - args.context - 1, args.batch)
        batch = windows(data.train, starts, args.context)
        t0 = time.perf_counter()
        state, metrics = step(state, *_split(batch))
        loss = float(metrics["loss"])  # waits for the step
        train_time += time.perf_counter() - t0
        if i % args.eval_every == 0 or i == args.steps or i == 1:
            scores = [
                train.evaluate(hidden, state.params, *_split(b), head=OUTPUT_HEAD, **LOSS_OPTIONS)
                for b in val_batches
            ]
            val = float(np.mean([s["loss"] for s in scores]))
            record = {"step": i, "train_loss": loss, "val_loss": val}
            history.append(record | {"val_perplexity": math.exp(val), "seconds": train_time})
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}")
    bar.close()
    speed = _report_training(args, history, train_time, data.entropy)
    return history, speed, (state.params, jnp.asarray(batch))


def _report_training(
    args: argparse.Namespace, history: list, train_time: float, entropy: float
) -> float:
    """Prints the speed and the validation loss; returns tokens per second (all devices)."""
    tokens_per_step = args.batch * args.context
    first = history[0]["seconds"]  # the first step includes compilation
    steady = (train_time - first) / (args.steps - 1) if args.steps > 1 else first
    final = history[-1]
    speed = tokens_per_step / steady
    print(
        f"trained {args.steps} steps of {tokens_per_step} tokens in {train_time:.1f} s (first step "
        f"{first:.1f} s with compilation, then {speed:,.0f} tokens/s, "
        f"{speed / args.devices:,.0f} per device on {args.devices} {jax.default_backend()} "
        f"device{'s' if args.devices > 1 else ''})"
    )
    print(
        f"validation loss {history[0]['val_loss']:.3f} -> {final['val_loss']:.3f} nats "
        f"(perplexity {final['val_perplexity']:.0f}); unigram entropy {entropy:.3f}: "
        + ("below it" if final["val_loss"] < entropy else "NOT below it")
    )
    return speed


def _write(args: argparse.Namespace, record: dict[str, Any]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(record, indent=2))
    written = [out / "history.json"]
    if not args.no_plot:
        _plot(record, out / "training.png")
        written.append(out / "training.png")
    print(f"written: {', '.join(map(str, written))} ({record['seconds']:.0f} s in all)")


def _mesh(args: argparse.Namespace) -> Any:
    """Data parallel over ``--devices`` (all visible ones by default), or None on one device.

    A ``jax.make_mesh`` mesh (Explicit axes) with a ``"data"`` axis: the step shards each batch
    over it and replicates the parameters and optimizer state (``args.devices``, checked by
    :func:`_check_flags`).
    """
    if args.devices == 1:
        return None
    print(f"data parallel: batches sharded over {args.devices} {jax.default_backend()} devices")
    return jax.make_mesh((args.devices,), ("data",), devices=jax.devices()[: args.devices])


def _validation_batches(stream: np.ndarray, args: argparse.Namespace) -> list[np.ndarray]:
    """Non-overlapping windows of the validation stream, at most ``eval_batches`` batches."""
    per = args.context + 1
    count = min(len(stream) // per, args.batch * args.eval_batches)
    if count == 0:
        raise _base.CommandError("the validation split is shorter than one context")
    rows = stream[: count * per].reshape(count, per)
    return [rows[i : i + args.batch] for i in range(0, count, args.batch)]


def _time_heads(args: argparse.Namespace, params: dict, batch: jax.Array) -> dict[str, float]:
    """Median seconds per training step of each head, 3 interleaved rounds in this process."""
    optimizer = optimizer_for(args)
    inputs, targets = _split(batch)
    runs = {}
    for head in ("fused", "materialised"):
        state = train.init_state(params, optimizer)
        compiled = _compiled(lm_step(optimizer, args.heads, head), state, inputs, targets)
        runs[head] = (compiled, state)
        jax.block_until_ready(compiled(state, inputs, targets))
    times: dict[str, list[float]] = {h: [] for h in runs}
    for _ in range(3):
        for head, (compiled, state) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(state, inputs, targets))
            times[head].append(time.perf_counter() - t0)
    return {h: statistics.median(t) for h, t in times.items()}


def _print_memory(record: dict[str, Any]) -> None:
    print("\none training step, each in its own process (peak resident memory above the start):")
    by = {(r["head"], r["batch"]): r for r in record["step_memory"]}
    for batch in sorted({b for _, b in by}):
        fused, mat = by[("fused", batch)], by[("materialised", batch)]
        if "error" in fused or "error" in mat:
            print(
                f"  batch {batch}: a measurement failed: {fused.get('error') or mat.get('error')}"
            )
            continue
        line = f"  batch {batch:3d} ({fused['tokens']} tokens): fused head "
        if fused["peak_above_start_mib"] is not None:
            line += (
                f"{fused['peak_above_start_mib']:.0f} MiB, materialised logits "
                f"{mat['peak_above_start_mib']:.0f} MiB "
                f"({fused['peak_above_start_mib'] / mat['peak_above_start_mib']:.2f}x); "
            )
        line += f"XLA temporaries {fused['xla_temp_mib']:.0f} vs {mat['xla_temp_mib']:.0f} MiB"
        print(line)
    t = record["step_time"]
    print(
        f"time per step at batch {record['config']['batch']}: fused {1e3 * t['fused']:.0f} ms, "
        f"materialised {1e3 * t['materialised']:.0f} ms ({t['fused'] / t['materialised']:.2f}x)"
    )


def _plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = record["history"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    steps = [r["step"] for r in h]
    ax.plot(steps, [r["train_loss"] for r in h], "o-", label="training batch")
    ax.plot(steps, [r["val_loss"] for r in h], "o-", label="validation")
    ax.axhline(record["unigram_entropy"], color="k", ls="--", lw=1, label="unigram entropy (val)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="jxent demo lm")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``jxent demo lm``."""
    _positive = _base.positive
    parser.add_argument("--corpus", help="a folder of text files (default: Python's stdlib *.py)")
    parser.add_argument(
        "--vocab", type=_vocab_size, default=32768, help="BPE vocabulary, >= 258 (32768)"
    )
    parser.add_argument("--width", type=_positive, default=128, help="model width (128)")
    parser.add_argument("--layers", type=_positive, default=2, help="transformer blocks (2)")
    parser.add_argument("--heads", type=_positive, default=4, help="attention heads (4)")
    parser.add_argument("--context", type=_positive, default=128, help="context length (128)")
    parser.add_argument("--batch", type=_positive, default=16, help="sequences per step (16)")
    parser.add_argument("--steps", type=_positive, default=80, help="training steps (80)")
    parser.add_argument(
        "--lr", type=_base.positive_float, default=1e-2, help="peak AdamW learning rate (1e-2)"
    )
    parser.add_argument("--eval-every", type=_positive, default=20, help="steps between evals (20)")
    parser.add_argument("--eval-batches", type=_positive, default=8, help="validation batches (8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and batches")
    parser.add_argument(
        "--devices",
        type=_positive,
        default=None,
        help="train data parallel over the first N devices (default: every visible device)",
    )
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "jxent"),
        help="tokenizer cache folder (~/.cache/jxent)",
    )
    parser.add_argument("--out", default="jxent-demo-lm", help="output folder (jxent-demo-lm)")
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the fused-vs-materialised memory and time comparison",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )


def _vocab_size(text: str) -> int:
    value = int(text)
    if value < 256 + len(SPECIALS):
        raise argparse.ArgumentTypeError(
            f"a byte-level BPE has 256 byte tokens and {len(SPECIALS)} special ones: the "
            f"vocabulary must be at least {256 + len(SPECIALS)}, found {value}"
        )
    return value


def _measure_main(argv: list[str]) -> None:
    """``python -m jxent._cli._demo_lm measure HEAD BATCH --vocab=... ...``: one JSON line."""
    head, batch, *flags = argv
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(flags)
    print(json.dumps(measure_step(head, int(batch), args)))


if __name__ == "__main__":
    _measure_main(sys.argv[2:])
