"""One decoder for Llama (2, 3, 3.1) and Qwen2 in Flax NNX.

Row-vector convention: y = x @ W with W stored input-major ``[D_in, D_out]``, so a sparse input
reads whole rows of W (DESIGN.md §2). Norms, RoPE tables, softmax and logits are float32; the
matmuls run in the parameter dtype with float32 accumulation.

Sparsity plugs in at four *sites* per layer, named after the paper's activation types:
``qkv`` (attention input, rotated in La RoSA), ``o`` (o_proj input), ``gate_up`` (MLP input,
rotated) and ``down`` (down_proj input). Each site is a call ``proj(site, layer, x, linears, gain)``
returning the outputs of ``linears`` on ``x * gain``; the dense model uses :func:`dense_projection`.
At ``qkv``/``gate_up`` x is the gain-free ``norm(h)`` and ``gain`` the RMSNorm γ (La RoSA's fused
flavour rotates norm(h) before γ); at ``o``/``down`` gain is None.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import pallas as pl

from ..config import ModelConfig, rope_inv_freq

Array = jax.Array
_List = getattr(nnx, "List", list)  # flax >= 0.12 wants nnx.List for lists of modules
MASK_VALUE = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


# ----------------------------------------------------------------------------- KV cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Explicit cache pytree. Slot s of row b holds the token at position ``s - start[b]``.

    ``k``/``v``: one ``[B, S_max, H_kv, head_dim]`` array per layer; ``pos``: slots filled so far
    (same for every row: prompts are left-padded); ``start``: first real slot of each row.
    """

    k: list[Array]
    v: list[Array]
    pos: Array  # int32 scalar
    start: Array  # int32 [B]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, start: Array | None = None) -> KVCache:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
    return KVCache(
        k=[zeros() for _ in range(cfg.num_layers)],
        v=[zeros() for _ in range(cfg.num_layers)],
        pos=jnp.zeros((), jnp.int32),
        start=jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32),
    )


# ----------------------------------------------------------------------------- layers
def acc_dtype(dtype):
    """Accumulation / reduction dtype: float32, or float64 for float64 models (exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: Array, scale: Array | None, eps: float) -> Array:
    """HF's LlamaRMSNorm: normalise in float32, cast back, then multiply by the gain."""
    xf = x.astype(acc_dtype(x.dtype))
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if scale is None else scale * y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is input-major ``[D_in, D_out]``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        std = d_in**-0.5
        self.kernel = nnx.Param((jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * std).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...]
        if _use_gemv(x, (w,)):
            return _gemv_linears(x, (self,))[0]
        y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=acc_dtype(w.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.astype(w.dtype)


Projection = Callable[[str, int, Array, Sequence[Linear], Array | None], tuple[Array, ...]]


def dense_projection(site: str, layer: int, x: Array, linears: Sequence[Linear], gain: Array | None = None) -> tuple[Array, ...]:
    del site, layer
    x = x if gain is None else gain * x  # same op order as HF's RMSNorm: weight * normed
    if len(linears) > 1 and _use_gemv(x, tuple(lin.kernel[...] for lin in linears)):
        return _gemv_linears(x, tuple(linears))  # one kernel for q/k/v (gate/up) at decode
    return tuple(lin(x) for lin in linears)


# ----------------------------------------------------------------------------- GPU decode kernels
# At batch-1 decode every projection is a matrix-vector product that must stream its weights at
# HBM speed. XLA picks poor kernels for some of these shapes (on H100 it turns [1,4096]x[4096,1024]
# into a materialised f32 product + reduction, ~5x slower than streaming the weights), and a
# separate launch per matrix costs a ramp-up each. So on GPU, bf16 single-row products go through
# one Pallas (Triton) split-K kernel per site (q/k/v together, gate/up together); decode attention
# is one Pallas kernel per layer plus a small XLA combine. Float32 models and CPU keep the XLA path
# (exact parity). ``LAROSA_PALLAS`` lists what is enabled: "gemv,attn" (default) or "0".
def _pallas_enabled(what: str) -> bool:
    flags = os.environ.get("LAROSA_PALLAS", "gemv,attn")
    on = jax.default_backend() == "gpu" or os.environ.get("LAROSA_PALLAS_INTERPRET") == "1"  # CPU: tests only
    return on and what in flags.split(",")


_GEMV_BK, _GEMV_BN, _GEMV_PROGRAMS = 64, 128, 264  # rows / columns per step; programs to aim for (2 per SM)


def _gemv_split(k: int, n_blocks: int) -> int | None:
    """Split of the K rows over programs (it must divide K / _GEMV_BK); None if K does not tile."""
    if k % _GEMV_BK:
        return None
    nkb = k // _GEMV_BK
    cands = [d for d in range(1, min(nkb, 16) + 1) if nkb % d == 0]
    for d in cands:
        if n_blocks * d >= _GEMV_PROGRAMS:
            return d
    return cands[-1]


def _use_gemv(x: Array, ws: Sequence[Array]) -> bool:
    if not _pallas_enabled("gemv") or x.ndim < 1 or int(np.prod(x.shape[:-1])) != 1:
        return False
    k = x.shape[-1]
    return all(w.dtype == jnp.bfloat16 and w.ndim == 2 and w.shape[0] == k and w.shape[1] % _GEMV_BN == 0 for w in ws) \
        and _gemv_split(k, sum(w.shape[1] // _GEMV_BN for w in ws)) is not None


def _gemv_kernel(x_ref, *refs, n_blocks, nk):
    """Program (j, s): column block j of the concatenated outputs, row slice s; f32 partial sums."""
    m = len(n_blocks)
    w_refs, o_refs = refs[:m], refs[m:]
    j, s = pl.program_id(0), pl.program_id(1)
    base = s * (nk * _GEMV_BK)
    first = 0
    for w_ref, o_ref, nb in zip(w_refs, o_refs, n_blocks):

        @pl.when((j >= first) & (j < first + nb))
        def _(w_ref=w_ref, o_ref=o_ref, first=first):
            col = pl.ds(pl.multiple_of((j - first) * _GEMV_BN, _GEMV_BN), _GEMV_BN)

            def body(i, acc):
                k0 = pl.multiple_of(base + i * _GEMV_BK, _GEMV_BK)
                xk = x_ref[pl.ds(k0, _GEMV_BK)].astype(jnp.float32)
                return acc + xk[:, None] * w_ref[pl.ds(k0, _GEMV_BK), col].astype(jnp.float32)

            acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((_GEMV_BK, _GEMV_BN), jnp.float32))
            o_ref[...] = jnp.sum(acc, axis=0)

        first += nb


def _gemv_partials(x: Array, ws: tuple[Array, ...]) -> list[Array]:
    """Float32 split-K partial sums ``[split, N_i]`` of ``x[K] @ w_i`` for every w_i, one launch."""
    k = x.shape[0]
    n_blocks = tuple(w.shape[1] // _GEMV_BN for w in ws)
    split = _gemv_split(k, sum(n_blocks))
    firsts = np.cumsum((0,) + n_blocks[:-1]).tolist()

    def out_map(first, nb):
        return lambda j, s: (s, jnp.clip(j - first, 0, nb - 1))

    return pl.pallas_call(
        functools.partial(_gemv_kernel, n_blocks=n_blocks, nk=k // (_GEMV_BK * split)),
        out_shape=[jax.ShapeDtypeStruct((split, w.shape[1]), jnp.float32) for w in ws],
        grid=(sum(n_blocks), split),
        out_specs=[pl.BlockSpec((None, _GEMV_BN), out_map(f, nb)) for f, nb in zip(firsts, n_blocks)],
        compiler_params=_triton_params(num_warps=4, num_stages=3),
        interpret=jax.default_backend() == "cpu",
    )(x, *ws)


def _gemv_linears(x: Array, linears: Sequence["Linear"]) -> tuple[Array, ...]:
    ws = tuple(lin.kernel[...] for lin in linears)
    lead = x.shape[:-1]
    parts = _gemv_partials(x.reshape(-1).astype(ws[0].dtype), ws)
    out = []
    for lin, w, p in zip(linears, ws, parts):
        y = jnp.sum(p, axis=0)
        if lin.bias is not None:
            y = y + lin.bias[...].astype(y.dtype)
        out.append(y.astype(w.dtype).reshape(*lead, w.shape[1]))
    return tuple(out)


_ATTN_BS, _ATTN_GP = 64, 16  # cache slots per program; query rows padded to 16 for the matrix unit


def _use_attn(q: Array, k: Array) -> bool:
    b, t, hq, hd = q.shape
    return (_pallas_enabled("attn") and t == 1 and q.dtype == jnp.bfloat16 and k.dtype == jnp.bfloat16
            and k.shape[1] % _ATTN_BS == 0 and hd in (64, 128, 256) and hq // k.shape[2] <= _ATTN_GP)


def _attn_kernel(bounds_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, scale):
    """Program (b, h, c): query heads of KV head h against slots [c*BS, (c+1)*BS) of row b."""
    c = pl.program_id(2)
    lo, hi = bounds_ref[0], bounds_ref[1]  # visible slots: lo <= slot <= hi
    s0 = c * _ATTN_BS

    @pl.when((s0 <= hi) & (s0 + _ATTN_BS > lo))
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

    @pl.when((s0 > hi) | (s0 + _ATTN_BS <= lo))
    def _():  # nothing visible in this block: neutral partials, no cache read
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)


def _attend_one_pallas(q: Array, k: Array, v: Array, q_slot: Array, start: Array) -> Array:
    """Split-S (flash-decoding) attention for one query per row; combine in float32."""
    b, _, hq, hd = q.shape
    s_max, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    nc = s_max // _ATTN_BS
    qp = jnp.pad(q.reshape(b, hkv, g, hd), ((0, 0), (0, 0), (0, _ATTN_GP - g), (0, 0)))
    bounds = jnp.stack([start.astype(jnp.int32), jnp.broadcast_to(q_slot.astype(jnp.int32), (b,))], axis=1)
    m, l, o = pl.pallas_call(
        functools.partial(_attn_kernel, scale=hd**-0.5),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, nc, _ATTN_GP), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, nc, _ATTN_GP), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, nc, _ATTN_GP, hd), jnp.float32)],
        grid=(b, hkv, nc),
        in_specs=[pl.BlockSpec((None, 2), lambda i, h, c: (i, 0)),
                  pl.BlockSpec((None, None, _ATTN_GP, hd), lambda i, h, c: (i, h, 0, 0)),
                  pl.BlockSpec((None, _ATTN_BS, None, hd), lambda i, h, c: (i, c, h, 0)),
                  pl.BlockSpec((None, _ATTN_BS, None, hd), lambda i, h, c: (i, c, h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, _ATTN_GP), lambda i, h, c: (i, h, c, 0)),
                   pl.BlockSpec((None, None, None, _ATTN_GP), lambda i, h, c: (i, h, c, 0)),
                   pl.BlockSpec((None, None, None, _ATTN_GP, hd), lambda i, h, c: (i, h, c, 0, 0))],
        compiler_params=_triton_params(num_warps=4, num_stages=2),
        interpret=jax.default_backend() == "cpu",
    )(bounds, qp, k, v)
    m, l, o = m[..., :g], l[..., :g], o[..., :g, :]
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, Hkv, C, G]
    out = jnp.sum(w[..., None] * o, axis=2) / jnp.sum(w * l, axis=2)[..., None]
    return out.reshape(b, 1, hq * hd).astype(q.dtype)


def _triton_params(**kw):
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(**kw)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos/sin ``[B, T, head_dim]`` for integer positions ``[B, T]`` (HF rotate-half layout)."""
    inv = jnp.asarray(rope_inv_freq(cfg.rope, cfg.head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x ``[B, T, H, hd]``; rotate-half as in transformers' apply_rotary_pos_emb, in float32."""
    xf = x.astype(acc_dtype(x.dtype))
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.q = Linear(d, cfg.q_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k = Linear(d, cfg.kv_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v = Linear(d, cfg.kv_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o = Linear(cfg.q_dim, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down = Linear(f, d, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)


def attend(q: Array, k: Array, v: Array, q_slots: Array, k_slots: Array, start: Array) -> Array:
    """GQA attention. q ``[B,T,Hq,hd]``, k/v ``[B,S,Hkv,hd]``; key j is visible to query i when
    ``start[b] <= slot_j <= slot_i`` (causal, left padding masked)."""
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    visible = (k_slots[None, None, :] <= q_slots[None, :, None]) & (k_slots[None, None, :] >= start[:, None, None])
    if t == 1:
        if _use_attn(q, k):
            return _attend_one_pallas(q, k, v, q_slots[0], start)
        return _attend_one(q, k, v, visible[:, 0])
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc_dtype(q.dtype)) * (hd**-0.5)
    s = jnp.where(visible[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=acc_dtype(q.dtype))
    return o.reshape(b, t, hq * hd).astype(q.dtype)


def _attend_one(q: Array, k: Array, v: Array, visible: Array) -> Array:
    """Single-query (decode) attention as multiply + reduce: reads the cache in its
    ``[B, S, H_kv, hd]`` layout (a batched dot makes XLA transpose the whole cache every step)
    and needs no matrix unit for a 1-row product. ``visible`` is ``[B, S]``."""
    b, _, hq, hd = q.shape
    hkv = k.shape[2]
    ct = acc_dtype(q.dtype)
    qg = q.reshape(b, 1, hkv, hq // hkv, hd).astype(ct)
    s = jnp.sum(qg * k.astype(ct)[:, :, :, None, :], axis=-1) * (hd**-0.5)  # [B, S, Hkv, G]
    s = jnp.where(visible[:, :, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=1).astype(v.dtype)
    o = jnp.sum(p.astype(ct)[..., None] * v.astype(ct)[:, :, :, None, :], axis=1)  # [B, Hkv, G, hd]
    return o.reshape(b, 1, hq * hd).astype(q.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(
        self,
        h: Array,
        layer: int,
        cfg: ModelConfig,
        rope: tuple[Array, Array],
        kv: tuple[Array, Array] | None,
        slots: tuple[Array, Array, Array],
        proj: Projection,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """One decoder layer. ``slots`` = (write index, query slots [T], start [B])."""
        b, t, _ = h.shape
        write, q_slots, start = slots
        x = rms_norm(h, None, cfg.rms_norm_eps)
        a = self.attn
        q, k, v = proj("qkv", layer, x, (a.q, a.k, a.v), self.attn_norm.scale[...])
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), *rope)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), *rope)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if kv is None:  # full forward without cache: keys are this call's tokens
            keys, vals, k_slots = k, v, q_slots
        else:
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, write, 0, 0))
            vals = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, write, 0, 0))
            kv = (keys, vals)
            k_slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
        o = attend(q, keys.astype(q.dtype), vals.astype(q.dtype), q_slots, k_slots, start)
        (o,) = proj("o", layer, o, (a.o,), None)
        h = h + o
        x = rms_norm(h, None, cfg.rms_norm_eps)
        m = self.mlp
        g, u = proj("gate_up", layer, x, (m.gate, m.up), self.mlp_norm.scale[...])
        ct = acc_dtype(g.dtype)
        act = (jax.nn.silu(g.astype(ct)) * u.astype(ct)).astype(g.dtype)
        (y,) = proj("down", layer, act, (m.down,), None)
        return h + y, kv


class Transformer(nnx.Module):
    """Decoder-only LM (LlamaForCausalLM / Qwen2ForCausalLM)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None, adapters: bool = False):
        """``adapters=True`` adds La RoSA's fused-mode residual adapters: after layer l < L-1 the
        residual stream is multiplied by ``adapters[l]`` = Q_lᵀ·Q_{l+1} (DESIGN.md §1, fused mode)."""
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = _List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        d = cfg.hidden_size
        self.adapters = nnx.Param(jnp.broadcast_to(jnp.eye(d, dtype=dtype), (max(cfg.num_layers - 1, 0), d, d))) if adapters else None

    @property
    def dtype(self):
        return self.embed.embedding.dtype

    def __call__(
        self, tokens: Array, cache: KVCache | None = None, *, start: Array | None = None, proj: Projection = dense_projection
    ) -> tuple[Array, KVCache | None]:
        """Float32 logits ``[B, T, V]`` for tokens ``[B, T]``.

        With a cache the tokens fill slots ``cache.pos ...``; without one they are a whole
        (optionally left-padded, ``start``) sequence.
        """
        h, cache, ctx = self.embed_and_context(tokens, cache, start)
        new_k, new_v = [], []
        for layer, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[layer], cache.v[layer])
            h, kv = block(h, layer, self.config, ctx[0], kv, ctx[1], proj)
            if self.adapters is not None and layer < self.config.num_layers - 1:
                h = jnp.dot(h, self.adapters[layer], preferred_element_type=acc_dtype(h.dtype)).astype(h.dtype)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        logits = self.logits(h)
        if cache is not None:
            cache = KVCache(k=new_k, v=new_v, pos=cache.pos + tokens.shape[1], start=cache.start)
        return logits, cache

    def embed_and_context(self, tokens: Array, cache: KVCache | None, start: Array | None):
        """Embeddings plus what every layer needs: RoPE tables and slot bookkeeping."""
        b, t = tokens.shape
        if cache is None:
            write = jnp.zeros((), jnp.int32)
            start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        else:
            write, start = cache.pos, cache.start
        q_slots = write + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.maximum(q_slots[None, :] - start[:, None], 0)
        rope = rope_tables(self.config, positions)
        h = self.embed(tokens)
        return h, cache, (rope, (write, q_slots, start))

    def logits(self, h: Array) -> Array:
        x = self.norm(h)
        if self.lm_head is None:
            w = self.embed.embedding[...]
            return jnp.einsum("btd,vd->btv", x, w, preferred_element_type=acc_dtype(x.dtype))
        return jnp.dot(x, self.lm_head.kernel[...], preferred_element_type=acc_dtype(x.dtype))
