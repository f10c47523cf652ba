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


def test_gemv_dispatch_bias_and_fallback(monkeypatch):
    monkeypatch.setenv("LAROSA_PALLAS_INTERPRET", "1")
    kx, kw, kb = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (1, 1, 256), jnp.float32).astype(jnp.bfloat16)
    ws = (jax.random.normal(kw, (256, 384), jnp.float32).astype(jnp.bfloat16),) * 2
    bs = (jax.random.normal(kb, (384,), jnp.float32).astype(jnp.bfloat16), None)
    got = gemv.matvec(x, ws, bs)
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
