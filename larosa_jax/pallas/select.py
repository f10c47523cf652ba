"""Per-token Top-K selection as a *threshold pair*, so the sparse GEMV can apply it on the fly.

A row's keep set is described by ``thr = (t, m)`` (int32): with ``b = bits(|x| as float32)``
(monotone in |x| for non-negative floats), entry i is kept when ``b_i > t or (b_i == t and i < m)``.
Top-K (exactly k entries, ties at the k-th magnitude broken towards lower indices) and TEAL's
magnitude threshold (``|x| > τ``: t = bits(τ), m = 0) are both such pairs, so one GEMV kernel
serves every method without materialising the masked vector.

The kernel (bf16 rows) bisects the magnitude bits of a bf16, within a two-octave window guessed
from the row's mean |x| when one count confirms the k-th magnitude lies there (else all 15 bits),
cuts ties with a cumulative count and optionally compacts the kept indices for the gather GEMV, a
row's compaction split over several programs; the jnp twin bisects the float32 bits. A one-row
selection is bound by latency and leaves most SMs idle, so spare programs of the same launch do
independent work beside it: zero-filling the next GEMV's accumulator, and (``Side``, the decode
plan's ``adapter=side``) dense tiles of La RoSA's residual adapter product r·A (``fusion.py``), which
streams while the down selection searches.
A ``Norm`` prologue lets the kernel make its row from the layer's float32 accumulators first (the
residual add and RMSNorm before q/k/v and gate/up), in place of XLA's small fusions between the
launches; ``Gated`` (SiLU(gate)·up before down) is made by its jnp twin before the selection.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .common import gated, interpret, rms_normalize, triton_params

Array = jax.Array


def magnitude_bits(x: Array) -> Array:
    """Bit pattern of |x|, ordered like |x|: int32 of float32 (int64 of float64 for float64 x)."""
    if x.dtype == jnp.float64:
        return jax.lax.bitcast_convert_type(jnp.abs(x), jnp.int64)
    return jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)


def pair_keeps(bits: Array, idx: Array, t: Array, m: Array) -> Array:
    """The threshold pair's rule: entry ``idx`` with magnitude bits ``bits`` is kept (jnp and kernels)."""
    return (bits > t) | ((bits == t) & (idx < m))


def keep_mask(x: Array, thr: Array) -> Array:
    """Boolean keep mask of ``x [..., D]`` for threshold pairs ``thr [..., 2]``."""
    b = magnitude_bits(x)
    t, m = thr[..., 0:1].astype(b.dtype), thr[..., 1:2].astype(b.dtype)
    return pair_keeps(b, jax.lax.broadcasted_iota(b.dtype, x.shape, x.ndim - 1), t, m)


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


def window_hits(x: Array, k: int | Array) -> Array:
    """Whether the kernel's window search (option "window") finds each row's k-th largest |x| inside its
    window, so that it skips the top bits' bisection: the kernel's test (its packed column 3) in jnp, for
    measuring on real activations (eval/select_window.py). x is rounded to bf16 as the kernel reads it;
    the kernel sums |x| in another order, so on a GPU its window may start one code off in rare rows."""
    d = x.shape[-1]
    xb = x.astype(jnp.bfloat16)
    k = jnp.asarray(k, jnp.int32)
    mag = jax.lax.shift_right_logical(magnitude_bits(xb), 16)
    w = window_base(xb.astype(jnp.float32), k, d)
    c_lo = jnp.sum(mag >= w, axis=-1, dtype=jnp.int32)
    c_top = jnp.sum(mag >= w + (1 << WINDOW_BITS), axis=-1, dtype=jnp.int32)
    return (c_lo >= k) & (c_top < k)


# ----------------------------------------------------------------------------- keep sets
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KeepSet:
    """Which entries of each row stay: threshold pairs, plus what the GPU kernel writes for one row
    (batch-1 decode): the kept count in ``packed``, the kept indices compacted in front of ``order``
    (for the gather GEMV) and the zero-filled float32 accumulator ``zeros`` of the GEMV that follows."""

    thr: Array  # [..., 2] threshold pairs
    packed: Array | None = None  # [1, 4]: (t, m, number kept, window hit) as the kernel wrote it
    order: Array | None = None  # [1, dp]: kept indices ascending, then the dropped ones
    zeros: Array | None = None  # [width] float32 zeros
    side: Array | None = None  # [N] float32 sum of a residual product r·A (``Side``): zeros, or r·A
    x: Array | None = None  # the row the keep set was chosen on, when a prologue computed it (the GEMV's input)
    h: Array | None = None  # the rounded residual stream h (+ add) of a Norm prologue
    # (whole kernel outputs, not slices: a slice handed to the next Pallas call is first copied by XLA)


# ----------------------------------------------------------------------------- prologues
@dataclasses.dataclass(frozen=True)
class Norm:
    """Select on ``rms_normalize(h + add, eps, gain)``: h and add (float32 accumulators, or already in
    ``dtype``) are first rounded to ``dtype``, as the layer's own casts would; the rounded sum is the
    new residual (``KeepSet.h``). Before q/k/v (add = the previous layer's down output when that layer
    has no adapter: Top-K, La RoSA's last layer) and gate/up (add = the o output)."""

    eps: float
    dtype: object
    add: Array | None = None
    gain: Array | None = None

    def width(self, x: Array) -> int:
        return x.shape[-1]

    def reference(self, x: Array) -> tuple[Array, Array]:
        h = x.astype(self.dtype)
        if self.add is not None:
            h = h + self.add.astype(self.dtype)
        return rms_normalize(h, self.eps, self.gain), h


@dataclasses.dataclass(frozen=True)
class Gated:
    """Select on SiLU(g)·u for ``x = [g | u]`` side by side (the gate/up GEMV's one output buffer, float32
    or ``dtype``), g and u rounded to ``dtype`` first. Before down; always the jnp twin (inside the
    selection kernel, on the one SM a row's search uses, it was slower than XLA's fusion)."""

    dtype: object

    def width(self, x: Array) -> int:
        return x.shape[-1] // 2

    def reference(self, x: Array) -> tuple[Array, None]:
        g, u = jnp.split(x, 2, axis=-1)
        return gated(g.astype(self.dtype), u.astype(self.dtype)), None


def residual_product(rv: Array, a: Array) -> Array:
    """``r @ A`` accumulated (and returned) in float32, float64 for float64 models."""
    return jnp.dot(rv.astype(a.dtype), a, preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Side:
    """La RoSA's residual adapter product r·A (``A [K, N]``), added onto the float32 sum ``acc`` by spare
    programs of a one-row selection launch while its row is searched (``adapter=side``). ``acc`` None: the
    launch only zero-fills the sum ``[N]`` (programs of one launch run in no set order, so the zeros
    come from an earlier launch than the product's atomic adds)."""

    a: Array
    acc: Array | None = None
    r: Array | None = None

    def reference(self, lead: tuple[int, ...]) -> Array:
        """The jnp twin for rows of leading shape ``lead``: zeros, or ``acc + r @ A``."""
        if self.acc is None:
            return jnp.zeros((*lead, self.a.shape[1]), jnp.promote_types(self.a.dtype, jnp.float32))
        return self.acc.reshape(*lead, -1) + residual_product(self.r, self.a)


def side_fits(a: Array | None, x: Array) -> bool:
    """Whether spare programs of the down selection can make the adapter ``A [K, N]``'s product for the
    row ``x`` (one decode row, a bf16 A that tiles); else the down GEMV's launch takes it (``tail``
    tiles) or XLA's dot."""
    return (a is not None and _one_row(x) and a.dtype == jnp.bfloat16 and a.ndim == 2 and a.shape[0] % SBM == 0
            and a.shape[1] % 64 == 0)


MAG_BITS, MAX_D = 15, 1 << 15  # magnitude bits of a bf16; widest row
# The search window (option "window"): 2^8 bf16 codes span two octaves of |x|; its low end sits
# 2^-1.25 below the Laplace guess. On SmolLM2's real rows the k-th magnitude over mean|x|·ln(D/k) lay
# within 2^-2.2 … 2^0.65 (1st/99th percentiles, any site, p = 0.25-0.5; most sites far narrower), on
# Gaussian rows it is 2^-0.2 … 2^0.6 for keep fractions 0.1-0.9.
WINDOW_BITS, WINDOW_LOW = 8, 2.0 ** -1.25


ZB = 1024  # zero-fill chunk per spare program
CHUNK = 1024  # compaction: entries whose positions one program stores
# side tiles of r·A, rows × columns, one per program: beside the down selection's search (8 warps, a
# register-heavy row) few programs fit on an SM, so each carries a large tile (eval/results/NOTES.md).
SBM, SBN = 128, 256


def _select_kernel(arg_ref, x_ref, *refs, r, d, dp, search, window, compact, chunks, nz, side, pro, eps):
    """Top-K threshold pair (``search``) or a given one, then (``compact``) the compacted kept indices.

    Search: bisection over the 15 magnitude bits of a bf16 (15 dependent reductions; on an H200 a
    k-ary search counting 3 or 7 candidates per step in one reduction ran slower), or with ``window``
    over 8 of them when one check finds the answer in the guessed window (:func:`_window_search`),
    then ties at the k-th magnitude are cut towards lower indices with one cumulative count.
    Compaction: a cumulative count gives each kept entry its rank; kept indices go to the front of
    ``order`` in ascending order, dropped ones after them (a permutation). Each row has ``chunks``
    programs that all search it and each place one ``CHUNK``-wide slice of it (its kept count before the
    slice, a cumulative count within): one program compacting a whole row took 9 µs at D = 11008 on an
    H200, and the other SMs sit idle during a one-row selection anyway. The row's first program writes
    the pair and the prologue's outputs.
    Programs past the rows zero-fill float32 buffers (``nz`` entries, then with ``side`` = ("zeros", N)
    the side sum), or (``side`` = ("add", N, bn, bm)) each add the product of one ``bm × bn`` tile of
    r·A atomically onto the side sum.
    ``pro`` (a Norm prologue: "norm", "norm+add", "norm+gain" or "norm+add+gain") makes the row from
    the inputs first and writes it and the rounded residual out for the GEMV.
    """
    pro_refs = {}
    for name in _pro_inputs(pro):
        pro_refs[name], *refs = refs
    source = side[0] if side else None
    if source == "add":
        rv_ref, a_ref, _, *refs = refs  # the third: the side sum's input, aliased to its output
    thr_out, *outs = refs
    if pro:
        pro_refs["row"], pro_refs["h"] = outs[int(compact)], outs[int(compact) + 1]
    prog, start = pl.program_id(0), r * chunks
    fills = ([(outs[-2 if side else -1], nz)] if nz else []) + ([(outs[-1], side[1])] if source == "zeros" else [])
    for zero_out, n in fills:  # ZB entries per program

        @pl.when((prog >= start) & (prog < start + -(-n // ZB)))
        def _(zero_out=zero_out, n=n, start=start):
            z = (prog - start) * ZB + jax.lax.broadcasted_iota(jnp.int32, (ZB,), 0)
            pltriton.store(zero_out.at[z], jnp.zeros((ZB,), jnp.float32), mask=z < n)

        start += -(-n // ZB)

    if source == "add":
        _, n, bn, bm = side

        @pl.when(prog >= start)
        def _():
            t = prog - start
            j, i = t % (n // bn), t // (n // bn)
            pltriton.atomic_add(outs[-1], (pl.ds(pl.multiple_of(j * bn, bn), bn),), adapter_tile(rv_ref, a_ref, i, j, bm, bn))

    @pl.when(prog < r * chunks)
    def _():
        _select_row(prog // chunks, arg_ref, x_ref, thr_out, outs[0] if compact else None, d=d, dp=dp, search=search,
                    window=window, pro=pro, pro_refs=pro_refs, eps=eps, chunk=prog % chunks, chunks=chunks)


def adapter_tile(r_ref, a_ref, t, j, bm: int, bn: int) -> Array:
    """Float32 ``[bn]``: row tile t of the one-row residual r ``[1, K]`` times tile (t, j) of A: La RoSA's
    residual adapter r·A in dense tiles (beside a selection, ``side``, or in a GEMV's launch, ``tail``)."""
    rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
    w = a_ref[rows, pl.ds(pl.multiple_of(j * bn, bn), bn)]
    return jnp.sum(r_ref[:, rows][0][:, None].astype(jnp.float32) * w.astype(jnp.float32), axis=0)


def _pro_inputs(pro: str | None) -> list[str]:
    return [n for n in ("add", "gain") if pro and n in pro.split("+")]


def _make_row(ld, x_ref, row, *, pro, refs, d, eps, scale=None):
    """The selection's row (over the columns ``ld`` loads) from a Norm prologue's inputs:
    ``(row, the rounded residual h, its RMS scale)``. A slice of the row takes the whole row's
    ``scale``, so it holds the very values the whole row does."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    h = ld(x_ref, row).astype(bf16)
    if "add" in refs:
        h = (h.astype(f32) + ld(refs["add"], row).astype(bf16).astype(f32)).astype(bf16)
    hf = h.astype(f32)
    if scale is None:
        scale = jax.lax.rsqrt(jnp.sum(hf * hf) / d + eps)
    y = (hf * scale).astype(bf16)
    if "gain" in refs:
        y = (y.astype(f32) * ld(refs["gain"], 0).astype(f32)).astype(bf16)
    return y, h, scale


def _loader(c0: int | Array, width: int, d: int):
    """Masked loads of columns ``[c0, c0 + width)`` of one row of a ref (zeros past D)."""
    cols = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    return lambda ref, i: pltriton.load(ref.at[pl.ds(i, 1), pl.ds(c0, width)], mask=cols < d, other=0.0)


def _prologue(row, x_ref, idx, *, d, dp, pro, refs, eps, lead):
    """The whole row from a Norm prologue's inputs, stored with the rounded residual for the GEMV by the
    row's ``lead`` program; returns (row, RMS scale)."""
    valid = idx < d
    y, h, scale = _make_row(_loader(0, dp, d), x_ref, row, pro=pro, refs=refs, d=d, eps=eps)
    pltriton.store(refs["h"].at[pl.ds(row, 1), pl.ds(0, dp)], h, mask=valid & lead)
    pltriton.store(refs["row"].at[pl.ds(row, 1), pl.ds(0, dp)], y, mask=valid & lead)
    return y, scale


def _bisect(mag: Array, k: Array, lo: Array, top: int, bottom: int) -> Array:
    """Decide bits ``top - 1 … bottom`` above ``lo``: the largest ``lo + j·2^bottom`` (j < 2^(top - bottom))
    with count(mag >= it) >= k, given that lo satisfies it (one dependent reduction per bit)."""
    for bit in range(top - 1, bottom - 1, -1):
        mid = lo + (1 << bit)
        lo = jnp.where(jnp.sum((mag >= mid).astype(jnp.int32)) >= k, mid, lo)
    return lo


def window_base(x: Array, k: Array, d: int) -> Array:
    """The window's lowest bf16 magnitude code: mean|x| · ln(D/k) (the k-th largest |x| of a Laplace row)
    times ``WINDOW_LOW``. Shared by the kernel and :func:`window_hits` (x: float32 ``[..., D]``, zero padded)."""
    g = jnp.sum(jnp.abs(x), axis=-1, keepdims=True) / d * jnp.log(d / k.astype(jnp.float32)) * WINDOW_LOW
    return jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(g, jnp.int32), 16)


def _window_search(x: Array, mag: Array, k: Array, d: int) -> tuple[Array, Array]:
    """Bisection inside a window of ``2^WINDOW_BITS`` codes guessed from the row's mean |x|, after one
    check that the k-th magnitude lies in it (both counts in one reduction); outside it, the top bits are
    bisected first as without a window. Exact either way; (k-th magnitude code, 1 if inside)."""
    w = window_base(x.astype(jnp.float32), k, d)  # [1, 1]
    top = w + (1 << WINDOW_BITS)
    # both counts (<= MAX_D = 2^15) in one int32 sum: low and high 16 bits (read back unsigned)
    c = jnp.sum((mag >= w).astype(jnp.int32) + jax.lax.shift_left((mag >= top).astype(jnp.int32), 16))
    c_lo, c_top = c & 0xFFFF, jax.lax.shift_right_logical(c, 16)
    inside = (c_lo >= k) & (c_top < k)
    w = jnp.sum(w)  # the scalar
    lo = jax.lax.cond(inside, lambda: w, lambda: _bisect(mag, k, jnp.int32(0), MAG_BITS, WINDOW_BITS))
    return _bisect(mag, k, lo, WINDOW_BITS, 0), inside.astype(jnp.int32)


def _select_row(row, arg_ref, x_ref, thr_out, order_out, *, d, dp, search, window=False, pro=None, pro_refs=None, eps=0.0,
                chunk=0, chunks=1):
    idx = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    lead = chunk == 0  # the row's program that writes the pair and the prologue's outputs
    if pro:
        x, scale = _prologue(row, x_ref, idx, d=d, dp=dp, pro=pro, refs=pro_refs, eps=eps, lead=lead)
    else:  # the row, read as a power of two wide (Triton's shapes) with a masked load: no padded copy
        x = pltriton.load(x_ref.at[pl.ds(row, 1), pl.ds(0, dp)], mask=idx < d, other=0.0)
    bits = jnp.where(idx < d, magnitude_bits(x), -1)  # padding: below every threshold >= 0
    inside = jnp.int32(0)
    if search:
        k = arg_ref[0]
        mag = jnp.where(idx < d, jax.lax.shift_right_logical(bits, 16), -1)  # bf16 bits (exact for bf16 x)
        if window:
            lo, inside = _window_search(x, mag, k, d)
        else:
            lo = _bisect(mag, k, jnp.int32(0), MAG_BITS, 0)
        tied = mag == lo
        room = k - jnp.sum((mag > lo).astype(jnp.int32))  # >= 1
        rank = jnp.cumsum(tied.astype(jnp.int32), axis=1)
        t = jax.lax.shift_left(lo, 16)  # float32 bits of the k-th |x|
        m = jnp.sum((rank < room).astype(jnp.int32)) + 1  # one past the room-th tied entry
    else:
        t, m = arg_ref[row, 0], arg_ref[row, 1]
    keep = pair_keeps(bits, idx, t, m)
    n = jnp.sum(keep.astype(jnp.int32))
    if order_out is not None:  # this program's slice of the row: its entries' places in the permutation
        cw = dp // chunks
        c0 = pl.multiple_of(chunk * cw, cw)
        cidx = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, cw), 1)
        ld = _loader(c0, cw, d)
        if pro:
            xc = _make_row(ld, x_ref, row, pro=pro, refs=pro_refs, d=d, eps=eps, scale=scale)[0]
        else:
            xc = ld(x_ref, row)
        cbits = jnp.where(cidx < d, magnitude_bits(xc), -1)
        ckeep = pair_keeps(cbits, cidx, t, m)
        rank = jnp.sum((keep & (idx < c0)).astype(jnp.int32)) + jnp.cumsum(ckeep.astype(jnp.int32), axis=1)  # inclusive
        pos = jnp.where(ckeep, rank - 1, n + cidx - rank)
        pltriton.store(order_out.at[row, pos[0]], cidx[0])
    col = jax.lax.broadcasted_iota(jnp.int32, (1, 4), 1)  # Triton wants power-of-two shapes: (t, m, n, in window)
    pair = jnp.where(col == 0, t, jnp.where(col == 1, m, jnp.where(col == 2, n, inside)))
    pltriton.store(thr_out.at[pl.ds(row, 1), :], pair, mask=jnp.broadcast_to(lead, (1, 4)))


def supported(x: Array) -> bool:
    return x.dtype == jnp.bfloat16 and x.shape[-1] <= MAX_D


def side_unsupported(side: Side, r: int) -> str | None:
    """Why spare programs cannot make this side sum (None when they can)."""
    a = side.a
    if a.dtype != jnp.bfloat16 or a.ndim != 2 or a.shape[0] % SBM or a.shape[1] % 64:
        return f"A {tuple(a.shape)} {a.dtype} (a bf16 A [K, N] with K % {SBM} == 0 and N % 64 == 0)"
    k, n = a.shape
    if r != 1:
        return f"{r} rows selected (one)"
    if side.acc is not None and (side.acc.dtype != jnp.float32 or side.acc.size != n):
        return f"a sum {tuple(side.acc.shape)} {side.acc.dtype} (float32 [{n}])"
    if side.acc is not None and (side.r is None or side.r.size != k):
        return f"a residual r {None if side.r is None else tuple(side.r.shape)} (one row of width {k})"
    return None


def select_kernel(x: Array, k: Array | None = None, thr: Array | None = None, *, compact: bool = True,
                  zeros: int = 0, side: Side | None = None, warps: int | None = None,
                  prologue: Norm | None = None, window: bool = True, chunk: int | None = None) -> list[Array]:
    """One program per row of ``x [R, D]`` (D/chunk when compacting; bf16, or with a Norm ``prologue`` its
    inputs, of any float dtype, from which the bf16 rows are made): Top-K of ``k`` (or the given pairs
    ``thr [R, 2]``) → ``[R, 4]`` (threshold pair, kept count, 1 where a ``window`` search found the k-th
    magnitude inside its window, else 0), then ``[R, dp]`` kept indices first (``compact``), then the
    prologue's rows ``[R, D]`` and rounded residuals ``[R, D]``, then a float32 zero buffer ``[zeros]``
    (when ``zeros`` > 0), then ``side``'s float32 sum ``[N]`` (zeros, or its ``acc`` plus r·A; see
    :class:`Side`), both made by spare programs. ``chunk``: entries per compacting program, a power of
    two (default ``CHUNK`` on GPU, the whole row in interpret mode, which runs programs one after
    another)."""
    if isinstance(prologue, Gated):
        raise ValueError("select_kernel: a Gated prologue runs in its jnp twin (Gated.reference), not in the kernel")
    r = x.shape[0]
    d = x.shape[1]
    dp = max(1 << (d - 1).bit_length(), 16)
    warps = warps or (4 if dp <= 2048 else 8 if dp <= 16384 else 16)  # H200: 8 beat 4 and 16 at D = 4096, 11008
    search = thr is None
    why = None if side is None else side_unsupported(side, r)
    if why is not None:
        raise ValueError(f"select_kernel: side with {why}")
    # one small operand: k, or the pairs
    arg = jnp.asarray(k, jnp.int32).reshape(1) if search else thr.astype(jnp.int32)
    shapes = [jax.ShapeDtypeStruct((r, 4), jnp.int32)]
    shapes += [jax.ShapeDtypeStruct((r, dp), jnp.int32)] if compact else []
    operands = [arg, x]
    pro = None
    if prologue is not None:
        pro = "+".join(["norm"] + [n for n in ("add", "gain") if getattr(prologue, n) is not None])
        if prologue.add is not None:
            operands.append(prologue.add.reshape(r, d))
        if prologue.gain is not None:
            operands.append(prologue.gain.reshape(1, d))
        shapes += [jax.ShapeDtypeStruct((r, d), jnp.bfloat16)] * 2
    shapes += [jax.ShapeDtypeStruct((zeros,), jnp.float32)] if zeros else []
    spare = -(-zeros // ZB)
    side_meta, aliases = None, {}
    if side is not None:
        n = side.a.shape[1]
        shapes.append(jax.ShapeDtypeStruct((n,), jnp.float32))
        if side.acc is None:
            side_meta, spare = ("zeros", n), spare + -(-n // ZB)
        else:
            bn = next(b for b in (SBN, 128, 64) if n % b == 0)
            side_meta = ("add", n, bn, SBM)
            spare += side.a.shape[0] // SBM * (n // bn)
            aliases = {len(operands) + 2: len(shapes) - 1}
            operands += [side.r.reshape(1, -1).astype(side.a.dtype), side.a, side.acc.reshape(n)]
    eps = float(prologue.eps) if prologue is not None else 0.0
    if chunk is not None and (chunk < 1 or chunk & (chunk - 1)):
        raise ValueError(f"select_kernel: chunk={chunk}; entries per compacting program must be a power of two")
    chunks = dp // min(dp, chunk or (dp if interpret() else CHUNK)) if compact else 1
    return pl.pallas_call(
        functools.partial(_select_kernel, r=r, d=d, dp=dp, search=search, window=window, compact=compact, chunks=chunks,
                          nz=zeros, side=side_meta, pro=pro, eps=eps),
        out_shape=shapes,
        grid=(r * chunks + spare,),  # whole-array refs: row = program // chunks, then the spare programs
        input_output_aliases=aliases,
        compiler_params=triton_params(num_warps=warps, num_stages=1),
        interpret=interpret(),
    )(*operands)


def topk_threshold_kernel(x: Array, k: Array, **kw) -> Array:
    """Kernel threshold pairs ``[R, 2]`` for bf16 rows ``x [R, D]``."""
    return select_kernel(x, k, compact=False, **kw)[0][:, :2]


def check_k(k, d: int) -> None:
    """k must lie in [1, D] (checked when k is known at trace time)."""
    try:
        kv = int(k)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    if not 1 <= kv <= d:
        raise ValueError(f"Top-K k={kv} for a vector of width D={d}: k must be in [1, {d}]")


def topk_threshold(x: Array, k: int | Array, *, kernel: bool = False, window: bool = False) -> Array:
    """Threshold pairs ``[..., 2]`` of exact per-row Top-K: with ``kernel`` the selection kernel on bf16
    rows (``window``: its search starts in a guessed window), the jnp twin otherwise."""
    check_k(k, x.shape[-1])
    if not (kernel and supported(x)):
        return topk_threshold_reference(x, k)
    lead = x.shape[:-1]
    thr = topk_threshold_kernel(x.reshape(-1, x.shape[-1]), k, window=window)
    return thr.reshape(*lead, 2)


def _one_row(x: Array) -> bool:
    return x.ndim >= 1 and int(np.prod(x.shape[:-1])) == 1


def _kernel_keep(thr: Array, outs: list[Array], compact: bool, width: int, side: bool, norm: bool) -> KeepSet:
    i = 1 + int(compact)
    row = h = None
    if norm:
        row, h, i = outs[i], outs[i + 1], i + 2
    return KeepSet(thr, outs[0], outs[1] if compact else None, outs[i] if width else None,
                   outs[-1] if side else None, row, h)


def select_topk(x: Array, k: int | Array, width: int = 0, side: Side | None = None,
                prologue: Norm | Gated | None = None, *, kernel: bool = False, compact: bool = False,
                window: bool = False, prologue_kernel: bool = False) -> KeepSet:
    """Top-K keep set of each row. With ``kernel`` (the site plan's ``select``), for one bf16 row
    (batch-1 decode), one selection kernel also writes what the sparse GEMV reads: the compacted kept
    indices (``compact``: for the gather GEMV) and its float32 accumulator, zeros of the GEMV's total
    output ``width`` (0: none), and, beside the search, ``side``'s sum: zeros, or a residual product
    r·A added onto its ``acc`` (``KeepSet.side``; the jnp twin where the kernel does not run).
    ``window``: the kernel's search starts in a window guessed from mean|x|.

    With a ``prologue`` x holds its inputs and the keep set is chosen on the row it makes (returned
    as ``KeepSet.x``, a Norm's rounded residual as ``KeepSet.h``): a Norm inside the kernel with
    ``prologue_kernel``, else the prologue's jnp twin before the selection."""
    d = x.shape[-1] if prologue is None else prologue.width(x)
    check_k(k, d)
    if side is not None and side.acc is not None and side.r is None:
        raise ValueError("select_topk: a side that adds r·A onto its sum needs the residual r")
    if prologue is not None and not (kernel and prologue_kernel and _norm_in_kernel(x, d, prologue)):
        row, h = prologue.reference(x)
        keep = select_topk(row, k, width, side, kernel=kernel, compact=compact, window=window)
        return dataclasses.replace(keep, x=row, h=h)
    if prologue is None and not (kernel and _one_row(x) and supported(x)):
        return KeepSet(topk_threshold(x, k, kernel=kernel, window=window),
                       side=None if side is None else side.reference(x.shape[:-1]))
    tiles = side is not None and side_unsupported(side, 1) is None
    outs = select_kernel(x.reshape(1, -1), k, compact=compact, zeros=width, side=side if tiles else None,
                         prologue=prologue, window=window)
    lead = x.shape[:-1]
    keep = _kernel_keep(outs[0][:, :2].reshape(*lead, 2), outs, compact, width, tiles, prologue is not None)
    if prologue is not None:
        keep = dataclasses.replace(keep, x=keep.x.reshape(*lead, d), h=keep.h.reshape(*lead, d))
    if side is not None and not tiles:
        keep = dataclasses.replace(keep, side=side.reference(lead))
    return keep


def select_threshold(x: Array, tau: Array, width: int = 0, prologue: Norm | Gated | None = None,
                     pairs: Array | None = None, *, kernel: bool = False) -> KeepSet:
    """TEAL/CATS ``|x| > τ`` keep set.

    With a ``prologue`` (TEAL in the decoder) the threshold applies to the row it makes. With
    ``kernel`` (the site plan's ``select`` and ``prologue``) a Norm prologue runs in the selection
    kernel without the search: the given pair, the row, the residual and the GEMV's zeroed
    accumulator in one launch; otherwise the prologue's jnp twin makes the row. ``pairs``: τ's
    threshold pair ``[1, 2]`` for the row's dtype, made once ahead (state), so that no XLA op turns τ
    into it at every decode step. The kept indices are never compacted here: the masked-tile GEMV
    reads the pair in place, so the o and down sites need no selection launch at all."""
    lead = x.shape[:-1]

    def thr_of(row):
        return magnitude_threshold(row, tau) if pairs is None else jnp.broadcast_to(pairs, (*lead, 2))

    if prologue is None:
        return KeepSet(thr_of(x))
    d = prologue.width(x)
    if not (kernel and _norm_in_kernel(x, d, prologue)):
        row, h = prologue.reference(x)
        return KeepSet(thr_of(row), x=row, h=h)
    thr = thr_of(jnp.zeros((*lead, 1), prologue.dtype))  # τ rounded as the row will be
    outs = select_kernel(x.reshape(1, -1), thr=thr.reshape(1, 2), compact=False, zeros=width, prologue=prologue)
    keep = _kernel_keep(thr, outs, False, width, False, True)
    return dataclasses.replace(keep, x=keep.x.reshape(*lead, d), h=keep.h.reshape(*lead, d))


def _norm_in_kernel(x: Array, d: int, prologue: Norm | Gated) -> bool:
    """Whether the selection kernel can make the prologue's row: a Norm, one row, bf16, D <= MAX_D."""
    return isinstance(prologue, Norm) and _one_row(x) and d <= MAX_D and prologue.dtype == jnp.bfloat16


def topk(x: Array, k: int | Array) -> Array:
    """Keep exactly the k entries of largest |x| along the last axis (ties: lower index first)."""
    return apply(x, topk_threshold(x, k))

