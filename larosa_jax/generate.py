"""Batched generation: one jit for prefill, one for the decode loop (``lax.while_loop``).

Prompts of different lengths are left-padded; each row's positions start at its first real
token (``KVCache.start``). The cache is an explicit pytree donated between calls, so decode
updates it in place. Sampling: greedy (temperature 0) or temperature + top-p with a seed;
each row stops at its own EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import KVCache, init_cache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def sample(logits: Array, key: Array, cfg: SamplingConfig) -> Array:
    """Next token ids ``[B]`` from float32 logits ``[B, V]``."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (jnp.cumsum(probs, axis=-1) - probs) >= cfg.top_p
        sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class DecodeState:
    """Loop carry of the decode ``while_loop`` (a pytree)."""

    cache: KVCache
    logits: Array  # [B, V] logits for the next token
    tokens: Array  # [B, N] generated ids (pad after EOS)
    step: Array  # int32: tokens written so far
    done: Array  # [B] bool
    key: Array


jax.tree_util.register_dataclass(DecodeState)


def _forward(graphdef, state, tokens, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, state, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Run the (left-padded) prompts through the model, filling the cache; last-position logits."""
    return _forward(graphdef, state, tokens, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "steps"), donate_argnames=("ds",))
def decode(graphdef, state, ds: DecodeState, eos: Array, pad_id: Array, *, sampling: SamplingConfig, steps: int) -> DecodeState:
    """Up to ``steps`` tokens per row in one on-device loop; stops early once every row is done."""
    n = ds.tokens.shape[1]
    limit = jnp.minimum(ds.step + steps, n)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        key, sub = jax.random.split(s.key)
        nxt = sample(s.logits, sub, sampling)
        nxt = jnp.where(s.done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step))
        done = s.done | jnp.isin(nxt, eos)
        # the model call for the token after the last one is wasted work; skipping it would need a
        # cond inside the loop, which costs more than it saves at batch 1
        logits, cache = _forward(graphdef, state, nxt[:, None], s.cache)
        return DecodeState(cache, logits, tokens, s.step + 1, done, key)

    return jax.lax.while_loop(cond, body, ds)


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    model,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    *,
    tokenizer=None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
    chunk: int = 16,
    cache_dtype=None,
    timings: dict | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns each row's new ids (EOS included, pad dropped).

    ``prompts`` are token id lists, or strings with ``tokenizer``. With ``on_tokens`` the loop
    returns to the host every ``chunk`` tokens and passes the ids so far (for streaming). A
    ``timings`` dict is filled with the wall seconds of the prefill and of the decode loop (compiles
    included) and the token counts of each.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    cfg = model.config
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need tokenizer=...")
        prompts = [tokenizer(p)["input_ids"] for p in prompts]
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab - 1}]")
    for what, ids in (("eos_token_ids", eos_token_ids), ("pad_token_id", None if pad_token_id is None else [pad_token_id])):
        bad = next((int(t) for t in (ids or []) if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab - 1}]")
    eos = list(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids) or [-1]
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos[0] if eos[0] >= 0 else 0)
    sampling = SamplingConfig(temperature, top_p)

    b = len(prompts)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:  # the real lengths: padding takes no position
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings="
            f"{cfg.max_position_embeddings}"
        )
    t = _bucket(longest, 8)  # bucketed shapes: fewer recompiles
    max_len = _bucket(t + max_new_tokens, 64)
    tokens = np.full((b, t), pad, np.int32)
    start = np.zeros((b,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        start[i] = t - len(p)

    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    cache = init_cache(cfg, b, max_len, cache_dtype or model.dtype, start=jnp.asarray(start))
    logits, cache = prefill(graphdef, state, jnp.asarray(tokens), cache)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    ds = DecodeState(
        cache=cache, logits=logits, tokens=jnp.full((b, max_new_tokens), pad, jnp.int32),
        step=jnp.zeros((), jnp.int32), done=jnp.zeros((b,), bool), key=jax.random.key(seed),
    )
    eos_arr, pad_arr = jnp.asarray(eos, jnp.int32), jnp.asarray(pad, jnp.int32)
    steps = chunk if on_tokens is not None else max_new_tokens
    while True:
        ds = decode(graphdef, state, ds, eos_arr, pad_arr, sampling=sampling, steps=steps)
        n, all_done = int(ds.step), bool(jnp.all(ds.done))
        if on_tokens is not None:
            on_tokens(np.asarray(ds.tokens[:, :n]))
        if n >= max_new_tokens or all_done:
            break
    out = np.asarray(ds.tokens[:, :n])
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, prompt_tokens=sum(map(len, prompts)),
                       new_tokens=b * n)
    result = []
    for row in out:
        ids = []
        for tok in row.tolist():
            ids.append(tok)
            if tok in eos:
                break
        result.append(ids)
    return result
