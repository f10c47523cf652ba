"""Per-token Top-K selection as a *threshold pair*, so the sparse GEMV can apply it on the fly.

A row's keep set is described by ``thr = (t, m)`` (int32): with ``b = bits(|x| as float32)``
(monotone in |x| for non-negative floats), entry i is kept when ``b_i > t or (b_i == t and i < m)``.
Top-K (exactly k entries, ties at the k-th magnitude broken towards lower indices) and TEAL's
magnitude threshold (``|x| > τ``: t = bits(τ), m = 0) are both such pairs, so one GEMV kernel
serves every method without materialising the masked vector.

The kernel (bf16 rows, one program per row) bisects the 15 magnitude bits of a bf16, cuts ties
with a cumulative count and also compacts the kept indices for the gather GEMV; the jnp twin
bisects the float32 bits the same way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .common import enabled, interpret, triton_params

Array = jax.Array


def magnitude_bits(x: Array) -> Array:
    """Bit pattern of |x|, ordered like |x|: int32 of float32 (int64 of float64 for float64 x)."""
    if x.dtype == jnp.float64:
        return jax.lax.bitcast_convert_type(jnp.abs(x), jnp.int64)
    return jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)


def keep_mask(x: Array, thr: Array) -> Array:
    """Boolean keep mask of ``x [..., D]`` for threshold pairs ``thr [..., 2]``."""
    b = magnitude_bits(x)
    t, m = thr[..., 0:1].astype(b.dtype), thr[..., 1:2].astype(b.dtype)
    idx = jax.lax.broadcasted_iota(b.dtype, x.shape, x.ndim - 1)
    return (b > t) | ((b == t) & (idx < m))


def apply(x: Array, thr: Array) -> Array:
    """x with the entries outside its keep set zeroed."""
    return jnp.where(keep_mask(x, thr), x, jnp.zeros((), x.dtype))


def magnitude_threshold(x: Array, tau: Array) -> Array:
    """Threshold pairs for TEAL/CATS-style ``|x| > τ`` (τ compared in x's dtype, as the jnp path does)."""
    tau = jnp.asarray(tau).astype(x.dtype)
    t = jnp.where(tau < 0, -1, magnitude_bits(tau))  # τ < 0 keeps everything
    return jnp.broadcast_to(jnp.stack([t, jnp.zeros_like(t)], axis=-1), (*x.shape[:-1], 2))


# ----------------------------------------------------------------------------- jnp twin
def topk_threshold_reference(x: Array, k: int | Array) -> Array:
    """Threshold pairs ``[..., 2]`` of exact Top-K by |x|; t is the k-th largest magnitude's bits.

    Float64 inputs bisect on 63-bit patterns (exactness tests). 31 fixed counting passes, no sort;
    k may be traced.
    """
    bits = magnitude_bits(x)
    it = bits.dtype
    steps = 63 if it == jnp.int64 else 31
    k = jnp.asarray(k, it)
    lo = jnp.zeros(x.shape[:-1], it)
    hi = jnp.max(bits, axis=-1)

    def step(_, bounds):  # invariant: count(bits >= lo) >= k; find the largest such lo
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(bits >= mid[..., None], axis=-1, dtype=it) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    t, _ = jax.lax.fori_loop(0, steps, step, (lo, hi))
    tied = bits == t[..., None]
    room = k - jnp.sum(bits > t[..., None], axis=-1, dtype=it)
    # index cut: one past the room-th tied entry (all of them when they fit)
    rank = jnp.cumsum(tied, axis=-1, dtype=it)
    m = jnp.sum(rank < room[..., None], axis=-1, dtype=it) + 1
    m = jnp.where(jnp.sum(tied, axis=-1, dtype=it) <= room, x.shape[-1], m)
    return jnp.stack([t, m], axis=-1)


# ----------------------------------------------------------------------------- keep sets
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KeepSet:
    """Which entries of each row stay: threshold pairs, plus (from the GPU kernel, one row) the kept
    indices compacted in front of ``order`` and the kept count in ``packed``, which the gather GEMV reads."""

    thr: Array  # [..., 2] threshold pairs
    order: Array | None = None  # [1, dp]: kept indices ascending, then the dropped ones
    packed: Array | None = None  # [1, 4]: (t, m, number kept, 0) as the kernel wrote it
    # (whole kernel outputs, not slices: a slice handed to the next Pallas call is first copied by XLA)


MAG_BITS, MAX_D = 15, 1 << 15  # magnitude bits of a bf16; widest row


def _select_kernel(k_ref, thr_ref, x_ref, thr_out, order_out, *, d, dp, search):
    """Top-K threshold pair (``search``) or a given one, then the compacted kept indices.

    Search: bisection over the 15 magnitude bits of a bf16 (15 dependent reductions; on an H200 a
    k-ary search counting 7 candidates per step in one [8, D] reduction ran slower), then ties at
    the k-th magnitude are cut towards lower indices with one cumulative count.
    Compaction: a cumulative count gives each kept entry its rank; kept indices go to the front of
    ``order`` in ascending order, dropped ones after them (a permutation: no masked stores).
    """
    row = pl.program_id(0)
    idx = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    # the row, read as a power of two wide (Triton's shapes) with a masked load: no padded copy
    x = pltriton.load(x_ref.at[pl.ds(row, 1), pl.ds(0, dp)], mask=idx < d, other=0.0)
    bits = jnp.where(idx < d, magnitude_bits(x), -1)  # padding: below every threshold >= 0
    if search:
        k = k_ref[0]
        mag = jnp.where(idx < d, jax.lax.shift_right_logical(bits, 16), -1)  # bf16 bits (exact for bf16 x)
        lo = jnp.int32(0)  # invariant: count(mag >= lo) >= k
        for bit in range(MAG_BITS - 1, -1, -1):
            mid = lo + (1 << bit)
            lo = jnp.where(jnp.sum((mag >= mid).astype(jnp.int32)) >= k, mid, lo)
        tied = mag == lo
        room = k - jnp.sum((mag > lo).astype(jnp.int32))  # >= 1
        rank = jnp.cumsum(tied.astype(jnp.int32), axis=1)
        t = jax.lax.shift_left(lo, 16)  # float32 bits of the k-th |x|
        m = jnp.sum((rank < room).astype(jnp.int32)) + 1  # one past the room-th tied entry
    else:
        t, m = thr_ref[row, 0], thr_ref[row, 1]
    keep = (bits > t) | ((bits == t) & (idx < m))
    rank = jnp.cumsum(keep.astype(jnp.int32), axis=1)  # inclusive
    n = jnp.sum(keep.astype(jnp.int32))
    pos = jnp.where(keep, rank - 1, n + idx - rank)
    pltriton.store(order_out.at[row, pos[0]], idx[0])
    col = jax.lax.broadcasted_iota(jnp.int32, (1, 4), 1)  # Triton wants power-of-two shapes: (t, m, n, 0)
    thr_out[pl.ds(row, 1), :] = jnp.where(col == 0, t, jnp.where(col == 1, m, jnp.where(col == 2, n, 0)))


def supported(x: Array) -> bool:
    return x.dtype == jnp.bfloat16 and x.shape[-1] <= MAX_D


def select_kernel(x: Array, k: Array | None = None, thr: Array | None = None, *, warps: int | None = None
                  ) -> tuple[Array, Array]:
    """One program per bf16 row of ``x [R, D]``: Top-K of ``k`` (or the given pairs ``thr [R, 2]``) →
    (``[R, 4]`` = threshold pair, kept count, 0; ``[R, dp]`` kept indices first)."""
    r, d = x.shape
    dp = max(1 << (d - 1).bit_length(), 16)
    warps = warps or (4 if dp <= 2048 else 8 if dp <= 8192 else 16)
    search = thr is None
    kk = jnp.asarray(1 if k is None else k, jnp.int32).reshape(1)
    thr = jnp.zeros((r, 2), jnp.int32) if thr is None else thr.astype(jnp.int32)
    return pl.pallas_call(
        functools.partial(_select_kernel, d=d, dp=dp, search=search),
        out_shape=[jax.ShapeDtypeStruct((r, 4), jnp.int32), jax.ShapeDtypeStruct((r, dp), jnp.int32)],
        grid=(r,),  # whole-array refs, indexed by the program's row
        compiler_params=triton_params(num_warps=warps, num_stages=1),
        interpret=interpret(),
    )(kk, thr, x)


def topk_threshold_kernel(x: Array, k: Array, **kw) -> Array:
    """Kernel threshold pairs ``[R, 2]`` for bf16 rows ``x [R, D]``."""
    return select_kernel(x, k, **kw)[0][:, :2]


def check_k(k, d: int) -> None:
    """k must lie in [1, D] (checked when k is known at trace time)."""
    try:
        kv = int(k)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    if not 1 <= kv <= d:
        raise ValueError(f"Top-K k={kv} for a vector of width D={d}: k must be in [1, {d}]")


def topk_threshold(x: Array, k: int | Array) -> Array:
    """Threshold pairs ``[..., 2]`` of exact per-row Top-K: the kernel on GPU, the jnp twin elsewhere."""
    check_k(k, x.shape[-1])
    if not (enabled("select") and supported(x)):
        return topk_threshold_reference(x, k)
    lead = x.shape[:-1]
    thr = topk_threshold_kernel(x.reshape(-1, x.shape[-1]), k)
    return thr.reshape(*lead, 2)


def _one_row(x: Array) -> bool:
    return x.ndim >= 1 and int(np.prod(x.shape[:-1])) == 1


def select_topk(x: Array, k: int | Array) -> KeepSet:
    """Top-K keep set of each row. On GPU, for one bf16 row (batch-1 decode), one kernel also
    compacts the kept indices for the gather GEMV."""
    check_k(k, x.shape[-1])
    if enabled("select") and supported(x) and _one_row(x):
        packed, order = select_kernel(x.reshape(1, -1), k)
        return KeepSet(packed[:, :2].reshape(*x.shape[:-1], 2), order, packed)
    return KeepSet(topk_threshold(x, k))


def select_threshold(x: Array, tau: Array) -> KeepSet:
    """TEAL/CATS ``|x| > τ`` keep set; compacted on GPU for one bf16 row, like :func:`select_topk`."""
    return select_pairs(x, magnitude_threshold(x, tau))


def select_pairs(x: Array, thr: Array) -> KeepSet:
    """The keep set of given threshold pairs ``thr [..., 2]``; compacted on GPU for one bf16 row."""
    if enabled("select") and supported(x) and _one_row(x):
        packed, order = select_kernel(x.reshape(1, -1), thr=thr.reshape(1, 2))
        return KeepSet(thr, order, packed)
    return KeepSet(thr)


def topk(x: Array, k: int | Array) -> Array:
    """Keep exactly the k entries of largest |x| along the last axis (ties: lower index first)."""
    return apply(x, topk_threshold(x, k))

