"""Fused (deployable) La RoSA: fold γ and Q_l into the weights, add the residual adapters.

DESIGN.md §1 "Fused mode". The residual stream of layer l lives in its basis, r = h·Q_l:
  E ← E·Q_0
  W_{q,k,v} ← Q_lᵀ·diag(γ_attn)·W,  W_{gate,up} ← Q_lᵀ·diag(γ_mlp)·W   (biases unchanged)
  W_o ← W_o·Q_l,  W_down ← W_down·Q_{l+1} (Q_l in the last layer; biases alike)
  r ← r_mid·(Q_lᵀ·Q_{l+1}) + MLP(r_mid) between layers (the d × d adapter on the residual after
      attention; the MLP output is folded straight into the next basis)
  W_head ← Q_{L−1}ᵀ·diag(γ_final)·W_head  (tied embeddings are untied)
All RMSNorm gains become 1, since norm(r) = norm(h)·Q_l (Q orthogonal). Folding runs in float64
on the host and casts once to the model dtype. Applying the adapter to r_mid, not to r_mid + MLP,
frees it from the MLP: at decode its product streams beside the down selection or in the down GEMV's
launch (``pallas/sparse_gemv.py``). One Q for every layer (the ``global`` flavour) needs no adapters:
the fused model is then a plain model in the rotated basis, decoding at Top-K's or TEAL's cost.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import assign_params, params_of
from .models import Transformer

FUSED_FORM = 2  # 2: down_proj folded with Q_{l+1}, adapter on r_mid (1: Q_l, adapter after the layer)


def fuse(model: Transformer, rotations: np.ndarray, dtype=None) -> Transformer:
    """A new Transformer computing the same function in rotated bases (exactly, at p = 0)."""
    cfg = model.config
    dtype = jnp.dtype(dtype or model.dtype)
    q = np.asarray(rotations, np.float64)
    if q.shape != (cfg.num_layers, cfg.hidden_size, cfg.hidden_size):
        raise ValueError(f"rotations have shape {q.shape}, the model needs {(cfg.num_layers, cfg.hidden_size, cfg.hidden_size)}")
    src = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in params_of(model).items()}
    out: dict[str, np.ndarray] = {"embed.embedding": src["embed.embedding"] @ q[0]}
    for l in range(cfg.num_layers):
        p = f"layers.{l}."
        ql = q[l]
        for norm, names in (("attn_norm", ("attn.q", "attn.k", "attn.v")), ("mlp_norm", ("mlp.gate", "mlp.up"))):
            g = src[p + norm + ".scale"]
            out[p + norm + ".scale"] = np.ones_like(g)
            for n in names:
                out[p + n + ".kernel"] = ql.T @ (g[:, None] * src[p + n + ".kernel"])
                if p + n + ".bias" in src:
                    out[p + n + ".bias"] = src[p + n + ".bias"]
        for n, qo in (("attn.o", ql), ("mlp.down", q[min(l + 1, cfg.num_layers - 1)])):
            out[p + n + ".kernel"] = src[p + n + ".kernel"] @ qo
            if p + n + ".bias" in src:
                out[p + n + ".bias"] = src[p + n + ".bias"] @ qo
    head = src["embed.embedding"].T if cfg.tie_word_embeddings else src["lm_head.kernel"]
    out["lm_head.kernel"] = q[-1].T @ (src["norm.scale"][:, None] * head)
    out["norm.scale"] = np.ones_like(src["norm.scale"])
    adapters = not all(np.array_equal(q[0], ql) for ql in q[1:])  # one shared Q: the adapters are identities
    if adapters:
        out.update({f"adapters.{l}": q[l].T @ q[l + 1] for l in range(cfg.num_layers - 1)})

    fused_cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    fused = nnx.eval_shape(lambda: Transformer(fused_cfg, dtype=dtype, rngs=nnx.Rngs(0), adapters=adapters))
    assign_params(fused, out.get, where="fuse", dtype=dtype)
    fused.fused = True
    return fused


def weight_aware(model: Transformer) -> Transformer:
    """The same function with Top-K made weight-aware: entry i of a site's input is ranked by |a_i|·s_i,
    s_i the norm of row i of the weights it multiplies (q/k/v together, gate/up together, down), so that
    what a dropped entry would have added to the outputs counts, not its size alone (WINA's score; in
    the fused model this is how γ re-enters a γ-free Q). Folded, so the decode is unchanged: the RMSNorm
    gain γ becomes γ·s and those weight rows 1/s (q/k/v, gate/up), and the up columns s and the down
    rows 1/s (SiLU(g)·u·s is the down input times s)."""
    cfg = model.config
    src = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in params_of(model).items()}
    out = dict(src)
    for l in range(cfg.num_layers):
        p = f"layers.{l}."
        for norm, names in (("attn_norm", ("attn.q", "attn.k", "attn.v")), ("mlp_norm", ("mlp.gate", "mlp.up"))):
            w = np.concatenate([src[p + n + ".kernel"] for n in names], axis=1)
            scale = row_norms(w)
            out[p + norm + ".scale"] = src[p + norm + ".scale"] * scale
            for n in names:
                out[p + n + ".kernel"] = src[p + n + ".kernel"] / scale[:, None]
        scale = row_norms(src[p + "mlp.down.kernel"])
        out[p + "mlp.up.kernel"] = out[p + "mlp.up.kernel"] * scale[None, :]
        if p + "mlp.up.bias" in src:
            out[p + "mlp.up.bias"] = src[p + "mlp.up.bias"] * scale
        out[p + "mlp.down.kernel"] = src[p + "mlp.down.kernel"] / scale[:, None]
    new = nnx.eval_shape(lambda: Transformer(cfg, dtype=model.dtype, rngs=nnx.Rngs(0), adapters=model.adapters is not None))
    assign_params(new, out.get, where="weight_aware", dtype=model.dtype)
    new.fused, new.plan = model.fused, model.plan
    return new


def row_norms(w: np.ndarray) -> np.ndarray:
    """Row norms, floored so that an all-zero row (nothing to lose) keeps a finite, small scale."""
    return norm_floor(np.linalg.norm(w, axis=1))


def norm_floor(n: np.ndarray) -> np.ndarray:
    return np.maximum(n, 1e-6 * max(float(n.max()), 1e-30))

