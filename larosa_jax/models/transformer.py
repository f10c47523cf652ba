"""One decoder for Llama (2, 3, 3.1) and Qwen2 in Flax NNX.

Row-vector convention: y = x @ W with W stored input-major ``[D_in, D_out]``, so a sparse input
reads whole rows of W (DESIGN.md §2). Norms, RoPE tables, softmax and logits are float32; the
matmuls run in the parameter dtype with float32 accumulation.

Sparsity plugs in at four *sites* per layer, named after the paper's activation types:
``qkv`` (attention input, rotated in La RoSA), ``o`` (o_proj input), ``gate_up`` (MLP input,
rotated) and ``down`` (down_proj input). One layer function serves every method: each site is a
call of the model's projection hook (:data:`Projection`; the dense model uses
:func:`dense_projection`), which is handed the site's inputs *before* their elementwise prologue —
the residual stream h (and the add due to it) with a ``Norm`` at q/k/v and gate/up, the gate/up
output with ``Gated`` (SiLU·up) at down — so that a GPU selection kernel can make the row it reads
anyway. The model's :class:`~larosa_jax.plan.DecodePlan` says which kernels each op may use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .. import pallas as ops
from ..config import ModelConfig, rope_inv_freq
from ..plan import DecodePlan

Array = jax.Array
_List = getattr(nnx, "List", list)  # flax >= 0.12 wants nnx.List for lists of modules
MASK_VALUE = ops.MASK_VALUE  # finite, so fully-masked (padding) rows stay NaN-free


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
acc_dtype = ops.acc_dtype


def rms_norm(x: Array, scale: Array | None, eps: float) -> Array:
    """HF's LlamaRMSNorm: normalise in float32, cast back, then multiply by the gain."""
    return ops.rms_normalize(x, eps, scale)


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
        return project(x, (self,))[0]


Projection = Callable[..., tuple[tuple[Array, ...], ops.KeepSet]]
"""``proj(site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False)``
→ ``(outputs, keep)``: the outputs of ``linears`` on the site's row — ``prologue``'s row made from x
(a Norm's γ is ``gain``), or x (times ``gain``) without one — plus ``r @ A`` for a ``residual = (r, A)``,
as one float32 buffer with ``raw``; ``keep`` is the site's :class:`~larosa_jax.pallas.KeepSet`, whose
``h`` holds a Norm prologue's rounded residual (the layer's new h). ``side``: La RoSA's adapter
product on the selection's spare programs (``plan.adapter == "side"``; hooks that do not select ignore
it). Hooks are modules (their calibrated state stays state) or functions."""


def site_row(x: Array, gain: Array | None = None, prologue=None) -> tuple[Array, Array | None]:
    """The row a site's linears read and a Norm prologue's rounded residual (None otherwise): the
    prologue's jnp twin with its γ = ``gain``, or ``gain * x`` (HF's RMSNorm op order: weight * normed)."""
    if prologue is None:
        return (x if gain is None else gain * x), None
    if gain is not None:
        prologue = dataclasses.replace(prologue, gain=gain)
    return prologue.reference(x)


def dense_projection(site: str, layer: int, x: Array, linears: Sequence[Linear], plan: DecodePlan, *, gain=None,
                     prologue=None, residual=None, side=None, raw: bool = False):
    """The dense model's hook (see :data:`Projection`). At one token a site whose plan reads masked tiles
    (``SITE.gemv=masked``) runs the threshold path's launches with every entry kept (they stream the
    weights faster than the dense GEMV); several tokens take XLA's GEMM (the same product, no mask)."""
    del layer, side
    if plan.site(site).gemv == "masked" and math.prod(x.shape[:-1]) == 1:
        return threshold_projection(site, x, linears, plan, KEEP_ALL, gain=gain, prologue=prologue, residual=residual,
                                    raw=raw)
    row, h = site_row(x, gain, prologue)
    return ops.combine_outputs(project(row, linears, kernel=plan.gemv), residual, raw), ops.KeepSet(None, x=row, h=h)


KEEP_ALL = -1.0  # a threshold τ < 0 drops nothing


def threshold_projection(site: str, x: Array, linears: Sequence[Linear], plan: DecodePlan, tau, *, pairs=None,
                         gain=None, prologue=None, residual=None, raw: bool = False):
    """``(outputs, keep)`` of ``linears`` on the site's row with the entries ``|row| <= tau`` dropped (TEAL's rule).
    With the site plan's ``select`` and ``prologue`` a Norm prologue runs in the selection kernel (no search);
    the GEMV (``SITE.gemv``, ``SITE.tile``) reads the threshold pair in place. ``pairs``: τ's pair for bf16
    rows, made ahead (``ops.select_threshold``)."""
    if prologue is None:
        x = x if gain is None else gain * x
    elif gain is not None:
        prologue = dataclasses.replace(prologue, gain=gain)
    sp = plan.site(site)
    ws = tuple(lin.kernel[...] for lin in linears)
    bs = tuple(None if lin.bias is None else lin.bias[...] for lin in linears)
    keep = ops.select_threshold(x, tau, sum(w.shape[1] for w in ws), prologue=prologue, pairs=pairs,
                                kernel=sp.select and sp.prologue)
    if keep.x is None:  # no prologue: the row is x itself
        keep = dataclasses.replace(keep, x=x)
    outs = ops.sparse_matvec(keep.x, keep, ws, bs, residual, raw, gemv=sp.gemv, tail=plan.adapter in ("side", "tail"),
                             tile=sp.tile)
    return outs, keep


def project(x: Array, linears: Sequence[Linear], *, kernel: bool = False) -> tuple[Array, ...]:
    """x @ W_i (+ b_i) for several linears sharing one input: with ``kernel`` one Pallas launch at bf16
    batch-1 decode (q/k/v together, gate/up together), XLA dots otherwise."""
    ws = tuple(lin.kernel[...] for lin in linears)
    bs = tuple(None if lin.bias is None else lin.bias[...] for lin in linears)
    return ops.matvec(x, ws, bs, kernel=kernel)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos/sin ``[B, T, head_dim]`` for integer positions ``[B, T]`` (HF rotate-half layout)."""
    inv = jnp.asarray(rope_inv_freq(cfg.rope, cfg.head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


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
    if t == 1:  # one query: the multiply + reduce twin of the decode attention
        return ops.decode_attention(q, k, v, q_slots[0], start)
    visible = (k_slots[None, None, :] <= q_slots[None, :, None]) & (k_slots[None, None, :] >= start[:, None, None])
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc_dtype(q.dtype)) * (hd**-0.5)
    s = jnp.where(visible[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=acc_dtype(q.dtype))
    return o.reshape(b, t, hq * hd).astype(q.dtype)


def residual(h, dtype) -> Array:
    """The residual stream a fused layer hands on, in the model's dtype: h itself, or h + y for a
    pair (both rounded first, as the next layer's norm prologue does: ``ops.Norm.reference``)."""
    if isinstance(h, tuple):
        h, y = h
        return (h.astype(dtype) + y.astype(dtype)).astype(dtype)
    return h.astype(dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, h, layer: int, cfg: ModelConfig, rope: tuple[Array, Array], kv: tuple[Array, Array] | None,
                 slots: tuple[Array, Array, Array], proj: Projection, plan: DecodePlan, adapter: Array | None = None):
        """One decoder layer: ``(residual, kv)``. ``slots`` = (write index, query slots [T], start [B]);
        ``adapter``: the fused model's d × d residual adapter into the next layer's basis.

        Every site hands its outputs on unrounded (``raw``): the next site's prologue rounds them as
        the layer's own casts would. ``h`` may arrive as the previous layer's float32 accumulator (a
        fused La RoSA layer: down plus the adapter) or as a pair (h, y) whose sum is the residual (a
        layer without adapter: the down output y is added in the next layer's norm prologue);
        :func:`residual` makes the sum where no layer follows.

        The adapter product r_mid·A is independent of the MLP, so with ``plan.adapter == "side"`` at
        batch-1 decode its tiles stream on the spare programs of the down selection launch (``ops.Side``;
        the gate/up selection zero-fills its sum) and the down GEMV adds onto that sum."""
        a, m = self.attn, self.mlp
        eps, dt = cfg.rms_norm_eps, a.q.kernel.dtype
        h, add = h if isinstance(h, tuple) else (h, None)
        # each site's ops carry its name (jax.named_scope) so that a trace splits the step's time by site
        with jax.named_scope("qkv"):
            (qkv,), keep = proj("qkv", layer, h, (a.q, a.k, a.v), plan, gain=self.attn_norm.scale[...],
                                prologue=ops.Norm(eps, dt, add=add), raw=True)
        h = keep.h
        with jax.named_scope("attention"):
            o, kv = self._attend(qkv, cfg, rope, kv, slots, plan)
        side = plan.adapter == "side" and ops.side_fits(adapter, o)
        with jax.named_scope("o"):
            (o,), _ = proj("o", layer, o, (a.o,), plan, raw=True)
        with jax.named_scope("gate_up"):
            (gu,), keep = proj("gate_up", layer, h, (m.gate, m.up), plan, gain=self.mlp_norm.scale[...],
                               prologue=ops.Norm(eps, dt, add=o), side=ops.Side(adapter) if side else None, raw=True)
        h = keep.h
        with jax.named_scope("down"):
            if adapter is None:
                (y,), _ = proj("down", layer, gu, (m.down,), plan, prologue=ops.Gated(dt), raw=True)
                return (h, y), kv
            # fused La RoSA: the next layer's residual is h·A + MLP(h), the down weights already fold the
            # next basis (fusion.py)
            (h,), _ = proj("down", layer, gu, (m.down,), plan, prologue=ops.Gated(dt), residual=(h, adapter),
                           side=ops.Side(adapter, keep.side, h) if side else None, raw=True)
        return h, kv

    def _attend(self, qkv, cfg, rope, kv, slots, plan):
        """RoPE, the cache write and attention: the o projection's input and the updated cache.
        ``qkv``: (q, k, v), or one float32 buffer of all three (``ops.split_qkv``)."""
        write, q_slots, start = slots
        t, dt = rope[0].shape[1], self.attn.q.kernel.dtype
        if kv is not None and t == 1:  # decode: one kernel on GPU
            o, keys, vals = ops.decode_step(qkv, *rope, kv[0], kv[1], write, start, dtype=dt, kernel=plan.attention)
            return o, (keys, vals)
        q, k, v = ops.split_qkv(qkv, cfg.num_kv_heads, cfg.head_dim, dt)
        b = q.shape[0]
        q = ops.apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), *rope)
        k = ops.apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), *rope)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if kv is None:  # full forward without cache: keys are this call's tokens
            keys, vals, k_slots = k, v, q_slots
        else:  # prefill
            kv = keys, vals = ops.write_cache(kv[0], kv[1], k, v, write)
            k_slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
        return attend(q, keys.astype(q.dtype), vals.astype(q.dtype), q_slots, k_slots, start), kv


class Transformer(nnx.Module):
    """Decoder-only LM (LlamaForCausalLM / Qwen2ForCausalLM)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None, adapters: bool = False):
        """``adapters=True`` adds La RoSA's fused-mode residual adapters: in layer l < L-1 the residual
        after attention is multiplied by ``adapters[l]`` = Q_lᵀ·Q_{l+1} and the MLP output (folded
        into basis l+1) added to it (DESIGN.md §1, fused mode; ``fusion.py``)."""
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = _List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        d = cfg.hidden_size
        # one Param per adapter, not a stacked [L-1, d, d] array: a slice of a stacked array handed to a
        # Pallas call is first copied out by XLA (~16 µs per layer and token at Llama-2-7B size on an H200)
        self.adapters = _List([nnx.Param(jnp.eye(d, dtype=dtype)) for _ in range(cfg.num_layers - 1)]) if adapters else None
        self.plan = DecodePlan.default("dense")  # static: which kernels the decode may use
        self.fused = adapters  # La RoSA's folded model (fusion.py); with one shared Q it has no adapters

    @property
    def dtype(self):
        return self.embed.embedding.dtype

    def __call__(
        self, tokens: Array, cache: KVCache | None = None, *, start: Array | None = None, proj: Projection = dense_projection,
        plan: DecodePlan | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Float32 logits ``[B, T, V]`` for tokens ``[B, T]``.

        With a cache the tokens fill slots ``cache.pos ...``; without one they are a whole
        (optionally left-padded, ``start``) sequence. ``plan``: the kernels to use (default the model's).
        """
        plan = self.plan if plan is None else plan
        h, cache, ctx = self.embed_and_context(tokens, cache, start)
        new_k, new_v = [], []
        for layer, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[layer], cache.v[layer])
            adapter = None
            if self.adapters is not None and layer < self.config.num_layers - 1:
                adapter = self.adapters[layer][...]
            h, kv = block(h, layer, self.config, ctx[0], kv, ctx[1], proj, plan, adapter)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        logits = self.logits(residual(h, self.embed.embedding.dtype))  # the model's one dtype
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
