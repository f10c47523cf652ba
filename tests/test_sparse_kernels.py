"""Top-K selection and sparse GEMV kernels (Pallas interpret mode on CPU) against plain jnp.

Pallas interpret mode fills every output with a poison value before the kernel runs (NaN for
floats, INT_MIN for integers), so an output the kernel forgets to write fails these tests; the
sparse GEMVs accumulate into zero-filled buffers, so there a dropped tile shows as a wrong sum.
Shapes are the real models' dims (non-powers of two included) in pairs that keep the number of
interpreted programs modest.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larosa_jax import pallas as ops
from larosa_jax.pallas import select as sel
from larosa_jax.pallas import sparse_gemv as sg

SPARSITIES = (0.25, 0.5, 0.75, 0.9)
POISON_INT = np.iinfo(np.int32).min


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _k(s, d):
    return max(1, int(round((1 - s) * d)))


def _check_compaction(x, packed, order, want_mask):
    """Kept count, kept indices ascending in front, the rest a permutation of the dropped ones."""
    for r in range(x.shape[0]):
        kept = np.nonzero(want_mask[r])[0]
        n = int(packed[r, 2])
        assert n == kept.size
        o = np.asarray(order[r])
        assert sorted(o.tolist()) == list(range(o.size)), "order is not a permutation"
        np.testing.assert_array_equal(o[:n], kept)


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("d", [576, 1536, 3584, 4096, 11008, 14336, 18944])
def test_select_kernel_keeps_exactly_topk_and_compacts(d):
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((2, d)) * rng.uniform(0.1, 10, (2, 1)), jnp.bfloat16)
    for s in SPARSITIES:
        k = _k(s, d)
        packed, order = sel.select_kernel(x, jnp.int32(k))
        assert not (np.asarray(packed) == POISON_INT).any() and not (np.asarray(order) == POISON_INT).any()
        got = np.asarray(sel.keep_mask(x, packed[:, :2]))
        want = np.asarray(sel.keep_mask(x, sel.topk_threshold_reference(x, k)))
        assert (got.sum(-1) == k).all(), f"d={d} s={s}: kept {got.sum(-1)} != {k}"
        np.testing.assert_array_equal(got, want)
        _check_compaction(x, np.asarray(packed), order, want)


@pytest.mark.parametrize("k", [1, 7, 100, 255, 256, 300, 511, 512])
def test_select_kernel_breaks_ties_towards_lower_indices(k):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.integers(-3, 4, (5, 512)), jnp.bfloat16)  # ~1/7 zeros, every magnitude tied
    x = x.at[4].set(0.0)  # an all-zero row: any k entries are a valid Top-K, lowest indices first
    packed, order = sel.select_kernel(x, jnp.int32(k))
    got = np.asarray(sel.keep_mask(x, packed[:, :2]))
    want = np.asarray(sel.keep_mask(x, sel.topk_threshold_reference(x, k)))
    np.testing.assert_array_equal(got, want)
    assert (got.sum(-1) == k).all()
    assert got[4].nonzero()[0].tolist() == list(range(k))
    _check_compaction(x, np.asarray(packed), order, want)


def _window_rows(d, rng):
    """Rows whose k-th magnitude the window search finds inside its window (Gaussian, Laplace) and rows it
    does not (1% outliers 1000x larger inflate mean|x|; constant rows; zeros; an inf or a NaN entry
    making mean|x| inf or NaN), for every k tried."""
    inf, nan = rng.standard_normal(d), rng.standard_normal(d)
    inf[d // 3], nan[d // 2] = np.inf, np.nan
    return np.stack([rng.standard_normal(d), rng.laplace(size=d) * 1e-3,
                     rng.standard_normal(d) * np.where(rng.random(d) < 0.01, 1000, 1), np.ones(d), np.zeros(d),
                     rng.integers(-3, 4, d), inf, nan])


@pytest.mark.parametrize("d", [576, 11008, 18944])
def test_window_search_is_exact_inside_and_outside_its_window(d):
    """The windowed search writes the same pairs as the full bisection, whether the k-th magnitude lies
    in the window (packed column 3 = 1) or not, and its flag is the one ``window_hits`` predicts."""
    rng = np.random.default_rng(d + 1)
    x = jnp.asarray(_window_rows(d, rng), jnp.bfloat16)
    for k in (1, d // 4, d // 2, 3 * d // 4):
        win = np.asarray(sel.select_kernel(x, jnp.int32(k), compact=False, window=True)[0])
        full = np.asarray(sel.select_kernel(x, jnp.int32(k), compact=False, window=False)[0])
        np.testing.assert_array_equal(win[:, :3], full[:, :3])
        assert (full[:, 3] == 0).all()
        got = np.asarray(sel.keep_mask(x, win[:, :2]))
        np.testing.assert_array_equal(got, np.asarray(sel.keep_mask(x, sel.topk_threshold_reference(x, k))))
        assert (got.sum(-1) == k).all()
        np.testing.assert_array_equal(win[:, 3], np.asarray(sel.window_hits(x, k)).astype(np.int32))
        assert win[0, 3] == 1 and win[1, 3] == 1, f"Gaussian / Laplace rows outside the window at k={k}"
        if k >= d // 4:
            assert win[2, 3] == 0, "outlier row should miss the window (exercises the fallback)"


def test_window_search_at_the_widest_row():
    """D = 2^15 = MAX_D: a count of 2^15 in the packed check's high half must still read back right."""
    d = sel.MAX_D
    x = jnp.asarray(np.stack([np.ones(d), np.random.default_rng(0).standard_normal(d)]), jnp.bfloat16)
    for k in (d, d // 2):
        win = np.asarray(sel.select_kernel(x, jnp.int32(k), compact=False, window=True)[0])
        full = np.asarray(sel.select_kernel(x, jnp.int32(k), compact=False, window=False)[0])
        np.testing.assert_array_equal(win[:, :3], full[:, :3])
        np.testing.assert_array_equal(win[:, 3], np.asarray(sel.window_hits(x, k)).astype(np.int32))
    assert win[1, 3] == 1


@pytest.mark.parametrize("d,chunk", [(3000, 512), (11008, 1024)])
def test_select_kernel_compaction_split_over_programs(d, chunk):
    """On GPU each row's compaction is split over programs (each searches the row and stores one slice of
    the positions); the split gives the whole-row result, with and without a Norm prologue, whose outputs
    only the row's first program writes."""
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((2, d)), jnp.bfloat16)
    k = jnp.int32(_k(0.6, d))
    split = sel.select_kernel(x, k, chunk=chunk, zeros=700)
    for a, b in zip(split, sel.select_kernel(x, k, zeros=700)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _check_compaction(x, np.asarray(split[0]), split[1], np.asarray(sel.keep_mask(x, sel.topk_threshold_reference(x, k))))
    with pytest.raises(ValueError, match="power of two"):
        sel.select_kernel(x, k, chunk=700)
    h = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    gain = jnp.asarray(rng.uniform(0.5, 2, d), jnp.bfloat16)
    pro = sel.Norm(1e-5, jnp.bfloat16, h * 0.5, gain)
    split, whole = sel.select_kernel(h, k, chunk=chunk, prologue=pro), sel.select_kernel(h, k, prologue=pro)
    assert len(split) == 4
    for a, b in zip(split, whole):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="Gated prologue runs in its jnp twin"):
        sel.select_kernel(jnp.concatenate([h, h], -1), k, prologue=sel.Gated(jnp.bfloat16))


def test_select_kernel_compacts_a_given_threshold():
    """TEAL's |x| > τ: the kernel skips the search and only compacts (count varies by row)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 3000)), jnp.bfloat16)  # D not a power of two
    for tau in (-1.0, 0.0, 0.7, 2.5):
        thr = sel.magnitude_threshold(x, jnp.float32(tau))
        packed, order = sel.select_kernel(x, thr=thr)
        want = np.asarray(sel.keep_mask(x, thr))
        _check_compaction(x, np.asarray(packed), order, want)


@pytest.mark.parametrize("d,k_side,n_side", [(4096, 640, 576), (11008, 1024, 4096), (3000, 3584, 512)])
def test_select_kernel_spare_programs_fill_zeros_or_add_side_tiles(d, k_side, n_side):
    """Spare programs beside the selection: zero-filled accumulators, and tiles of r·A (La RoSA's residual
    adapter) added in float32 onto a given sum; the selection itself is the same with or
    without them and with or without compaction (every output poisoned first, so anything left
    unwritten shows)."""
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.bfloat16)
    k = _k(0.4, d)
    packed, order = sel.select_kernel(x, jnp.int32(k))
    thr_only, zeros = sel.select_kernel(x, jnp.int32(k), compact=False, zeros=3000)
    np.testing.assert_array_equal(np.asarray(thr_only), np.asarray(packed))
    assert zeros.shape == (3000,) and not np.isnan(np.asarray(zeros)).any() and not np.asarray(zeros).any()
    rv = jnp.asarray(rng.standard_normal((1, k_side)), jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((k_side, n_side)) * k_side**-0.5, jnp.bfloat16)
    p2, o2, z1, z2 = sel.select_kernel(x, jnp.int32(k), zeros=3000, side=sel.Side(a))  # zeros for a later launch's sum
    np.testing.assert_array_equal(np.asarray(p2), np.asarray(packed))
    np.testing.assert_array_equal(np.asarray(o2), np.asarray(order))
    assert z1.shape == (3000,) and z2.shape == (n_side,) and not np.asarray(z1).any() and not np.asarray(z2).any()
    acc = jnp.asarray(rng.standard_normal((n_side,)), jnp.float32)
    want = np.asarray(acc, np.float64) + np.asarray(rv, np.float64)[0] @ np.asarray(a, np.float64)
    p3, o3, side = sel.select_kernel(x, jnp.int32(k), side=sel.Side(a, acc, rv))
    np.testing.assert_array_equal(np.asarray(p3), np.asarray(packed))
    np.testing.assert_array_equal(np.asarray(o3), np.asarray(order))
    assert side.shape == (n_side,) and side.dtype == jnp.float32
    assert _rel(side, want) < 1e-6
    assert _rel(sel.Side(a, acc, rv).reference((1,))[0], want) < 1e-6
    for bad, why in [(sel.Side(a[:, :100], acc, rv), r"side with A \(\d+, 100\) bfloat16"),
                     (sel.Side(a, acc[:64], rv), r"side with a sum \(64,\) float32"),
                     (sel.Side(a, acc), "side with a residual r None")]:
        with pytest.raises(ValueError, match=why):
            sel.select_kernel(x, jnp.int32(k), side=bad)


def test_select_topk_side_sum_on_every_path():
    """``KeepSet.side`` is zeros for a zero-only ``Side`` and acc + r·A for one that adds, whether the
    selection kernel makes it (one bf16 row; 64-column tiles here) or its jnp twin does (several rows,
    float32 rows, an A whose rows the side tiles cannot cover); an adding Side without r is refused."""
    rng = np.random.default_rng(5)
    for rows, dtype, k_in in [(1, jnp.bfloat16, 256), (3, jnp.bfloat16, 256), (1, jnp.float32, 256), (1, jnp.bfloat16, 200)]:
        a = jnp.asarray(rng.standard_normal((k_in, 192)) * 0.05, jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal((rows, 1, 700)), dtype)
        r = jnp.asarray(rng.standard_normal((rows, 1, k_in)), jnp.bfloat16)
        acc = jnp.asarray(rng.standard_normal((rows, 1, 192)), jnp.float32)
        zero = ops.select_topk(x, 300, side=ops.Side(a), kernel=True).side
        assert zero.size == rows * 192 and not np.asarray(zero).any()
        keep = ops.select_topk(x, 300, side=ops.Side(a, acc.reshape(-1) if rows == 1 else acc, r), kernel=True)
        want = np.asarray(acc, np.float64) + np.asarray(r, np.float64) @ np.asarray(a, np.float64)
        assert _rel(np.asarray(keep.side).reshape(want.shape), want) < 1e-6, (rows, dtype, k_in)
        np.testing.assert_array_equal(np.asarray(keep.thr), np.asarray(ops.select_topk(x, 300, kernel=True).thr))
    with pytest.raises(ValueError, match="needs the residual r"):
        ops.select_topk(x, 300, side=ops.Side(a, acc.reshape(-1)))


@pytest.mark.parametrize("d,add,gain", [(576, False, False), (4096, True, False), (3584, True, True),
                                        (11008, False, True), (18944, True, True)])
def test_select_kernel_norm_prologue_matches_jnp(d, add, gain):
    """The Norm prologue: float32 accumulators h (+ add) rounded to bf16 and summed, RMSNorm (times γ)
    in the kernel; the rounded residual is exact, the normed row within a bf16 rounding of the jnp
    twin (float32 sums in another order), and the keep set exactly Top-K of the row the kernel wrote."""
    rng = np.random.default_rng(d)
    h = jnp.asarray(rng.standard_normal((1, d)) * 3, jnp.float32)
    a = jnp.asarray(rng.standard_normal((1, d)), jnp.float32) if add else None
    g = jnp.asarray(rng.uniform(0.5, 2, d), jnp.bfloat16) if gain else None
    pro = sel.Norm(1e-5, jnp.bfloat16, a, g)
    k = _k(0.5, d)
    packed, row, hb = sel.select_kernel(h, jnp.int32(k), compact=False, prologue=pro)
    want_row, want_h = pro.reference(h)
    np.testing.assert_array_equal(np.asarray(hb, np.float32), np.asarray(want_h, np.float32))
    assert row.dtype == jnp.bfloat16 and not np.isnan(np.asarray(row, np.float32)).any()
    np.testing.assert_allclose(np.asarray(row, np.float32), np.asarray(want_row, np.float32), rtol=8e-3, atol=0)
    assert np.mean(np.asarray(row, np.float32) == np.asarray(want_row, np.float32)) > 0.95
    got = np.asarray(sel.keep_mask(row, packed[:, :2]))
    np.testing.assert_array_equal(got, np.asarray(sel.keep_mask(row, sel.topk_threshold_reference(row, k))))
    assert got.sum() == k


def test_select_topk_prologue_dispatch():
    """The Norm prologue in the kernel with ``prologue_kernel`` (one bf16-bound row), its jnp twin before
    the selection kernel without it (and before the jnp selection without ``kernel``); Gated always in its
    twin. Each gives the row, the residual and a keep set of exactly k on that row."""
    rng = np.random.default_rng(11)
    h = jnp.asarray(rng.standard_normal((1, 1, 1000)), jnp.float32)
    o = jnp.asarray(rng.standard_normal((1, 1, 1000)), jnp.float32)
    pro = ops.Norm(1e-6, jnp.bfloat16, add=o)
    ref = ops.select_topk(h, 300, prologue=pro)  # the jnp twin
    assert ref.packed is None and ref.x.dtype == jnp.bfloat16 and ref.h.shape == (1, 1, 1000)
    ks = ops.select_topk(h, 300, 2048, prologue=pro, kernel=True, prologue_kernel=True)
    assert ks.packed is not None and ks.x.shape == (1, 1, 1000) and ks.zeros.shape == (2048,)
    np.testing.assert_array_equal(np.asarray(ks.h, np.float32), np.asarray(ref.h, np.float32))
    assert int(jnp.sum(ops.keep_mask(ks.x, ks.thr))) == 300
    kn = ops.select_topk(h, 300, 2048, prologue=pro, kernel=True)  # twin, then the selection kernel
    assert kn.packed is not None and kn.zeros is not None
    np.testing.assert_array_equal(np.asarray(kn.x, np.float32), np.asarray(ref.x, np.float32))
    gu = jnp.concatenate([h, o], axis=-1)
    for pk in (False, True):
        kg = ops.select_topk(gu, 300, prologue=ops.Gated(jnp.bfloat16), kernel=True, prologue_kernel=pk)
        assert kg.packed is not None and kg.h is None
        want_act = ops.gated(*jnp.split(gu.astype(jnp.bfloat16), 2, -1))
        np.testing.assert_array_equal(np.asarray(kg.x, np.float32), np.asarray(want_act, np.float32))
        assert int(jnp.sum(ops.keep_mask(kg.x, kg.thr))) == 300
    with pytest.raises(ValueError, match=r"k=1001 for a vector of width D=1000"):
        ops.select_topk(gu, 1001, prologue=ops.Gated(jnp.bfloat16))


@pytest.mark.parametrize("d", [576, 4096, 3584])
def test_select_threshold_with_norm_prologue_matches_the_twin(d):
    """TEAL in the fused path: the selection kernel without the search makes the row and the residual
    and keeps exactly the entries of |row| > τ (τ rounded to bf16, as the twin compares), for τ below,
    inside and above the row's range."""
    rng = np.random.default_rng(d)
    h = jnp.asarray(rng.standard_normal((1, 1, d)), jnp.float32)
    o = jnp.asarray(rng.standard_normal((1, 1, d)), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 2.0, d), jnp.bfloat16)
    pro = ops.Norm(1e-5, jnp.bfloat16, add=o, gain=g)
    for tau in (-1.0, 0.0, 0.7313, 1.5, 100.0):
        ref = ops.select_threshold(h, jnp.float32(tau), prologue=pro)
        assert ref.packed is None
        ks = ops.select_threshold(h, jnp.float32(tau), 3 * d, prologue=pro, kernel=True)
        assert ks.packed is not None and ks.zeros.shape == (3 * d,) and not np.asarray(ks.zeros).any()
        np.testing.assert_array_equal(np.asarray(ks.h, np.float32), np.asarray(ref.h, np.float32))
        np.testing.assert_allclose(np.asarray(ks.x, np.float32), np.asarray(ref.x, np.float32), rtol=8e-3, atol=1e-30)
        row = np.asarray(ks.x, np.float32)
        want = np.abs(row) > np.float32(jnp.asarray(tau, jnp.bfloat16))
        np.testing.assert_array_equal(np.asarray(ops.keep_mask(ks.x, ks.thr)), want)
        assert int(ks.packed[0, 2]) == int(want.sum())


def test_topk_matches_a_sort_and_rejects_bad_k():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 2, 300)), jnp.float32)
    got = np.asarray(ops.topk(x, 40))
    order = np.argsort(-np.abs(np.asarray(x)), axis=-1, kind="stable")[..., :40]
    want = np.zeros_like(got)
    np.put_along_axis(want, order, np.take_along_axis(np.asarray(x), order, -1), -1)
    np.testing.assert_array_equal(got, want)
    for bad in (0, -1, 301):
        with pytest.raises(ValueError, match=r"k=-?\d+ for a vector of width D=300: k must be in \[1, 300\]"):
            ops.topk_threshold(x, bad)
        with pytest.raises(ValueError, match=r"k must be in \[1, 300\]"):
            ops.select_topk(x, bad)


def test_magnitude_threshold_is_teal():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    for tau in (-1.0, 0.0, 0.3, 1.2, 10.0):
        got = ops.apply(x, ops.magnitude_threshold(x, jnp.float32(tau)))
        want = jnp.where(jnp.abs(x) > jnp.asarray(tau, x.dtype), x, 0)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_select_dispatch_uses_the_kernel_for_one_bf16_row():
    rng = np.random.default_rng(5)
    one = jnp.asarray(rng.standard_normal((1, 1, 1000)), jnp.bfloat16)
    on = dict(kernel=True, compact=True, window=True)
    ks = ops.select_topk(one, 300, 2048, **on)  # pairs, compacted kept indices, the GEMV's zeroed accumulator
    assert ks.order is not None and int(ks.packed[0, 2]) == 300 and ks.thr.shape == (1, 1, 2)
    assert ks.zeros.shape == (2048,) and not np.asarray(ks.zeros).any()
    assert ops.select_topk(one, 300, 2048).packed is None  # kernel off: the jnp twin
    assert ops.select_topk(one.astype(jnp.float32), 300, **on).order is None  # float32: the jnp twin
    assert ops.select_topk(jnp.concatenate([one, one]), 300, **on).order is None  # two rows: pairs only
    kt = ops.select_threshold(one, jnp.float32(0.5), 2048, kernel=True)  # TEAL without prologue: no launch at all
    assert kt.packed is None and kt.zeros is None and kt.order is None and kt.thr.shape == (1, 1, 2)
    ks = ops.select_topk(one, 300, kernel=True)  # no compaction: pairs for masked tiles
    assert ks.order is None and int(ks.packed[0, 2]) == 300 and ks.zeros is None


# ----------------------------------------------------------------------------- sparse GEMV
GATHER_CASES = [  # D_in, D_out of each weight sharing the input, sparsity (one token)
    (576, (11008,), 0.5),  # D_out of Llama-2's MLP
    (11008, (576,), 0.25),  # Llama-2 down's D_in
    (3584, (512, 512, 3584), 0.75),  # Qwen2 fused q/k/v
    (576, (1536, 1536), 0.5),  # SmolLM2 fused gate/up
    (14336, (576,), 0.9),  # Llama-3 down's D_in
    (18944, (576,), 0.5),  # Qwen2 down's D_in
    (1536, (4096, 1024, 1024), 0.25),  # Llama-3 q/k/v outputs
    (576, (18944, 14336), 0.9),
]


def _operands(k, ns, rows, seed):
    key = jax.random.key(seed)
    kx, *kws = jax.random.split(key, 1 + len(ns))
    x = jax.random.normal(kx, (rows, k), jnp.float32).astype(jnp.bfloat16)
    ws = tuple((jax.random.normal(kw, (k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16) for kw, n in zip(kws, ns))
    return x, ws


def _want(x, thr, ws):
    xs = ops.apply(x, thr).astype(jnp.float32)
    return xs, [jnp.dot(xs, w.astype(jnp.float32), precision="highest") for w in ws]


@pytest.mark.parametrize("k,ns,s", GATHER_CASES)
def test_gather_gemv_kernel_matches_jnp(k, ns, s):
    x, ws = _operands(k, ns, 1, k * 7 + sum(ns))
    assert sg.unsupported(x, ws) is None
    packed, order = sel.select_kernel(x, jnp.int32(_k(s, k)))
    xs, want = _want(x, packed[:, :2], ws)
    assert (np.asarray((xs != 0).sum(-1)) == _k(s, k)).all()
    for w, y, ref in zip(ws, sg.gather_sums(x[0], order, packed, ws), want):
        assert y.shape == (w.shape[1],) and bool(jnp.all(jnp.isfinite(y)))
        assert _rel(y, ref[0]) < 1e-5  # float32 sums of the same bf16 products
        # and it is not the dense product: the dropped rows really are dropped
        assert _rel(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")[0], ref[0]) > 1e-3


MASKED_CASES = [  # D_in, D_out, sparsity, tokens (batch > 1 takes the union of the keep sets)
    (3584, (3584, 512, 512), 0.75, 4),  # Qwen2 fused q/k/v, batch 4
    (576, (1536, 1536), 0.5, 4),  # SmolLM2 fused gate/up
    (14336, (576,), 0.9, 4),  # Llama-3 down's D_in
    (18944, (576,), 0.75, 2),  # Qwen2 down's D_in
    (576, (11008,), 0.25, 8),  # Llama-2 MLP width, 8 tokens
    (4096, (576,), 0.5, 1),  # the masked kernel serves one token too (threshold pairs only)
]


@pytest.mark.parametrize("k,ns,s,rows", MASKED_CASES)
def test_masked_gemv_kernel_matches_jnp(k, ns, s, rows):
    x, ws = _operands(k, ns, rows, k * 3 + sum(ns) + rows)
    thr = sel.topk_threshold_reference(x, _k(s, k))
    _, want = _want(x, thr, ws)
    for w, y, ref in zip(ws, sg.sums(x, thr, ws), want):
        assert y.shape == (rows, w.shape[1]) and bool(jnp.all(jnp.isfinite(y)))
        assert _rel(y, ref) < 1e-5
        assert _rel(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest"), ref) > 1e-3


ONE_TOKEN_CASES = [  # D_in, D_out, sparsity, tile (bm, bn, warps), residual adapter width (0: none)
    (11008, (576,), 0.75, sg.NARROW_TILE, 576),  # Llama-2 down's D_in, with the adapter in the launch
    (14336, (576,), 0.9, sg.WIDE_TILE, 576),  # Llama-3 down's D_in
    (3584, (3584, 512, 512), 0.5, sg.NARROW_TILE, 0),  # Qwen2 fused q/k/v
    (576, (1536, 1536), 0.25, sg.WIDE_TILE, 0),  # SmolLM2 gate/up: bm and bn shrink to fit 576
    (18944, (576,), 0.5, sg.WIDE_TILE, 576),  # Qwen2 down's D_in (its 3584 columns at full width: 2 min in interpret mode)
    (1536, (11008,), 0.25, (64, 256, 4), 0),  # Llama-2 MLP width
]


@pytest.mark.parametrize("k,ns,s,tile,k2", ONE_TOKEN_CASES)
def test_one_token_masked_gemv_tiles_and_adapter_tail(k, ns, s, tile, k2):
    """One token on the decode tiles, with La RoSA's residual adapter r·A as extra dense tiles of the
    same launch, against float64 jnp (a tile that is skipped or added twice shows as a wrong sum)."""
    x, ws = _operands(k, ns, 1, k + sum(ns) + k2)
    thr = sel.topk_threshold_reference(x, _k(s, k))
    xs = np.asarray(ops.apply(x, thr), np.float64)
    want = [xs @ np.asarray(w, np.float64) for w in ws]
    tail = None
    if k2:
        rng = np.random.default_rng(k2)
        rv = jnp.asarray(rng.standard_normal((1, k2)), jnp.bfloat16)
        a = jnp.asarray(rng.standard_normal((k2, ns[0])) * k2**-0.5, jnp.bfloat16)
        tail = (rv, a)
        want[0] = want[0] + np.asarray(rv, np.float64) @ np.asarray(a, np.float64)
    bm, bn, warps = tile
    got = sg.sums(x, thr, ws, bm=bm, bn=bn, warps=warps, tail=tail)
    for w, y, ref in zip(ws, got, want):
        assert y.shape == (1, w.shape[1]) and bool(jnp.all(jnp.isfinite(y)))
        assert _rel(y, ref) < 1e-5
    with pytest.raises(ValueError, match="a tail goes with one token and one weight"):
        sg.sums(jnp.concatenate([x, x]), jnp.concatenate([thr, thr]), ws[:1], tail=(x[:, :16], ws[0][:16]))


@pytest.mark.parametrize("gather", [True, False])
def test_sparse_gemv_reads_only_kept_rows(gather):
    """Rows of W for dropped entries are poisoned with NaN: any read of them would surface."""
    rng = np.random.default_rng(3)
    k, n = 1024, 384
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
    packed, order = sel.select_kernel(x, jnp.int32(256))
    keep = np.asarray(sel.keep_mask(x, packed[:, :2]))[0]
    w = np.asarray(jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), np.float32)
    w[~keep] = np.nan
    wb = (jnp.asarray(w, jnp.bfloat16),)
    (y,) = sg.gather_sums(x[0], order, packed, wb) if gather else sg.sums(x, packed[:, :2], wb)
    want = np.asarray(x, np.float32)[:, keep] @ w[keep]
    assert _rel(np.reshape(y, (-1,)), want[0]) < 1e-5


def test_sparse_matvec_dispatch_bias_batch_and_fallbacks(monkeypatch):
    rng = np.random.default_rng(4)
    ws = tuple(jnp.asarray(rng.standard_normal((256, n)) * 0.06, jnp.bfloat16) for n in (256, 64, 64))
    bs = tuple(jnp.asarray(rng.standard_normal((n,)), jnp.bfloat16) for n in (256, 64, 64))  # Qwen2 q/k/v biases
    for rows in (1, 4):  # [B, T=1, D] as at decode: gather kernel for one token, XLA for four
        x = jnp.asarray(rng.standard_normal((rows, 1, 256)), jnp.bfloat16)
        keep = ops.select_topk(x, 100, 384, kernel=True, compact=True)
        assert (keep.packed is not None) == (rows == 1) and (keep.order is not None) == (rows == 1)
        got = ops.sparse_matvec(x, keep, ws, bs, gemv="gather")
        want = ops.sparse_matvec_reference(x, keep.thr, ws, bs)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == jnp.bfloat16
            assert _rel(g, w) < 1e-2
    # several tokens: XLA's GEMM on the masked rows, not the masked-tile kernel (measured slower)
    monkeypatch.setattr(sg, "sums", lambda *a, **k: pytest.fail("masked-tile kernel used for 4 tokens"))
    ops.sparse_matvec(x, ops.topk_threshold(x, 100), ws, bs, gemv="masked")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="gemv='dense'; valid: gather, masked, xla"):
        ops.sparse_matvec(x, ops.topk_threshold(x, 100), ws, bs, gemv="dense")
    # float32 weights and an untileable D_out: the jnp path, one warning naming the shape (one token)
    x = x[:1]
    sg._warned.clear()
    thr = ops.topk_threshold(x, 100)
    w32 = tuple(w.astype(jnp.float32) for w in ws)
    with pytest.warns(UserWarning, match="dtype float32"):
        got = ops.sparse_matvec(x, thr, w32, bs, gemv="masked")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.sparse_matvec(x, thr, w32, bs, gemv="masked")  # once only
    for g, w in zip(got, ops.sparse_matvec_reference(x, thr, w32, bs)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    w_odd = (jnp.asarray(rng.standard_normal((256, 100)), jnp.bfloat16),)
    with pytest.warns(UserWarning, match=r"D_out=\[100\]"):
        (g,) = ops.sparse_matvec(x, thr, w_odd, (None,), gemv="masked")
    assert g.shape == (1, 1, 100)
    # more than 8 tokens (prefill): the jnp path, silently
    xp = jnp.asarray(rng.standard_normal((2, 16, 256)), jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = ops.sparse_matvec(xp, ops.topk_threshold(xp, 64), ws[:1], bs[:1], gemv="masked")
    assert g[0].shape == (2, 16, 256)


@pytest.mark.parametrize("gather", [False, True])
def test_sparse_matvec_raw_is_one_unrounded_float32_buffer(gather):
    """``raw``: every weight's outputs side by side in one float32 buffer, biases added (some weights
    without one), not rounded; rounded, it is the plain outputs, on the kernel and the jnp path."""
    gemv = "gather" if gather else "masked"
    rng = np.random.default_rng(9)
    ws = tuple(jnp.asarray(rng.standard_normal((576, n)) * 0.05, jnp.bfloat16) for n in (1536, 1536))
    bs = (jnp.asarray(rng.standard_normal((1536,)), jnp.bfloat16), None)
    x = jnp.asarray(rng.standard_normal((1, 1, 576)), jnp.bfloat16)
    keep = ops.select_topk(x, 300, 3072, kernel=True, compact=gather)
    assert (keep.order is not None) == gather
    (raw,) = ops.sparse_matvec(x, keep, ws, bs, raw=True, gemv=gemv)
    assert raw.shape == (1, 1, 3072) and raw.dtype == jnp.float32
    xs = np.asarray(ops.apply(x, keep.thr), np.float64)
    want = np.concatenate([xs @ np.asarray(w, np.float64) + (0 if b is None else np.asarray(b, np.float64))
                           for w, b in zip(ws, bs)], axis=-1)
    assert _rel(raw, want) < 1e-5  # float32, unrounded (bf16 rounding alone is ~1e-3)
    (ref,) = ops.sparse_matvec_reference(x, keep.thr, ws, bs, raw=True)
    assert ref.shape == raw.shape and ref.dtype == jnp.float32
    plain = np.concatenate([np.asarray(o, np.float32) for o in ops.sparse_matvec(x, keep, ws, bs, gemv=gemv)], axis=-1)
    np.testing.assert_array_equal(np.asarray(raw.astype(jnp.bfloat16), np.float32), plain)


@pytest.mark.parametrize("adapter,gemv", [("side", "masked"), ("side", "gather"), ("tail", "masked"), ("tail", "gather"),
                                          ("xla", "masked")])
def test_sparse_matvec_adds_the_residual_product(adapter, gemv, monkeypatch):
    """The down site of a fused model: keep(x)·W + b + r·A, with r·A made by the selection kernel's
    spare programs onto a sum an earlier launch zero-filled (``side``), by extra tiles of the GEMV's own
    launch (``tail``) or by XLA's dot (``xla``, several tokens, or a shape the kernels cannot take)."""
    gather, side = gemv == "gather", adapter == "side"
    sel_kw = dict(kernel=True, compact=gather)
    calls = []
    real = sg.residual_product
    monkeypatch.setattr(sg, "residual_product", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_normal((1536, 576)) * 0.03, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((576,)), jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((640, 576)) * 0.04, jnp.bfloat16)  # K: a multiple of the side tiles' 128 rows
    for rows in (1, 3):
        x = jnp.asarray(rng.standard_normal((rows, 1, 1536)), jnp.bfloat16)
        r = jnp.asarray(rng.standard_normal((rows, 1, 640)), jnp.bfloat16)
        on = side and ops.side_fits(a, x)
        assert on == (rows == 1 and side)
        if on:  # the sum zero-filled by an earlier launch, r·A added beside this selection
            zeros = ops.select_topk(x, 700, side=ops.Side(a), **sel_kw).side
            keep = ops.select_topk(x, 700, 0, side=ops.Side(a, zeros, r), **sel_kw)
        else:
            keep = ops.select_topk(x, 700, 576, **sel_kw)
        assert (keep.side is not None) == on and (keep.zeros is None) == (rows > 1 or on)
        assert (keep.order is not None) == (rows == 1 and gather)
        calls.clear()
        (got,) = ops.sparse_matvec(x, keep, (w,), (b,), residual=(r, a), gemv=gemv, tail=adapter != "xla")
        assert len(calls) == (0 if rows == 1 and adapter != "xla" else 1)
        xs = np.asarray(ops.apply(x, keep.thr), np.float64)
        want = xs @ np.asarray(w, np.float64) + np.asarray(b, np.float64) + np.asarray(r, np.float64) @ np.asarray(a, np.float64)
        assert got.shape == (rows, 1, 576) and got.dtype == jnp.bfloat16
        assert _rel(got, want) < 1e-2
    with pytest.raises(ValueError, match="a residual goes with one weight"):
        ops.sparse_matvec(x, keep.thr, (w, w), (None, None), residual=(r, a))


# ----------------------------------------------------------------------------- the decode path
def _kernels_traced(monkeypatch) -> set:
    """Every Pallas launch traced from now on, as (kernel, option): the selection's side role ("zeros"
    or "add") and prologue, the sparse GEMVs' r·A tail tiles."""
    from jax.experimental import pallas as pl

    seen, orig = set(), pl.pallas_call

    def spy(kernel, *a, **k):
        kw = getattr(kernel, "keywords", {})
        f = getattr(kernel, "func", kernel)
        opt = (kw.get("side") or (None,))[0] if f.__name__ == "_select_kernel" else kw.get("tail")
        seen.add((f.__module__.rsplit(".", 1)[-1] + "." + f.__name__, opt))
        if f.__name__ == "_select_kernel" and kw.get("pro"):
            seen.add(("select.prologue", kw["pro"]))
        return orig(kernel, *a, **k)

    monkeypatch.setattr(pl, "pallas_call", spy)
    return seen


SELECT, GATHER, MASKED, STEP = "select._select_kernel", "sparse_gemv._gather_kernel", "sparse_gemv._kernel", "attention._step_kernel"
# (batch, plan edits on DecodePlan.kernels(kind), decode kind, kernels that must run, kernels that must not)
PLAN_CASES = [
    (1, "", "larosa", {(SELECT, "zeros"), (SELECT, "add"), (GATHER, False), (STEP, None), ("select.prologue", "norm+add")},
     {(MASKED, False), (MASKED, True), (GATHER, True)}),
    (1, "adapter=tail", "larosa", {(GATHER, True)}, {(SELECT, "add"), (SELECT, "zeros")}),
    (1, "o.gemv=xla,down.select=off,down.gemv=xla", "topk", {(GATHER, False), ("select.prologue", "norm+add+gain")},
     {(MASKED, False)}),
    (1, "", "teal", {(MASKED, False), ("select.prologue", "norm+add+gain")}, {(GATHER, False)}),
    (1, "", "dense",
     {(MASKED, False), ("select.prologue", "norm+add+gain"), (STEP, None)}, {(GATHER, False), ("gemv._kernel", None)}),
    (1, "", "larosa-threshold", {(MASKED, True), (MASKED, False), ("select.prologue", "norm+add+gain")},
     {(GATHER, False), (SELECT, "add")}),
    (4, "adapter=xla,qkv.prologue=off,gate_up.prologue=off,attention=off", "larosa", {(SELECT, None)},
     {(GATHER, False), (MASKED, False), (STEP, None), ("select.prologue", "norm+add")}),
]


@pytest.mark.parametrize("batch,edits,method,runs,skips", PLAN_CASES)
def test_decode_plans_reach_their_kernels_and_match_the_jnp_path(batch, edits, method, runs, skips, monkeypatch):
    """A bf16 model (Qwen2 shape: q/k/v biases, GQA, head_dim 64) under each decode plan: prefill + decode steps give
    the jnp path's logits and greedy tokens, and the plan's kernels are the ones that run (interpret
    mode): one token through the selection kernel (with the norm prologue, the residual adapter on its
    spare programs), masked-tile or gather GEMVs and the decode-step kernel; four through the selection
    and XLA's GEMMs, with the plan's parts switched off (prologue, adapter and attention in XLA)."""
    from larosa_jax.config import ModelConfig
    from larosa_jax.models import init_cache
    from larosa_jax.models.random_init import random_model
    from larosa_jax.plan import DecodePlan
    from larosa_jax.sparse_model import SparseModel, sparsify
    from larosa_jax.sparsity import SITES, SparseConfig, TealProjection

    cfg = ModelConfig.from_hf({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6})
    fused = method.startswith("larosa")  # La RoSA fused (adapters, gains folded) or Top-K / TEAL on the plain model (γ applied)
    base = random_model(cfg, jnp.bfloat16, seed=3, adapters=fused)
    base32 = random_model(cfg, jnp.float32, seed=3, adapters=fused)  # the same draws before rounding to bf16
    prompt = jnp.asarray(np.random.default_rng(batch).integers(0, 256, (batch, 6)), jnp.int32)
    plan = DecodePlan.kernels(method).edit(edits)
    th = None
    if method in ("teal", "larosa-threshold"):  # thresholds at the quartile of the prompt's |x| (γ applied; the
        from _helpers import capture  # fused model's rotated rows), per site and layer

        rec = capture(base, prompt)
        th = {s: np.array([np.quantile(np.abs(rec[f"{s}.{l}"].astype(np.float32)), 0.25) for l in range(2)])
              for s in SITES}

    def model(plan, base=base):
        if method == "dense":  # the dense model on the threshold path's launches, every entry kept
            return SparseModel(base, SparseConfig("dense"), None, plan)
        if th is not None:
            sc = SparseConfig("teal", "faithful", 0.25) if method == "teal" else SparseConfig(
                "larosa", "fused", 0.25, select="threshold")
            return SparseModel(base, sc, TealProjection(th), plan)
        return sparsify(base, None, SparseConfig(method, "fused" if fused else "faithful", 0.25), plan)

    def run(sm, feed=None, dtype=jnp.bfloat16):
        """Logits of the prompt and 2 decode steps; fed ``feed``'s greedy tokens (teacher forcing), else its own."""
        cache = init_cache(cfg, batch, 64, dtype)
        logits, cache = sm(prompt, cache)
        out = [np.asarray(logits[:, -1], np.float32)]
        for i in range(2):
            tok = jnp.asarray((out if feed is None else feed)[i].argmax(-1), jnp.int32)[:, None]
            logits, cache = sm(tok, cache)
            out.append(np.asarray(logits[:, -1], np.float32))
        return np.stack(out)

    want = run(model(DecodePlan.reference()))
    # bf16's own noise here: the jnp path against the float32 model (rounding, and the near-tied Top-K entries
    # it flips; how many depends on the CPU's summation order)
    noise = _rel(want, run(model(DecodePlan.reference(), base32), feed=want, dtype=jnp.float32))
    sm = model(plan)
    seen = _kernels_traced(monkeypatch)
    sg._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every shape here tiles: no fallback
        got = run(sm, feed=want)
    assert np.isfinite(got).all()
    # the kernels round in another order (norm in the kernel, float32 sums) and flip other near-tied entries: within
    # twice bf16's own noise (a few %; a wrong tile, keep set or adapter is ~100%); the same greedy token wherever the
    # jnp path's top two are not near-tied
    assert noise < 0.1
    assert _rel(got, want) < max(3e-2, 2 * noise), f"kernels vs jnp path {_rel(got, want):.4f}, bf16 noise {noise:.4f}"
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.02 * np.abs(want).max(-1)
    assert clear.any()
    np.testing.assert_array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert runs <= seen, f"plan {edits!r}: expected {runs - seen} among {sorted(map(str, seen))}"
    assert not skips & seen, f"plan {edits!r}: {skips & seen} ran"
