"""Decode attention: one query per row against the KV cache (flash-decoding split over slots).

Program (b, h, c) takes the query heads of KV head h of row b against cache slots
[c·BS, (c+1)·BS); blocks with no visible slot write neutral partials without reading the cache;
XLA combines the per-block (max, sum, output) in float32. The jnp twin is a multiply + reduce
that reads the cache in its ``[B, S, H_kv, hd]`` layout (a batched dot makes XLA transpose the
whole cache every step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import MASK_VALUE, acc_dtype, enabled, interpret, triton_params

Array = jax.Array

BS, GP = 64, 16  # cache slots per program; query rows padded to 16 for the matrix unit


def supported(q: Array, k: Array) -> bool:
    b, t, hq, hd = q.shape
    return (t == 1 and q.dtype == jnp.bfloat16 and k.dtype == jnp.bfloat16
            and k.shape[1] % BS == 0 and hd in (64, 128, 256) and hq // k.shape[2] <= GP)


def _kernel(bounds_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, scale):
    """Program (b, h, c): query heads of KV head h against slots [c*BS, (c+1)*BS) of row b."""
    c = pl.program_id(2)
    lo, hi = bounds_ref[0], bounds_ref[1]  # visible slots: lo <= slot <= hi
    s0 = c * BS

    @pl.when((s0 <= hi) & (s0 + BS > lo))
    def _():
        q = q_ref[...]  # [GP, hd]
        kk = k_ref[...]  # [BS, hd]
        s = jax.lax.dot_general(q, kk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        slot = s0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where((slot >= lo) & (slot <= hi), s, MASK_VALUE)
        m = jnp.max(s, axis=1)
        p = jnp.exp(s - m[:, None])
        m_ref[...] = m
        l_ref[...] = jnp.sum(p, axis=1)
        o_ref[...] = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    @pl.when((s0 > hi) | (s0 + BS <= lo))
    def _():  # nothing visible in this block: neutral partials, no cache read
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)


def decode_attention_kernel(q: Array, k: Array, v: Array, q_slot: Array, start: Array) -> Array:
    """Split-S (flash-decoding) attention for one query per row; combine in float32."""
    b, _, hq, hd = q.shape
    s_max, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    nc = s_max // BS
    qp = jnp.pad(q.reshape(b, hkv, g, hd), ((0, 0), (0, 0), (0, GP - g), (0, 0)))
    bounds = jnp.stack([start.astype(jnp.int32), jnp.broadcast_to(q_slot.astype(jnp.int32), (b,))], axis=1)
    m, l, o = pl.pallas_call(
        functools.partial(_kernel, scale=hd**-0.5),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, nc, GP), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, nc, GP), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, nc, GP, hd), jnp.float32)],
        grid=(b, hkv, nc),
        in_specs=[pl.BlockSpec((None, 2), lambda i, h, c: (i, 0)),
                  pl.BlockSpec((None, None, GP, hd), lambda i, h, c: (i, h, 0, 0)),
                  pl.BlockSpec((None, BS, None, hd), lambda i, h, c: (i, c, h, 0)),
                  pl.BlockSpec((None, BS, None, hd), lambda i, h, c: (i, c, h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, GP), lambda i, h, c: (i, h, c, 0)),
                   pl.BlockSpec((None, None, None, GP), lambda i, h, c: (i, h, c, 0)),
                   pl.BlockSpec((None, None, None, GP, hd), lambda i, h, c: (i, h, c, 0, 0))],
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=interpret(),
    )(bounds, qp, k, v)
    m, l, o = m[..., :g], l[..., :g], o[..., :g, :]
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, Hkv, C, G]
    out = jnp.sum(w[..., None] * o, axis=2) / jnp.sum(w * l, axis=2)[..., None]
    return out.reshape(b, 1, hq * hd).astype(q.dtype)


def decode_attention_reference(q: Array, k: Array, v: Array, q_slot: Array, start: Array) -> Array:
    """The jnp twin. q ``[B,1,Hq,hd]``, cache k/v ``[B,S,Hkv,hd]``; slot j is visible when
    ``start[b] <= j <= q_slot``."""
    b, _, hq, hd = q.shape
    hkv = k.shape[2]
    ct = acc_dtype(q.dtype)
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    visible = (slots[None, :] <= q_slot) & (slots[None, :] >= start[:, None])  # [B, S]
    qg = q.reshape(b, 1, hkv, hq // hkv, hd).astype(ct)
    s = jnp.sum(qg * k.astype(ct)[:, :, :, None, :], axis=-1) * (hd**-0.5)  # [B, S, Hkv, G]
    s = jnp.where(visible[:, :, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=1).astype(v.dtype)
    o = jnp.sum(p.astype(ct)[..., None] * v.astype(ct)[:, :, :, None, :], axis=1)  # [B, Hkv, G, hd]
    return o.reshape(b, 1, hq * hd).astype(q.dtype)


def decode_attention(q: Array, k: Array, v: Array, q_slot: Array, start: Array) -> Array:
    """Single-query attention over the cache: the kernel for bf16 on GPU, the jnp twin otherwise."""
    if enabled("attn") and supported(q, k):
        return decode_attention_kernel(q, k, v, q_slot, start)
    return decode_attention_reference(q, k, v, q_slot, start)
