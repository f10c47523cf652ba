"""Decode attention: one query per row against the KV cache (flash-decoding split over slots).

Program (b, h, c) takes the query heads of KV head h of row b against cache slots
[c·BS, (c+1)·BS); blocks with no visible slot write neutral partials without reading the cache;
XLA combines the per-block (max, sum, output) in float32. The jnp twin is a multiply + reduce
that reads the cache in its ``[B, S, H_kv, hd]`` layout (a batched dot makes XLA transpose the
whole cache every step).

``decode_step`` is the whole attention of one decode token: RoPE on the new q and k, the cache
write and attention in one launch. The program whose block holds the write slot puts the new key
and value in its tile and stores that one row into the cache, which the call updates in place
(aliased); the others only read. It replaces three small XLA fusions per layer (the q padding with
RoPE and the two cache updates). The sparse path hands it the q/k/v GEMV's float32 accumulator as
one buffer, read three times at head offsets and rounded on load, so no slice runs in between.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .common import MASK_VALUE, acc_dtype, interpret, triton_params

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
        _partials(s, v_ref[...], m_ref, l_ref, o_ref)

    @pl.when((s0 > hi) | (s0 + BS <= lo))
    def _():  # nothing visible in this block: neutral partials, no cache read
        _neutral(m_ref, l_ref, o_ref)


def _partials(s: Array, v: Array, m_ref, l_ref, o_ref) -> None:
    """A block's flash-decoding partials from its masked scores s ``[GP, BS]`` and values v ``[BS, hd]``."""
    m = jnp.max(s, axis=1)
    p = jnp.exp(s - m[:, None])
    m_ref[...] = m
    l_ref[...] = jnp.sum(p, axis=1)
    o_ref[...] = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _neutral(m_ref, l_ref, o_ref) -> None:
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)


def _partial_outputs(b: int, hkv: int, nc: int, hd: int):
    """Shapes and block specs of the per-block (max, sum, output) partials, program (b, h, c)'s own."""
    shapes = [jax.ShapeDtypeStruct((b, hkv, nc, GP), jnp.float32), jax.ShapeDtypeStruct((b, hkv, nc, GP), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, nc, GP, hd), jnp.float32)]
    specs = [pl.BlockSpec((None, None, None, GP), lambda i, h, c: (i, h, c, 0)),
             pl.BlockSpec((None, None, None, GP), lambda i, h, c: (i, h, c, 0)),
             pl.BlockSpec((None, None, None, GP, hd), lambda i, h, c: (i, h, c, 0, 0))]
    return shapes, specs


def decode_attention_kernel(q: Array, k: Array, v: Array, q_slot: Array, start: Array) -> Array:
    """Split-S (flash-decoding) attention for one query per row; combine in float32."""
    b, _, hq, hd = q.shape
    s_max, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    nc = s_max // BS
    qp = jnp.pad(q.reshape(b, hkv, g, hd), ((0, 0), (0, 0), (0, GP - g), (0, 0)))
    bounds = jnp.stack([start.astype(jnp.int32), jnp.broadcast_to(q_slot.astype(jnp.int32), (b,))], axis=1)
    shapes, specs = _partial_outputs(b, hkv, nc, hd)
    m, l, o = pl.pallas_call(
        functools.partial(_kernel, scale=hd**-0.5),
        out_shape=shapes,
        grid=(b, hkv, nc),
        in_specs=[pl.BlockSpec((None, 2), lambda i, h, c: (i, 0)),
                  pl.BlockSpec((None, None, GP, hd), lambda i, h, c: (i, h, 0, 0)),
                  pl.BlockSpec((None, BS, None, hd), lambda i, h, c: (i, c, h, 0)),
                  pl.BlockSpec((None, BS, None, hd), lambda i, h, c: (i, c, h, 0))],
        out_specs=specs,
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=interpret(),
    )(bounds, qp, k, v)
    return _combine(m, l, o, g, q.dtype)


def _combine(m: Array, l: Array, o: Array, g: int, dtype) -> Array:
    """Merge the per-block partials ``[B, Hkv, C, GP(, hd)]`` of the first g query rows: ``[B, 1, Hq·hd]``."""
    b, hkv, _, _, hd = o.shape
    m, l, o = m[..., :g], l[..., :g], o[..., :g, :]
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, Hkv, C, G]
    out = jnp.sum(w[..., None] * o, axis=2) / jnp.sum(w * l, axis=2)[..., None]
    return out.reshape(b, 1, hkv * g * hd).astype(dtype)


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


def decode_attention(q: Array, k: Array, v: Array, q_slot: Array, start: Array, *, kernel: bool = False) -> Array:
    """Single-query attention over the cache: the kernel for bf16 on GPU, the jnp twin otherwise."""
    if kernel and supported(q, k):
        return decode_attention_kernel(q, k, v, q_slot, start)
    return decode_attention_reference(q, k, v, q_slot, start)


# ----------------------------------------------------------------------------- RoPE + cache write + attention
def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x ``[B, T, H, hd]``; rotate-half as in transformers' apply_rotary_pos_emb, in float32."""
    xf = x.astype(acc_dtype(x.dtype))
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


def split_qkv(qkv, hkv: int, hd: int, dtype) -> tuple[Array, Array, Array]:
    """(q, k, v) from a projection's outputs: the tuple itself, or one buffer ``[..., (Hq + 2·Hkv)·hd]``
    (the q/k/v sparse GEMV's float32 accumulator, biases added) sliced and rounded to ``dtype``."""
    if isinstance(qkv, (tuple, list)):
        return tuple(qkv)
    kd = hkv * hd
    qd = qkv.shape[-1] - 2 * kd
    return tuple(qkv[..., a:b].astype(dtype) for a, b in ((0, qd), (qd, qd + kd), (qd + kd, qd + 2 * kd)))


def write_cache(cache_k: Array, cache_v: Array, k: Array, v: Array, write: Array) -> tuple[Array, Array]:
    """The cache with k, v ``[B, T, Hkv, hd]`` stored at slots ``write ...`` (cast to the cache's dtype)."""
    return (jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, write, 0, 0)),
            jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, write, 0, 0)))


def step_supported(qkv, cache_k: Array, cache_v: Array, dtype=None) -> bool:
    """Whether the kernel takes these operands; ``dtype``: what a buffer rounds to (default the cache's).
    The kernel rounds to the cache's dtype, so both must be bf16."""
    hkv, hd = cache_k.shape[2], cache_k.shape[3]
    dtype = cache_k.dtype if dtype is None else dtype
    if isinstance(qkv, (tuple, list)):
        q, k, v = qkv
        ok = (all(a.dtype == jnp.bfloat16 for a in qkv) and k.shape[-1] == v.shape[-1] == hkv * hd
              and q.shape[1] == 1)
        qd = q.shape[-1]
    else:
        ok = (qkv.dtype in (jnp.float32, jnp.bfloat16) and dtype == jnp.bfloat16 and qkv.ndim == 3
              and qkv.shape[:2] == (cache_k.shape[0], 1))
        qd = qkv.shape[-1] - 2 * hkv * hd
    return (ok and cache_k.dtype == cache_v.dtype == jnp.bfloat16 and cache_k.shape[1] % BS == 0
            and hd in (64, 128, 256) and qd > 0 and qd % (hkv * hd) == 0 and qd // (hkv * hd) <= GP)


def _rope(x1, x2, c, s):
    """Both halves of rotate-half RoPE in float32 (cos and sin repeat over the two halves)."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


def _step_kernel(bounds_ref, q_ref, kn_ref, vn_ref, cos_ref, sin_ref, k_ref, v_ref, m_ref, l_ref, o_ref, ko_ref, vo_ref,
                 *, g, hq, scale):
    """Program (b, h, c). q_ref ``[Hq, hd]`` (this row's q heads), kn/vn ``[hd]`` (new key/value
    of head h), cos/sin ``[hd/2]``, cache tiles k/v ``[BS, hd]`` and their aliased outputs ko/vo.
    q/k/v are rounded to the cache's dtype first (a no-op for bf16 projections; a float32 GEMV
    accumulator rounds as the model's own cast would)."""
    hkv_i, c = pl.program_id(1), pl.program_id(2)  # (read here: interpret mode cannot inside pl.when)
    hd = q_ref.shape[1]
    dt = k_ref.dtype
    half = hd // 2
    lo, write = bounds_ref[0], bounds_ref[1]  # visible slots: lo <= slot <= write (the new token's)
    s0 = c * BS
    cs, sn = cos_ref[...], sin_ref[...]
    lo_h, hi_h = pl.ds(0, half), pl.ds(half, half)
    k1, k2 = _rope(kn_ref[lo_h].astype(dt), kn_ref[hi_h].astype(dt), cs, sn)
    k1, k2 = k1.astype(dt), k2.astype(dt)
    vn = vn_ref[...].astype(dt)
    here = (write >= s0) & (write < s0 + BS)  # this block holds the write slot

    @pl.when(here)
    def _():  # the cache write: one row of this tile
        row = (jax.lax.broadcasted_iota(jnp.int32, (BS, half), 0) == write - s0)
        pltriton.store(ko_ref.at[:, lo_h], jnp.broadcast_to(k1[None], (BS, half)), mask=row)
        pltriton.store(ko_ref.at[:, hi_h], jnp.broadcast_to(k2[None], (BS, half)), mask=row)
        rowv = (jax.lax.broadcasted_iota(jnp.int32, (BS, hd), 0) == write - s0)
        pltriton.store(vo_ref, jnp.broadcast_to(vn[None], (BS, hd)), mask=rowv)

    @pl.when((s0 <= write) & (s0 + BS > lo))
    def _():
        # the g query heads of KV head h, padded to GP rows by the load mask (clamped indices stay in bounds)
        r = jax.lax.broadcasted_iota(jnp.int32, (GP, 1), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (1, half), 1)
        qrow = jnp.minimum(hkv_i * g + r, hq - 1)
        qmask = jnp.broadcast_to(r < g, (GP, half))
        q1 = pltriton.load(q_ref.at[qrow, col], mask=qmask, other=0.0).astype(dt)
        q2 = pltriton.load(q_ref.at[qrow, col + half], mask=qmask, other=0.0).astype(dt)
        q1, q2 = _rope(q1, q2, cs[None], sn[None])
        q1, q2 = q1.astype(dt), q2.astype(dt)
        slot_h = s0 + jax.lax.broadcasted_iota(jnp.int32, (BS, half), 0)
        kk1 = jnp.where(slot_h == write, k1[None], k_ref[:, lo_h])  # the new key, whatever the cache held
        kk2 = jnp.where(slot_h == write, k2[None], k_ref[:, hi_h])
        dims = (((1,), (1,)), ((), ()))
        s = (jax.lax.dot_general(q1, kk1, dims, preferred_element_type=jnp.float32)
             + jax.lax.dot_general(q2, kk2, dims, preferred_element_type=jnp.float32)) * scale
        slot = s0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where((slot >= lo) & (slot <= write), s, MASK_VALUE)
        slot_v = s0 + jax.lax.broadcasted_iota(jnp.int32, (BS, hd), 0)
        _partials(s, jnp.where(slot_v == write, vn[None], v_ref[...]), m_ref, l_ref, o_ref)

    @pl.when((s0 > write) | (s0 + BS <= lo))
    def _():  # nothing visible in this block: neutral partials, no cache read
        _neutral(m_ref, l_ref, o_ref)


def decode_step_kernel(qkv, cos, sin, cache_k, cache_v, write, start):
    """RoPE, cache write and split-S attention of one token per row in one launch (see decode_step)."""
    b = cache_k.shape[0]
    s_max, hkv, hd = cache_k.shape[1:]
    if isinstance(qkv, (tuple, list)):
        q, k, v = qkv
        hq = q.shape[-1] // hd
        operands, k_head, v_head = (q.reshape(b, hq, hd), k.reshape(b, hkv, hd), v.reshape(b, hkv, hd)), 0, 0
    else:  # one buffer: q, k and v are its head rows [0, Hq), [Hq, Hq + Hkv), [Hq + Hkv, Hq + 2·Hkv)
        hq = qkv.shape[-1] // hd - 2 * hkv
        buf = qkv.reshape(b, hq + 2 * hkv, hd)
        operands, k_head, v_head = (buf, buf, buf), hq, hq + hkv
    g, nc, half = hq // hkv, s_max // BS, hd // 2
    bounds = jnp.stack([start.astype(jnp.int32), jnp.broadcast_to(write.astype(jnp.int32), (b,))], axis=1)
    cache_spec = pl.BlockSpec((None, BS, None, hd), lambda i, h, c: (i, c, h, 0))
    shapes, specs = _partial_outputs(b, hkv, nc, hd)
    m, l, o, keys, vals = pl.pallas_call(
        functools.partial(_step_kernel, g=g, hq=hq, scale=hd**-0.5),
        out_shape=[*shapes,
                   jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                   jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)],
        grid=(b, hkv, nc),
        in_specs=[pl.BlockSpec((None, 2), lambda i, h, c: (i, 0)),
                  pl.BlockSpec((None, hq, hd), lambda i, h, c: (i, 0, 0)),
                  pl.BlockSpec((None, None, hd), lambda i, h, c: (i, k_head + h, 0)),
                  pl.BlockSpec((None, None, hd), lambda i, h, c: (i, v_head + h, 0)),
                  pl.BlockSpec((None, half), lambda i, h, c: (i, 0)),
                  pl.BlockSpec((None, half), lambda i, h, c: (i, 0)),
                  cache_spec, cache_spec],
        out_specs=[*specs, cache_spec, cache_spec],
        input_output_aliases={6: 3, 7: 4},
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=interpret(),
    )(bounds, *operands, cos[:, 0, :half], sin[:, 0, :half], cache_k, cache_v)
    return _combine(m, l, o, g, cache_k.dtype), keys, vals


def decode_step_reference(qkv, cos, sin, cache_k, cache_v, write, start, dtype=None, *, kernel: bool = False):
    """The jnp twin: RoPE, two cache updates, then ``decode_attention`` (its kernel with ``kernel``)."""
    b = cache_k.shape[0]
    hkv, hd = cache_k.shape[2:]
    q, k, v = split_qkv(qkv, hkv, hd, cache_k.dtype if dtype is None else dtype)
    q = apply_rope(q.reshape(b, 1, -1, hd), cos, sin)
    k = apply_rope(k.reshape(b, 1, hkv, hd), cos, sin)
    keys, vals = write_cache(cache_k, cache_v, k, v.reshape(b, 1, hkv, hd), write)
    return decode_attention(q, keys.astype(q.dtype), vals.astype(q.dtype), write, start, kernel=kernel), keys, vals


def decode_step(qkv, cos: Array, sin: Array, cache_k: Array, cache_v: Array,
                write: Array, start: Array, dtype=None, *, kernel: bool = False) -> tuple[Array, Array, Array]:
    """Attention of one decode token per row. ``qkv``: the projection outputs before RoPE, either
    (q ``[B,1,Hq·hd]``, k, v ``[B,1,Hkv·hd]``) or one buffer ``[B,1,(Hq+2·Hkv)·hd]`` (the fused
    model's q/k/v GEMV accumulator, rounded to ``dtype`` (the model's; default the cache's) as it is
    read: the kernel rounds to the cache's dtype and takes only ``dtype`` = cache dtype = bf16, so
    no slice or cast runs before it); cos/sin ``[B,1,hd]``,
    cache ``[B,S,Hkv,hd]``, the new token at slot ``write``, row b's keys visible from ``start[b]``.
    Returns (``[B,1,Hq·hd]``, updated cache k, v): one kernel with ``kernel`` (the decode plan's
    ``attention``) where the operands fit it, the jnp twin otherwise (its attention kernel where that fits)."""
    dtype = cache_k.dtype if dtype is None else dtype
    if kernel and step_supported(qkv, cache_k, cache_v, dtype):
        return decode_step_kernel(qkv, cos, sin, cache_k, cache_v, write, start)
    return decode_step_reference(qkv, cos, sin, cache_k, cache_v, write, start, dtype, kernel=kernel)
