"""Pallas kernels (interpret mode on CPU) against their jnp twins on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from larosa_jax.pallas import attention as da
from larosa_jax.pallas import gemv


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("k,ns", [(4096, (11008,)), (11008, (4096,)), (3584, (512, 512, 3584)), (576, (1536, 1536)),
                                  (1536, (640,)), (14336, (4096,))])
def test_gemv_kernel_matches_jnp(k, ns):
    key = jax.random.key(k + sum(ns))
    kx, *kws = jax.random.split(key, 1 + len(ns))
    x = jax.random.normal(kx, (1, k), jnp.float32).astype(jnp.bfloat16)
    ws = tuple((jax.random.normal(kw, (k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16) for kw, n in zip(kws, ns))
    assert gemv.supported(x, ws)
    parts = gemv.partials(x.reshape(-1), ws)
    for w, p in zip(ws, parts):
        assert p.shape[1] == w.shape[1] and bool(jnp.all(jnp.isfinite(p)))
        want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")[0]
        assert _rel(jnp.sum(p, axis=0), want) < 1e-5  # float32 accumulation of the same bf16 products


def test_gemv_dispatch_bias_and_fallback():
    kx, kw, kb = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (1, 1, 256), jnp.float32).astype(jnp.bfloat16)
    ws = (jax.random.normal(kw, (256, 384), jnp.float32).astype(jnp.bfloat16),) * 2
    bs = (jax.random.normal(kb, (384,), jnp.float32).astype(jnp.bfloat16), None)
    got = gemv.matvec(x, ws, bs, kernel=True)
    want = gemv.matvec_reference(x, ws, bs)
    for g, w in zip(got, want):
        assert g.shape == w.shape == (1, 1, 384) and g.dtype == jnp.bfloat16
        assert _rel(g, w) < 1e-2
    # shapes the kernel cannot tile, batch > 1 and float32 take the jnp twin
    assert not gemv.supported(jnp.zeros((1, 100), jnp.bfloat16), (jnp.zeros((100, 128), jnp.bfloat16),))
    assert not gemv.supported(jnp.zeros((1, 256), jnp.bfloat16), (jnp.zeros((256, 200), jnp.bfloat16),))
    assert not gemv.supported(jnp.zeros((2, 256), jnp.bfloat16), (jnp.zeros((256, 128), jnp.bfloat16),))
    assert not gemv.supported(jnp.zeros((1, 256), jnp.float32), (jnp.zeros((256, 128), jnp.float32),))


@pytest.mark.parametrize("b,hq,hkv,hd,s", [(1, 32, 32, 128, 128), (2, 8, 2, 64, 192), (3, 28, 4, 128, 256)])
def test_decode_attention_kernel_matches_jnp(b, hq, hkv, hd, s):
    rng = np.random.default_rng(b * 1000 + hq)
    q = jnp.asarray(rng.standard_normal((b, 1, hq, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, hd)), jnp.float32)
    q_slot = jnp.asarray(s - 37, jnp.int32)  # not a block boundary; later slots must stay unread
    start = jnp.asarray(rng.integers(0, 70, b), jnp.int32)  # left padding, crossing a block edge
    want = da.decode_attention_reference(q, k, v, q_slot, start)
    got = da.decode_attention_kernel(q, k, v, q_slot, start)
    assert _rel(got, want) < 1e-5
    # bf16 (the dtype the dispatch sends to the kernel): matrix-unit rounding only
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    assert da.supported(qb, kb)
    assert _rel(da.decode_attention_kernel(qb, kb, vb, q_slot, start), want) < 2e-2
    # poisoned slots after q_slot and before start must not leak in
    kp = k.at[:, int(q_slot) + 1 :].set(1e4).at[0, : int(start[0])].set(-1e4)
    assert _rel(da.decode_attention_kernel(q, kp, v, q_slot, start), want) < 1e-5


def _rope_tables(rng, b, hd):
    pos = jnp.asarray(rng.integers(0, 300, (b, 1)), jnp.float32)
    freqs = pos[..., None] * (10000.0 ** (-np.arange(0, hd, 2) / hd))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@pytest.mark.parametrize("buffer", [False, True])
@pytest.mark.parametrize("b,hq,hkv,hd,s,write", [(1, 32, 32, 128, 128, 70), (3, 28, 4, 128, 128, 64),
                                                 (2, 9, 3, 64, 64, 5), (4, 8, 2, 64, 192, 191)])
def test_decode_step_kernel_matches_jnp(b, hq, hkv, hd, s, write, buffer):
    """RoPE + cache write + attention in one launch: the cache rows match bit for bit (one row written,
    the rest untouched), the attention output to bf16 rounding; the stale cache row is never read.
    ``buffer``: q/k/v arrive as one unrounded float32 buffer (the fused model's GEMV accumulator),
    which must act exactly like its three slices rounded to bf16."""
    rng = np.random.default_rng(b * 100 + hq)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    cache_k, cache_v = f(b, s, hkv, hd), f(b, s, hkv, hd)
    cos, sin = _rope_tables(rng, b, hd)
    write = jnp.asarray(write, jnp.int32)
    start = jnp.asarray(rng.integers(0, int(write), b), jnp.int32)
    if buffer:
        qkv = jnp.asarray(rng.standard_normal((b, 1, (hq + 2 * hkv) * hd)), jnp.float32)
        q, k, v = da.split_qkv(qkv, hkv, hd, jnp.bfloat16)
        assert q.shape == (b, 1, hq * hd) and v.shape == (b, 1, hkv * hd) and q.dtype == jnp.bfloat16
        assert bool(jnp.all(v.astype(jnp.float32) == qkv[..., (hq + hkv) * hd:].astype(jnp.bfloat16)))
    else:
        q, k, v = f(b, 1, hq * hd), f(b, 1, hkv * hd), f(b, 1, hkv * hd)
        qkv = (q, k, v)
    assert da.step_supported(qkv, cache_k, cache_v)
    want = da.decode_step_reference((q, k, v), cos, sin, cache_k, cache_v, write, start)
    if buffer:  # the twin takes the buffer the same way
        for g, w in zip(da.decode_step_reference(qkv, cos, sin, cache_k, cache_v, write, start), want):
            assert bool(jnp.all(g == w))
    poisoned = (cache_k.at[:, int(write)].set(1e4), cache_v.at[:, int(write)].set(-1e4))
    got = jax.jit(da.decode_step_kernel)(qkv, cos, sin, *poisoned, write, start)
    assert got[0].shape == want[0].shape == (b, 1, hq * hd) and got[0].dtype == jnp.bfloat16
    assert _rel(got[0], want[0]) < 1e-2
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype and bool(jnp.all(g == w))
    # what it cannot take goes to the twin
    assert not da.step_supported((q.astype(jnp.float32), k, v), cache_k, cache_v)
    assert not da.step_supported(qkv, cache_k[:, :-1], cache_v[:, :-1])
    if buffer:  # a buffer for a float32 model: the kernel would round it to the bf16 cache's dtype
        assert not da.step_supported(qkv, cache_k, cache_v, jnp.float32)


def test_decode_with_the_attention_kernels_matches_the_jnp_path():
    """A bf16 dense model (head_dim 64, GQA): prefill + decode steps with the decode-step kernel give the
    jnp path's logits and cache. Dense, so bf16 rounding is not amplified by Top-K flips."""
    from larosa_jax.config import ModelConfig
    from larosa_jax.models import init_cache
    from larosa_jax.models.random_init import random_model
    from larosa_jax.plan import DecodePlan

    cfg = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6})
    model = random_model(cfg, jnp.bfloat16, seed=5)
    model.plan = DecodePlan.reference()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9)), jnp.int32)

    def run():
        cache = init_cache(cfg, 2, 64, jnp.bfloat16, start=jnp.asarray([0, 2], jnp.int32))
        logits, cache = model(tokens[:, :6], cache)
        out = [logits[:, -1]]
        for i in range(6, 9):
            logits, cache = model(tokens[:, i : i + 1], cache)
            out.append(logits[:, -1])
        return np.stack([np.asarray(o, np.float32) for o in out]), cache

    want, want_cache = run()
    model.plan = DecodePlan.reference().edit("attention=on")
    got, got_cache = run()
    assert _rel(got, want) < 2e-2
    for g, w in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
        assert _rel(g, w) < 1e-2
