"""Generation: batching with left padding, KV-cache decode vs full forward, sampling, EOS."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import larosa_jax
from larosa_jax.models import init_cache

from conftest import apply, assert_logits_close, forward


# ----------------------------------------------------------------------------- batching
def test_batch_equals_each_prompt_alone(stories_model, stories_prompts, stories_greedy):
    """Prompts of different lengths, left-padded in one batch, give each prompt's solo tokens."""
    prompts = stories_prompts[:3]
    assert len({len(p) for p in prompts}) == 3
    batch = larosa_jax.generate(stories_model, prompts, max_new_tokens=64)
    assert batch == stories_greedy[:3]
    # and in another order / batch size (different padding for every row)
    order = [3, 0, 2, 1]
    batch = larosa_jax.generate(stories_model, [stories_prompts[i] for i in order], max_new_tokens=64)
    assert batch == [stories_greedy[i] for i in order]


def test_streaming_chunks_equal_one_shot(stories_model, stories_prompts, stories_greedy):
    seen = []
    out = larosa_jax.generate(stories_model, stories_prompts, max_new_tokens=64, on_tokens=seen.append, chunk=10)
    assert out == stories_greedy
    assert [s.shape[1] for s in seen] == [10, 20, 30, 40, 50, 60, 64]
    np.testing.assert_array_equal(seen[-1][0], stories_greedy[0][:64])


def test_string_prompts_with_tokenizer(stories_model, stories_tokenizer, stories_greedy):
    from conftest import STORIES_PROMPTS

    out = larosa_jax.generate(stories_model, STORIES_PROMPTS[:1], tokenizer=stories_tokenizer, max_new_tokens=64)
    assert out == stories_greedy[:1]


# ----------------------------------------------------------------------------- KV cache
def decode_logits(model, tokens: np.ndarray, start: np.ndarray, prefill: int) -> np.ndarray:
    """Logits [B, T, V] from a cache: ``prefill`` tokens in one call, then one token per call."""
    b, t = tokens.shape
    cache = init_cache(model.config, b, t + 13, jnp.float32, start=jnp.asarray(start))
    outs = []
    if prefill:
        logits, cache = apply(model, tokens[:, :prefill], cache)
        outs.append(np.asarray(logits))
    for s in range(prefill, t):
        logits, cache = apply(model, tokens[:, s : s + 1], cache)
        outs.append(np.asarray(logits))
    assert int(cache.pos) == t
    return np.concatenate(outs, axis=1)


def _model_and_tokens(which, stories_model, random_model, length):
    rng = np.random.default_rng(7)
    if which == "stories":
        model = stories_model
    else:
        model = random_model(which).model
    tokens = rng.integers(3, model.config.vocab_size, (3, length)).astype(np.int32)
    return model, tokens


@pytest.mark.parametrize("which,length", [("stories", 24), ("llama3_gqa", 72), ("qwen2_tied", 24)])
def test_cache_decode_equals_full_forward(which, length, stories_model, random_model):
    """Token-by-token and prefill-half-then-step logits equal full-forward logits at every
    position, for an unpadded row and two left-padded rows (compared with the unpadded sequence)."""
    model, tokens = _model_and_tokens(which, stories_model, random_model, length)
    start = np.array([0, 5, 11], np.int32)
    padded = tokens.copy()
    unpadded = np.zeros_like(tokens)  # row b: its real tokens from position 0, right-padded
    for b, s in enumerate(start):
        padded[b, :s] = 1 + b  # arbitrary pad ids: they must not matter
        unpadded[b, : length - s] = tokens[b, s:]
    # reference: each row's real tokens alone at positions 0.. (causal, so right padding is inert)
    ref = forward(model, unpadded)
    assert_logits_close(ref[0], forward(model, tokens[:1])[0])
    np.testing.assert_allclose(ref[2, : length - 11], forward(model, tokens[2:3, 11:])[0], rtol=0, atol=1e-4 * np.abs(ref).max())

    def check(got, what):
        for b, s in enumerate(start):
            assert_logits_close(got[b, s:], ref[b, : length - s], what=f"{which} row {b} (start {s}) {what}")

    for prefill in (0, length // 2):
        check(decode_logits(model, padded, start, prefill), f"cache, prefill {prefill}")
    full_padded = forward(model, padded, start=start)
    check(full_padded, "left-padded full forward")
    # the check has teeth: a wrong start offset (positions shifted) changes the logits
    shifted = forward(model, padded, start=np.zeros(3))
    assert np.abs(shifted[2, 11:] - full_padded[2, 11:]).max() > 1e-2 * np.abs(full_padded).max()


def test_cache_left_padding_masks_pad_keys(stories_model):
    """Changing the pad ids of a left-padded row changes none of its real logits."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 512, (2, 16)).astype(np.int32)
    other = tokens.copy()
    other[:, :6] = rng.integers(3, 512, (2, 6))
    start = np.array([6, 6], np.int32)
    a = decode_logits(stories_model, tokens, start, prefill=10)
    b = decode_logits(stories_model, other, start, prefill=10)
    np.testing.assert_array_equal(a[:, 6:], b[:, 6:])


# ----------------------------------------------------------------------------- sampling
def test_sampling_reproducible_per_seed(stories_model, stories_prompts, stories_greedy):
    kw = dict(max_new_tokens=32, temperature=1.0, top_p=0.9)
    a = larosa_jax.generate(stories_model, stories_prompts, seed=0, **kw)
    b = larosa_jax.generate(stories_model, stories_prompts, seed=0, **kw)
    c = larosa_jax.generate(stories_model, stories_prompts, seed=1, **kw)
    assert a == b
    assert a != c
    assert a != [g[:32] for g in stories_greedy]  # it does sample
    assert all(0 <= t < 512 for row in a + c for t in row)


def _last_logits(model, prompt):
    return forward(model, [prompt])[0, -1].astype(np.float64)


def _nucleus(logits, temperature, top_p) -> set[int]:
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    return set(order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1].tolist())


def test_top_p_keeps_only_the_nucleus(stories_model, stories_prompts):
    """Many rows sampling one token through generate: every sample lies in the top-p nucleus,
    and more than one nucleus token occurs; a tiny top_p is greedy."""
    prompt = stories_prompts[2]
    logits = _last_logits(stories_model, prompt)
    nucleus = _nucleus(logits, 0.7, 0.9)
    assert 2 <= len(nucleus) < 20, nucleus  # the test needs a non-trivial nucleus
    out = larosa_jax.generate(stories_model, [prompt] * 256, max_new_tokens=1, temperature=0.7, top_p=0.9, seed=5)
    got = {row[0] for row in out}
    assert got <= nucleus, got - nucleus
    assert len(got) >= 2
    out = larosa_jax.generate(stories_model, [prompt] * 8, max_new_tokens=1, temperature=0.7, top_p=1e-6, seed=5)
    assert [row[0] for row in out] == [int(np.argmax(logits))] * 8


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.6), (1.3, 0.8)])
def test_sampler_distribution(temperature, top_p, stories_model, stories_prompts):
    """larosa_jax.generate.sample on one row of real logits, repeated: empirical frequencies match
    softmax(logits / T) renormalised over the top-p nucleus."""
    from larosa_jax.generate import SamplingConfig, sample

    logits = _last_logits(stories_model, stories_prompts[1])
    n = 8192
    cfg = SamplingConfig(temperature, top_p)
    draw = jax.jit(lambda l, k: sample(l, k, cfg))
    got = np.asarray(draw(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.size)), jax.random.key(0)))
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    keep = np.zeros(p.size, bool)
    keep[list(_nucleus(logits, temperature, top_p))] = True
    assert keep.sum() >= 3
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    counts = np.bincount(got, minlength=p.size) / n
    assert counts[~keep].sum() == 0, np.flatnonzero(counts * ~keep)
    likely = np.flatnonzero(q > 0.03)
    assert likely.size >= 2
    sigma = np.sqrt(q[likely] * (1 - q[likely]) / n)
    np.testing.assert_array_less(np.abs(counts[likely] - q[likely]), 5 * sigma)


def test_sampling_rejects_bad_settings(stories_model, stories_prompts):
    with pytest.raises(ValueError, match="temperature"):
        larosa_jax.generate(stories_model, stories_prompts[:1], max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        larosa_jax.generate(stories_model, stories_prompts[:1], max_new_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        larosa_jax.generate(stories_model, stories_prompts[:1], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        larosa_jax.generate(stories_model, [[]], max_new_tokens=4)


# ----------------------------------------------------------------------------- EOS
def test_eos_stops_each_row_on_its_own(stories_model, stories_prompts):
    prompts = stories_prompts[:3]
    free = larosa_jax.generate(stories_model, prompts, max_new_tokens=64, eos_token_ids=[])
    assert all(len(r) == 64 for r in free)
    # an id that row 0 emits early and the other rows never emit
    others = set(free[1]) | set(free[2])
    idx, eos = next((i, t) for i, t in enumerate(free[0]) if i >= 2 and t not in others)
    assert idx < 40, (idx, free)
    out = larosa_jax.generate(stories_model, prompts, max_new_tokens=64, eos_token_ids=[eos])
    assert out[0] == free[0][: idx + 1]  # stops right after its EOS, EOS included
    assert out[1] == free[1] and out[2] == free[2]  # the others go on to max_new_tokens
    # the model's own EOS (</s> = 2) is the default
    assert stories_model.config.eos_token_ids == (2,)
    default = larosa_jax.generate(stories_model, prompts, max_new_tokens=64)
    for row_free, row in zip(free, default):
        cut = row_free.index(2) + 1 if 2 in row_free else 64
        assert row == row_free[:cut]
