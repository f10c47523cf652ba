"""Sparse decode GEMVs: y_i = keep(x)·W_i reading only the weight rows of kept entries.

W is input-major ``[D_in, D_out]``, so a dropped input entry is a whole weight row that need not
leave HBM. Both kernels run one program per weight tile with no loop and add their float32 partial
products atomically into one buffer holding every output side by side, zeroed by the selection
kernel's spare programs. At a fused model's down site La RoSA's residual product r·A joins the same
sum: by default made by spare programs of the down selection's launch while it searches (``side``,
``select.Side``; the GEMV starts from that sum), else as extra dense tiles of the GEMV's own launch
(``tail``: 0.12 ms per token faster than XLA's dot in a Llama-2-7B decode on an H200), else XLA's dot.
Thousands of small programs keep enough loads in flight to stream at HBM speed without software
pipelining; a mask computed from loaded data defeats that pipelining, and a looping split-K kernel
with row masks ran no faster than dense on an H200 (eval/results/NOTES.md). Weights sharing one
input (q/k/v with Qwen2's biases, gate/up) share one launch and one keep set.

* Gather (:func:`gather_sums`; the batch-1 decode path after a Top-K selection, ``gemv=gather``):
  the selection kernel also compacts the kept indices (split over programs, 0.6-2.2 µs), and program
  (j, i) reads the ``GBM`` kept rows ``order[i·GBM : (i+1)·GBM]``, a dense tile of gathered rows. At
  Llama-2-7B's 50% sites it runs 1.4-4.2 µs per site faster than masked tiles (down at 73% with the
  adapter: 20.0 against 24.2 µs; run 12 in NOTES.md).
* Masked tiles (:func:`sums`; TEAL's given thresholds, and Top-K with ``gemv=masked``): program (j, i)
  takes rows ``[i·BM, (i+1)·BM)`` of column block j and loads those the token keeps, masked-off rows
  issuing no memory traffic; the products are CUDA-core FMAs over the whole tile, kept or not. It
  needs only the threshold pair, so TEAL's o and down sites need no selection launch at all. For
  several tokens it loads the rows any token keeps (the union) and multiplies on the tensor cores,
  but at 4 tokens and 50% sparsity that ran 1.4-1.6x slower than XLA's dense GEMM (random keep sets,
  whose union is ~94% dense; eval/results/kernels_h200.md), so several tokens take XLA's GEMM on the
  masked rows.
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .common import acc_dtype, interpret, triton_params
from .gemv import matvec
from .select import KeepSet, adapter_tile, apply, magnitude_bits, pair_keeps, residual_product

Array = jax.Array
# Tile and warps, chosen on an H200 (eval/results/NOTES.md): rows per program, columns per program.
BM, BN, WARPS = 128, 128, 4  # masked tiles
GBM, GBN, GWARPS = 64, 256, 8  # gathered tiles (at 512 columns q/k/v streamed 1.84 TB/s, gate/up at 256: 3.1)
# masked tiles for one token (bm, bn, warps): narrow launches (q/k/v, o and down of 7-8B models,
# up to NARROW outputs) ran 0.1-0.5 µs faster per call on smaller tiles, gate/up on larger ones
# (8 warps: 12-33% slower at Llama-2 sites)
WIDE_TILE, NARROW_TILE, NARROW = (128, 256, 4), (64, 128, 2), 12288
_warned: set[str] = set()


def _bn(ns: Sequence[int], bn: int) -> int:
    while bn > 64 and any(n % bn for n in ns):
        bn //= 2
    return bn


def unsupported(x: Array, ws: Sequence[jax.Array], bm: int = BM) -> str | None:
    """Why the kernel cannot take these operands (None when it can)."""
    k = x.shape[-1]
    ns = [w.shape[-1] for w in ws]
    if any(w.dtype != jnp.bfloat16 for w in ws):
        return f"weights of dtype {ws[0].dtype} (the kernel takes bfloat16)"
    if any(w.ndim != 2 or w.shape[0] != k for w in ws):
        return f"weights {[tuple(w.shape) for w in ws]} for an input of width {k}"
    if k % min(bm, 64) or any(n % 64 for n in ns):
        return f"D_in={k}, D_out={ns} (the kernel tiles D_in by 64 and D_out by 64)"
    return None


def _product(xs: Array, w: Array, rp: int) -> Array:
    """Float32 ``xs [rp, bm] @ w [bm, bn]`` → ``[rp, bn]``: for one token CUDA-core FMAs and one
    reduction (tensor cores on the row padded to 16 ran 7-20% slower at every Llama-2 site on an
    H200), for several the tensor cores."""
    if rp > 1:
        return jnp.dot(xs, w, preferred_element_type=jnp.float32)
    return jnp.sum(xs[0][:, None].astype(jnp.float32) * w.astype(jnp.float32), axis=0, keepdims=True)


def _kernel(thr_ref, x_ref, *refs, n_blocks, bn, bm, rp, n_rows, tail):
    """Program (j, i): rows ``[i·bm, (i+1)·bm)`` of column block j; with a ``tail`` = (r, A) the
    programs past the ``n_rows`` row tiles of x take the dense tiles of r·A into the same outputs."""
    m = len(n_blocks)
    w_refs, rest = refs[:m], refs[m:]
    if tail:
        r_ref, a_ref, rest = rest[0], rest[1], rest[2:]
    o_ref = rest[1]  # rest[0] is the zero input aliased to the output
    j, i = pl.program_id(0), pl.program_id(1)

    def add(acc):
        pltriton.atomic_add(o_ref, (slice(None), pl.ds(pl.multiple_of(j * bn, bn), bn)), acc)  # side by side

    @pl.when(i < n_rows)
    def _():
        rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
        xk = x_ref[:, rows]  # [rp, bm]
        b = magnitude_bits(xk)
        idx = i * bm + jax.lax.broadcasted_iota(jnp.int32, b.shape, 1)
        t, cut = thr_ref[:, pl.ds(0, 1)], thr_ref[:, pl.ds(1, 1)]  # [rp, 1]
        keep = pair_keeps(b, idx, t, cut)
        live = jnp.max(keep.astype(jnp.int32), axis=0) > 0  # [bm]: rows that any token keeps
        xs = jnp.where(keep, xk, jnp.zeros((), xk.dtype))
        first = 0
        for w_ref, nb in zip(w_refs, n_blocks):

            @pl.when((j >= first) & (j < first + nb) & (jnp.max(live.astype(jnp.int32)) > 0))
            def _(w_ref=w_ref, first=first):
                col = pl.ds(pl.multiple_of((j - first) * bn, bn), bn)
                w = pltriton.load(w_ref.at[rows, col], mask=jnp.broadcast_to(live[:, None], (bm, bn)), other=0.0)
                add(_product(xs, w, rp))

            first += nb

    if tail:

        @pl.when(i >= n_rows)
        def _():
            add(adapter_tile(r_ref, a_ref, i - n_rows, j, bm, bn)[None])


def sums(x: Array, thr: Array, ws: tuple[Array, ...], *, bm: int = BM, bn: int = BN, warps: int = WARPS,
         zeros: Array | None = None, tail: tuple[Array, Array] | None = None, split: bool = True) -> list[Array]:
    """Float32 ``keep(x)[R, K] @ w_i`` for every w_i ``[K, N_i]``, one launch; ``thr [R, >=2]`` (the
    selection kernel's packed rows do); ``zeros``: the zero-filled accumulator, if already made;
    ``tail = (r [1, K2], A [K2, N])`` (one token, one weight): the dense ``r @ A`` added by extra
    programs of the same launch (La RoSA's residual adapter); ``split=False``: the one buffer ``[R, ΣN_i]``."""
    r, k = x.shape
    rp = 1 if r == 1 else 16
    if tail is not None and (r != 1 or len(ws) != 1):
        raise ValueError(f"sums: a tail goes with one token and one weight, got {r} tokens and {len(ws)} weights")
    if rp != r:  # padding rows keep nothing: threshold above every bit pattern
        x = jnp.pad(x, ((0, rp - r), (0, 0)))
        thr = jnp.concatenate([thr[:, :2], jnp.tile(jnp.asarray([[np.iinfo(np.int32).max, 0]], jnp.int32), (rp - r, 1))])
    k2 = 0 if tail is None else tail[1].shape[0]
    while k % bm or k2 % bm:
        bm //= 2
    bn = _bn([w.shape[1] for w in ws], bn)
    n_blocks = tuple(w.shape[1] // bn for w in ws)
    total = sum(w.shape[1] for w in ws)
    operands = [thr.astype(jnp.int32), x, *ws]
    if tail is not None:
        operands += [tail[0].reshape(1, k2).astype(tail[1].dtype), tail[1]]
    y = pl.pallas_call(
        functools.partial(_kernel, n_blocks=n_blocks, bn=bn, bm=bm, rp=rp, n_rows=k // bm, tail=tail is not None),
        out_shape=jax.ShapeDtypeStruct((rp, total), jnp.float32),
        grid=(sum(n_blocks), (k + k2) // bm),
        input_output_aliases={len(operands): 0},
        compiler_params=triton_params(num_warps=warps, num_stages=1),
        interpret=interpret(),
    )(*operands, _zeros(zeros, (rp, total)))
    return _split(y[:r], ws) if split else [y[:r]]


def _zeros(zeros: Array | None, shape) -> Array:
    return jnp.zeros(shape, jnp.float32) if zeros is None else zeros[: int(np.prod(shape))].reshape(shape)


def _gather_kernel(packed_ref, order_ref, x_ref, *refs, n_blocks, bn, bm, n_rows, tail):
    """Program (j, i): kept rows ``order[i·bm : (i+1)·bm]`` of column block j; with a ``tail`` the programs
    past the ``n_rows`` row tiles take dense tiles of r·A into the same outputs (as :func:`_kernel`)."""
    m = len(n_blocks)
    w_refs, rest = refs[:m], refs[m:]
    if tail:
        r_ref, a_ref, rest = rest[0], rest[1], rest[2:]
    o_ref = rest[1]  # rest[0] is the zero input aliased to the output
    j, i = pl.program_id(0), pl.program_id(1)
    n = packed_ref[0, 2]  # number kept, as the selection kernel wrote it

    if tail:

        @pl.when(i >= n_rows)
        def _():
            col = pl.ds(pl.multiple_of(j * bn, bn), bn)
            pltriton.atomic_add(o_ref, (col,), adapter_tile(r_ref, a_ref, i - n_rows, j, bm, bn))

    @pl.when((i < n_rows) & (i * bm < n))  # programs past the kept count have nothing to do
    def _():
        pos = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        valid = pos < n
        rows = pltriton.load(order_ref.at[pl.ds(0, 1), pl.ds(pl.multiple_of(i * bm, bm), bm)], mask=valid[None],
                             other=0)[0]
        xv = pltriton.load(x_ref.at[rows], mask=valid, other=0.0).astype(jnp.float32)
        first = 0
        for w_ref, nb in zip(w_refs, n_blocks):

            @pl.when((j >= first) & (j < first + nb))
            def _(w_ref=w_ref, first=first):
                c0 = pl.multiple_of((j - first) * bn, bn)
                cols = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
                # gathered rows: array indices in both dims (what interpret mode can discharge too)
                w = pltriton.load(w_ref.at[rows[:, None], cols], mask=jnp.broadcast_to(valid[:, None], (bm, bn)), other=0.0)
                acc = jnp.sum(xv[:, None] * w.astype(jnp.float32), axis=0)
                pltriton.atomic_add(o_ref, (pl.ds(pl.multiple_of(j * bn, bn), bn),), acc)  # outputs side by side

            first += nb


def _split(y: Array, ws) -> list[Array]:
    """The outputs of the weights, stored side by side in one buffer (one zero-fill per launch)."""
    cuts = np.cumsum([w.shape[1] for w in ws])[:-1].tolist()
    return jnp.split(y, cuts, axis=-1)


def gather_sums(x: Array, order: Array, packed: Array, ws: tuple[Array, ...], *, bm: int = GBM, bn: int = GBN,
                warps: int = GWARPS, zeros: Array | None = None, tail: tuple[Array, Array] | None = None,
                split: bool = True) -> list[Array]:
    """Float32 ``x[kept] @ w_i[kept]`` for one row ``x [K]``, kept = ``order[0, :packed[0, 2]]`` (the
    selection kernel's outputs): only the kept rows are visited, in dense tiles of ``bm`` gathered rows
    (their count is known on the device only, so programs past it return at once); ``tail = (r, A)``
    (one weight) as in :func:`sums`."""
    k = x.shape[-1]
    if tail is not None and len(ws) != 1:
        raise ValueError(f"gather_sums: a tail goes with one weight, got {len(ws)}")
    k2 = 0 if tail is None else tail[1].shape[0]
    while k2 % bm:
        bm //= 2
    bn = _bn([w.shape[1] for w in ws], bn)
    n_blocks = tuple(w.shape[1] // bn for w in ws)
    total = sum(w.shape[1] for w in ws)
    n_rows = -(-k // bm)
    operands = [packed.astype(jnp.int32), order.astype(jnp.int32), x, *ws]
    if tail is not None:
        operands += [tail[0].reshape(1, k2).astype(tail[1].dtype), tail[1]]
    y = pl.pallas_call(
        functools.partial(_gather_kernel, n_blocks=n_blocks, bn=bn, bm=bm, n_rows=n_rows, tail=tail is not None),
        out_shape=jax.ShapeDtypeStruct((total,), jnp.float32),
        grid=(sum(n_blocks), n_rows + k2 // bm),
        input_output_aliases={len(operands): 0},
        compiler_params=triton_params(num_warps=warps, num_stages=1),
        interpret=interpret(),
    )(*operands, _zeros(zeros, (total,)))
    return _split(y, ws) if split else [y]


def combine_outputs(outs: Sequence[Array], residual: tuple[Array, Array] | None = None, raw: bool = False) -> tuple[Array, ...]:
    """A projection's outputs as a site hands them on: plus ``r @ A`` for a ``residual = (r, A)`` (one
    output; summed in float32, or float64 for float64 models), and with ``raw`` as one float32 buffer
    of every output side by side (rounded values, for the jnp paths; see :func:`sparse_matvec`)."""
    if residual is not None:
        y = outs[0].astype(acc_dtype(outs[0].dtype)) + residual_product(*residual)
        return (y,) if raw else (y.astype(outs[0].dtype),)
    if raw:
        return (jnp.concatenate([o.astype(acc_dtype(o.dtype)) for o in outs], axis=-1),)
    return tuple(outs)


def sparse_matvec_reference(x: Array, thr: Array, ws, bs, residual=None, raw: bool = False) -> tuple[Array, ...]:
    """The jnp twin: zero the dropped entries, then the dense product (and :func:`combine_outputs`)."""
    return combine_outputs(matvec(apply(x, thr), ws, bs), residual, raw)


def tail_supported(residual: tuple[Array, Array], w: Array) -> bool:
    """Whether r·A can ride in the sparse GEMV's launch: one row r, bf16 A ``[K2, N]`` with N = w's outputs."""
    rv, a = residual
    return (a.dtype == jnp.bfloat16 and a.ndim == 2 and a.shape[1] == w.shape[1] and a.shape[0] % 16 == 0
            and int(np.prod(rv.shape)) == a.shape[0])


def sparse_matvec(x: Array, keep: KeepSet | Array, ws: Sequence[Array], bs: Sequence[Array | None],
                  residual: tuple[Array, Array] | None = None, raw: bool = False, *, gemv: str = "xla",
                  tail: bool = False, tile: tuple[int, int, int] | None = None) -> tuple[Array, ...]:
    """``keep(x) @ w_i + b_i`` for every i, plus ``r @ A`` for a ``residual = (r, A)`` (one weight
    only). ``gemv`` (the site plan's): for one token with bf16 weights ``gather`` reads the kept rows
    the selection kernel compacted into ``keep`` (masked tiles where it did not), ``masked`` reads
    masked tiles on the threshold pair, accumulating into the buffer the selection kernel made (zeros,
    or r·A made beside it: ``keep.side``); ``tail``: otherwise r·A rides in the GEMV's launch as extra
    tiles where they fit, else XLA's dot; ``tile``: (rows, columns, warps) instead of the kernel's
    default. ``xla``, several tokens (XLA's GEMM is faster there) or shapes the kernels cannot tile
    (with one warning naming them): the jnp twin.

    ``raw``: one float32 output holding every weight's outputs side by side, not yet rounded to the
    weights' dtype (the kernel's accumulator itself: its consumer, a selection prologue or the
    decode-step kernel, rounds it, so no cast or slice runs in between; the jnp twin stores its
    rounded outputs in float32, or float64 for float64 weights)."""
    ws, bs = tuple(ws), tuple(bs)
    if residual is not None and len(ws) != 1:
        raise ValueError(f"sparse_matvec: a residual goes with one weight, got {len(ws)}")
    keep = keep if isinstance(keep, KeepSet) else KeepSet(keep)
    thr = keep.thr
    lead = x.shape[:-1]
    r = int(np.prod(lead))
    if gemv not in ("gather", "masked", "xla"):
        raise ValueError(f"sparse_matvec: gemv={gemv!r}; valid: gather, masked, xla")
    if gemv == "xla" or r > 1:  # several tokens: XLA's dense GEMM on the masked rows
        return sparse_matvec_reference(x, thr, ws, bs, residual, raw)
    why = unsupported(x, ws)
    if why is not None:
        if why not in _warned:
            _warned.add(why)
            warnings.warn(f"sparse GEMV kernel: {why}; using the jnp path", stacklevel=2)
        return sparse_matvec_reference(x, thr, ws, bs, residual, raw)
    x2 = x.reshape(r, x.shape[-1]).astype(jnp.bfloat16)
    acc, extra = keep.zeros, None
    if residual is not None:  # r·A: made beside the down selection (side), as tiles of this launch (tail), else XLA's dot
        if keep.side is not None:
            acc = keep.side
        elif tail and tail_supported(residual, ws[0]):
            extra = residual
        else:
            acc = residual_product(*residual).reshape(-1)
    if gemv == "gather" and keep.order is not None:
        bm, bn, warps = tile or (GBM, GBN, GWARPS)
        ys = [y[None] for y in gather_sums(x2[0], keep.order, keep.packed, ws, bm=bm, bn=bn, warps=warps, zeros=acc,
                                           tail=extra, split=not raw)]
    else:  # the selection kernel's pairs, read in place, or the given ones
        bm, bn, warps = tile or (NARROW_TILE if sum(w.shape[1] for w in ws) <= NARROW else WIDE_TILE)
        ys = sums(x2, keep.packed if keep.packed is not None else thr.reshape(r, 2), ws, bm=bm, bn=bn, warps=warps,
                  zeros=acc, tail=extra, split=not raw)
    if raw:
        (y,) = ys
        if any(b is not None for b in bs):
            y = y + jnp.concatenate([jnp.zeros((w.shape[1],), y.dtype) if b is None else b.astype(y.dtype)
                                     for w, b in zip(ws, bs)])
        return (y.reshape(*lead, y.shape[-1]),)
    out = []
    for w, b, y in zip(ws, bs, ys):
        if b is not None:
            y = y + b.astype(y.dtype)
        out.append(y.astype(w.dtype).reshape(*lead, w.shape[1]))
    return tuple(out)
