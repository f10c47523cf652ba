"""Batch-1 matrix-vector products x @ W_i for several W_i sharing x, in one Pallas (Triton) launch.

At batch-1 decode every projection must stream its weights at HBM speed. On H100, XLA turned
[1,4096]x[4096,1024] into a materialised f32 product plus a reduction (~5x slower than streaming),
and a separate launch per matrix costs a ramp-up each; so q/k/v share one launch and gate/up
another. Program (j, s) computes column block j of the concatenated outputs over row slice s
(split-K, so one token fills the SMs); XLA adds the float32 partial sums.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from .common import acc_dtype, interpret, triton_params

# Rows / columns per loop step; programs to aim for. On H100 (132 SMs) the kernel streamed far
# below HBM bandwidth with <= 2 programs per SM (Llama-2 down_proj at 128 programs, Qwen2's at 224)
# and at 2.3-2.7 TB/s with ~3-4 per SM: each program keeps too few loads in flight on its own.
BK, BN, PROGRAMS = 64, 128, 384


def split_for(k: int, n_blocks: int) -> int | None:
    """How many row slices to split K into (dividing K / BK); None if K does not tile."""
    if k % BK:
        return None
    nkb = k // BK
    cands = [d for d in range(1, max(nkb // 2, 1) + 1) if nkb % d == 0]
    for d in cands:
        if n_blocks * d >= PROGRAMS:
            return d
    return cands[-1]


def supported(x: jax.Array, ws: Sequence[jax.Array]) -> bool:
    """bf16, one row, every W ``[K, N]`` with N % BK-tiling K and N % BN == 0."""
    if x.ndim < 1 or int(np.prod(x.shape[:-1])) != 1:
        return False
    k = x.shape[-1]
    return all(w.dtype == jnp.bfloat16 and w.ndim == 2 and w.shape[0] == k and w.shape[1] % BN == 0 for w in ws) \
        and split_for(k, sum(w.shape[1] // BN for w in ws)) is not None


def _kernel(x_ref, *refs, n_blocks, nk):
    m = len(n_blocks)
    w_refs, o_refs = refs[:m], refs[m:]
    j, s = pl.program_id(0), pl.program_id(1)
    base = s * (nk * BK)
    first = 0
    for w_ref, o_ref, nb in zip(w_refs, o_refs, n_blocks):

        @pl.when((j >= first) & (j < first + nb))
        def _(w_ref=w_ref, o_ref=o_ref, first=first):
            col = pl.ds(pl.multiple_of((j - first) * BN, BN), BN)

            def body(i, acc):
                k0 = pl.multiple_of(base + i * BK, BK)
                xk = x_ref[pl.ds(k0, BK)].astype(jnp.float32)
                return acc + xk[:, None] * w_ref[pl.ds(k0, BK), col].astype(jnp.float32)

            acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((BK, BN), jnp.float32))
            o_ref[...] = jnp.sum(acc, axis=0)

        first += nb


def partials(x: jax.Array, ws: tuple[jax.Array, ...]) -> list[jax.Array]:
    """Float32 split-K partial sums ``[split, N_i]`` of ``x[K] @ w_i`` for every w_i, one launch."""
    k = x.shape[0]
    n_blocks = tuple(w.shape[1] // BN for w in ws)
    split = split_for(k, sum(n_blocks))
    firsts = np.cumsum((0,) + n_blocks[:-1]).tolist()

    def out_map(first, nb):
        return lambda j, s: (s, jnp.clip(j - first, 0, nb - 1))

    return pl.pallas_call(
        functools.partial(_kernel, n_blocks=n_blocks, nk=k // (BK * split)),
        out_shape=[jax.ShapeDtypeStruct((split, w.shape[1]), jnp.float32) for w in ws],
        grid=(sum(n_blocks), split),
        out_specs=[pl.BlockSpec((None, BN), out_map(f, nb)) for f, nb in zip(firsts, n_blocks)],
        compiler_params=triton_params(num_warps=4, num_stages=3),
        interpret=interpret(),
    )(x, *ws)


def matvec_reference(x, ws, bs):
    """The jnp twin: XLA dots, float32 (float64) accumulation, output in the weight dtype."""
    out = []
    for w, b in zip(ws, bs):
        y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=acc_dtype(w.dtype))
        if b is not None:
            y = y + b.astype(y.dtype)
        out.append(y.astype(w.dtype))
    return tuple(out)


def matvec(x: jax.Array, ws: Sequence[jax.Array], bs: Sequence[jax.Array | None], *,
           kernel: bool = False) -> tuple[jax.Array, ...]:
    """``x @ w_i + b_i`` for every i: with ``kernel`` (the decode plan's ``gemv``) the kernel for bf16
    batch-1 rows, XLA otherwise."""
    ws, bs = tuple(ws), tuple(bs)
    if not (kernel and supported(x, ws)):
        return matvec_reference(x, ws, bs)
    lead = x.shape[:-1]
    out = []
    for w, b, p in zip(ws, bs, partials(x.reshape(-1).astype(ws[0].dtype), ws)):
        y = jnp.sum(p, axis=0)
        if b is not None:
            y = y + b.astype(y.dtype)
        out.append(y.astype(w.dtype).reshape(*lead, w.shape[1]))
    return tuple(out)
