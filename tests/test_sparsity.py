"""Top-K, α → k, effective sparsity and the sparse projections (DESIGN.md §1 "Top-K", baselines).

- the official α keeps what the public code keeps, k = int((1 − s)·D) with s = 0.8p (rot) or 1.2p (plain);
  explicit α keeps k = round(α·(1 − p)·D), checked against hand-computed values; α giving k < 1 and p
  outside [0, 1) are errors with the range;
- Top-K keeps exactly k entries per token, ties included, for every dtype, every site and every
  Top-K method (topk, larosa faithful with γ and γ-free, larosa fused), on synthetic tied inputs and
  on the real activations of stories260K;
- p = 0 is the identity for every method, and the hooks at "no sparsity" (k = D, threshold < 0) too;
- effective sparsity (parameter-weighted) by hand on a small config; the α search's α_plain keeps it
  at p within rounding.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _helpers import held_windows, logits, rel_err, stories, stories_stats
from larosa_jax import pallas as ops, sparsity
from larosa_jax.config import ModelConfig, RopeConfig
from larosa_jax.models.transformer import dense_projection
from larosa_jax.plan import DecodePlan
from larosa_jax.search import alpha_grid, alpha_plain_for, search_alpha
from larosa_jax.sparse_model import SparseModel, sparsify
from larosa_jax.sparsity import (
    METHODS, MODES, SITE_TYPE, SITES, CatsProjection, RotatedTopKProjection, SparseConfig, SparsityError,
    TealProjection, TopKProjection, effective_sparsity, effective_sparsity_of, k_for, official_k, site_dims, site_ks,
    site_params, topk,
)


def small_config(**kw) -> ModelConfig:
    """d = 8, f = 20, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4)."""
    base = dict(arch="llama", vocab_size=32, hidden_size=8, intermediate_size=20, num_layers=2, num_heads=2,
                num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope=RopeConfig(), max_position_embeddings=64,
                tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False)
    base.update(kw)
    return ModelConfig(**base)


def llama7b_config() -> ModelConfig:
    return small_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128)


def tied_values(rng, shape, dtype=np.float32) -> np.ndarray:
    """Magnitudes in {1, 2, 3} with random signs: many exact ties, no zeros; the last row of every
    batch has a single magnitude (all tied)."""
    x = rng.integers(1, 4, shape).astype(np.float64) * np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    x[..., -1, :] = np.where(rng.random(shape[-1]) < 0.5, -2.0, 2.0)
    return x.astype(dtype)


# ----------------------------------------------------------------------------- α → k
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.4, 0.5, 0.6])
def test_official_and_uniform_alphas(p):
    a_rot, a_plain = SparseConfig("larosa", "faithful", p).alphas()
    assert a_rot == pytest.approx((1 - 0.8 * p) / (1 - p), rel=1e-12)
    assert a_plain == pytest.approx((1 - 1.2 * p) / (1 - p), rel=1e-12)
    # i.e. rot inputs keep (1 − 0.8p)·D, plain inputs (1 − 1.2p)·D
    assert a_rot * (1 - p) == pytest.approx(1 - 0.8 * p, rel=1e-12)
    assert a_plain * (1 - p) == pytest.approx(1 - 1.2 * p, rel=1e-12)
    assert SparseConfig("topk", "faithful", p, "uniform").alphas() == (1.0, 1.0)
    assert SparseConfig("topk", "faithful", p, (0.9, 1.3)).alphas() == (0.9, 1.3)


@pytest.mark.parametrize(
    "alpha,p,dim,k",
    [(1.0, 0.5, 64, 32), (1.2, 0.5, 64, 38), (0.8, 0.5, 172, 69), (1.0, 0.25, 172, 129), (0.9, 0.4, 96, 52),
     (1.1, 0.4, 200, 132), (1.0, 0.0, 64, 64), (2.0, 0.5, 64, 64), (0.02, 0.5, 64, 1), (1.3, 0.9, 11008, 1431)],
)
def test_k_for_is_rounded_alpha_one_minus_p_d(alpha, p, dim, k):
    # expected k computed by hand: round(α·(1 − p)·D)
    assert k_for(alpha, p, dim) == k


@pytest.mark.parametrize(
    "p,expected",  # stories260K: qkv/gate_up/o inputs D = 64, down D = 172; official α, truncated as the public code
    [(0.25, {"qkv": 51, "gate_up": 51, "o": 44, "down": 120}),   # 0.8·64 = 51.2, 0.7·64 = 44.8, 0.7·172 = 120.4
     (0.4, {"qkv": 43, "gate_up": 43, "o": 33, "down": 89}),     # 0.68·64 = 43.52, 0.52·64 = 33.28, 0.52·172 = 89.44
     (0.5, {"qkv": 38, "gate_up": 38, "o": 25, "down": 68})],    # 0.6·64 = 38.4, 0.4·64 = 25.6, 0.4·172 = 68.8
)
def test_site_ks_official_stories(p, expected):
    cfg = stories().config
    assert site_dims(cfg) == {"qkv": 64, "o": 64, "gate_up": 64, "down": 172}
    assert site_ks(cfg, SparseConfig("larosa", "faithful", p)) == expected
    # uniform α: every site keeps round((1 − p)·D)
    assert site_ks(cfg, SparseConfig("topk", "faithful", p, "uniform")) == {
        s: round((1 - p) * d) for s, d in site_dims(cfg).items()}


@pytest.mark.parametrize("p", [0.05, 0.1, 0.15, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8])
def test_official_k_is_the_public_codes(p):
    """``int((1 - s) * D)`` with ``s = p * 0.8`` / ``p * 1.2``, in the public code's float arithmetic, for
    the dims of SmolLM2, Llama-2/3 and Qwen2 (products like (1 - 0.56)·D land just below integers)."""
    for d in (64, 172, 576, 1536, 3584, 4096, 11008, 14336, 18944):
        assert official_k(p, d, "rot") == int((1 - p * 0.8) * d)
        if p * 1.2 < 1 and int((1 - p * 1.2) * d) >= 1:
            assert official_k(p, d, "plain") == int((1 - p * 1.2) * d)
    with pytest.raises(SparsityError, match="p must be below 0.8333"):
        official_k(0.9, 4096, "plain")


def test_official_effective_sparsity_of_smollm2():
    """SmolLM2-135M at p = 0.25 with the public code's k: effective sparsity 0.2354 (round(α(1−p)D) gave 0.2342)."""
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
                               "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                               "vocab_size": 49152})
    sc = SparseConfig("larosa", "faithful", 0.25)
    assert site_ks(cfg, sc) == {"qkv": 460, "o": 403, "gate_up": 460, "down": 1075}
    assert round(effective_sparsity_of(cfg, sc), 4) == 0.2354


@pytest.mark.parametrize("p,dim", [(0.5, 64), (0.25, 172), (0.0, 96)])
def test_alpha_giving_k_below_one_is_an_error_with_a_valid_range(p, dim):
    with pytest.raises(SparsityError) as ei:
        k_for(1e-4, p, dim, what="qkv: ")
    msg = str(ei.value)
    assert "k=0" in msg and f"D={dim}" in msg and msg.startswith("qkv: ")
    m = re.search(r"α must lie in \[([-+0-9.e]+), ([-+0-9.e]+)\]", msg)
    assert m, f"no allowed range in {msg!r}"
    lo, hi = float(m.group(1)), float(m.group(2))
    # the stated range must be the valid one: both ends valid, just outside invalid
    for a in (lo, hi, (lo + hi) / 2):
        try:
            k = k_for(a, p, dim)
        except SparsityError as e:
            pytest.fail(f"α={a} lies in the range the error states ([{lo}, {hi}]) but is refused: {e}")
        assert 1 <= k <= dim
    with pytest.raises(SparsityError):
        k_for(lo * 0.4, p, dim)
    # and through a SparseConfig: the site is named
    with pytest.raises(SparsityError, match=r"α must lie in"):
        site_ks(stories().config, SparseConfig("topk", "faithful", 0.5, (1.0, 1e-3)))


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, float("nan")])
def test_sparsity_outside_unit_interval_is_an_error(p):
    with pytest.raises(SparsityError, match=re.escape("must be in [0, 1)")):
        SparseConfig("larosa", "faithful", p)


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1])
def test_search_alpha_rejects_sparsity_outside_unit_interval(p):
    s = stories()
    try:
        search_alpha(s.model, stories_stats("faithful"), p, held_windows(1, 32), points=2, progress=False)
    except SparsityError as e:
        assert "[0, 1)" in str(e), e
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"search_alpha(p={p}) raised {type(e).__name__}: {e} instead of a SparsityError "
                    "naming the allowed range [0, 1)")
    else:
        pytest.fail(f"search_alpha(p={p}) accepted a sparsity outside [0, 1)")


def test_unknown_method_mode_alpha_list_the_valid_ones():
    with pytest.raises(SparsityError) as ei:
        SparseConfig("wina", "faithful", 0.5)
    assert "wina" in str(ei.value) and all(m in str(ei.value) for m in METHODS)
    with pytest.raises(SparsityError) as ei:
        SparseConfig("larosa", "decode", 0.5)
    assert "decode" in str(ei.value) and all(m in str(ei.value) for m in MODES)
    with pytest.raises(SparsityError, match="official"):
        SparseConfig("larosa", "faithful", 0.5, "searched-by-hand")


# ----------------------------------------------------------------------------- Top-K
_jit_topk = jax.jit(topk)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 172), (1, 1, 7)])
def test_topk_keeps_exactly_k_with_ties(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(tied_values(rng, shape), dtype)
    d = shape[-1]
    xs = np.asarray(x.astype(jnp.float32))
    # a Python int k (eager) and a traced k (one compiled model serves every α and p) agree
    eager = topk(x, d // 2)
    assert eager.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(_jit_topk(x, jnp.int32(d // 2))))
    for k in sorted({1, 2, d // 3, d // 2, d - 1, d} - {0}):
        out = np.asarray(_jit_topk(x, jnp.int32(k)).astype(jnp.float32))
        kept = out != 0
        assert (kept.sum(-1) == k).all(), f"k={k}: kept {np.unique(kept.sum(-1))}"
        np.testing.assert_array_equal(np.where(kept, xs, 0.0), out)  # kept entries unchanged
        mag = np.abs(xs)
        min_kept = np.where(kept, mag, np.inf).min(-1)
        max_dropped = np.where(kept, -np.inf, mag).max(-1)
        assert (min_kept >= max_dropped).all(), f"k={k}: a dropped entry is larger than a kept one"
        # ties at the threshold: lower index first (documented)
        for row_kept, row_mag in zip(kept.reshape(-1, d), mag.reshape(-1, d)):
            at_t = row_kept[row_mag == row_mag[row_kept].min()]
            assert not (np.diff(at_t.astype(int)) > 0).any(), f"k={k}: a later tied entry kept, an earlier dropped"


def test_topk_continuous_values_match_sort():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 200)).astype(np.float32)
    for k in (1, 37, 120, 200):
        out = np.asarray(_jit_topk(jnp.asarray(x), jnp.int32(k)))
        idx = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
        ref = np.zeros_like(x)
        np.put_along_axis(ref, idx, np.take_along_axis(x, idx, -1), -1)
        np.testing.assert_array_equal(out, ref)


def _site_linears(block):
    a, m = block.attn, block.mlp
    return {"qkv": (a.q, a.k, a.v), "o": (a.o,), "gate_up": (m.gate, m.up), "down": (m.down,)}


@pytest.mark.parametrize("kind", ["topk", "larosa_faithful", "larosa_gamma_free"])
def test_projections_keep_exactly_k_at_every_site_with_ties(kind, monkeypatch):
    """Call each projection hook directly with heavily tied inputs; spy on what reaches the weights."""
    s = stories()
    cfg, layer = s.config, 2
    dims = site_dims(cfg)
    ks = {"qkv": 17, "o": 30, "gate_up": 40, "down": 55}
    rng = np.random.default_rng(7)
    d = cfg.hidden_size
    # signed permutations: rotating a tied vector keeps its ties, so Top-K in the rotated basis sees them
    perms = np.zeros((cfg.num_layers, d, d), np.float32)
    for l in range(cfg.num_layers):
        perms[l, np.arange(d), rng.permutation(d)] = np.where(rng.random(d) < 0.5, -1.0, 1.0)
    if kind == "topk":
        proj = TopKProjection(ks)
    else:
        proj = RotatedTopKProjection(ks, perms, gamma_free=kind == "larosa_gamma_free")
    seen = []
    project = sparsity.project

    def spy(x, linears, *, kernel=False):  # the dense path (rotated sites): what the weights see
        seen.append((current[0], np.asarray(x, np.float32)))
        return project(x, linears, kernel=kernel)

    kept_projection = sparsity.kept_projection

    def spy_kept(x, keep, linears, residual=None, raw=False, **gemv):  # the sparse-GEMV path: the weights see keep(x)
        seen.append((current[0], np.asarray(ops.apply(x, keep.thr), np.float32)))
        return kept_projection(x, keep, linears, residual, raw, **gemv)

    monkeypatch.setattr(sparsity, "project", spy)
    monkeypatch.setattr(sparsity, "kept_projection", spy_kept)
    linears = _site_linears(s.model.layers[layer])
    current = [None]
    for site in SITES:
        current[0] = site
        x = tied_values(rng, (2, 9, dims[site]))
        gain = np.full(dims[site], 2.0, np.float32) if SITE_TYPE[site] == "rot" else None
        out, _ = proj(site, layer, jnp.asarray(x), linears[site], DecodePlan.reference(),
                      gain=None if gain is None else jnp.asarray(gain))
        got_site, xs = seen[-1]
        assert got_site == site
        kept = xs != 0
        assert (kept.sum(-1) == ks[site]).all(), f"{kind} {site}: kept {np.unique(kept.sum(-1))} != k={ks[site]}"
        # what the weights see is the input times γ on the kept set (γ before the rotation or after it: the
        # signed permutations commute with a constant γ)
        xin = x if gain is None else x * gain
        np.testing.assert_allclose(np.where(kept, xin, 0.0), xs, rtol=1e-6, atol=0)
        mag = np.abs(xin)
        assert (np.where(kept, mag, np.inf).min(-1) >= np.where(kept, -np.inf, mag).max(-1)).all()
        # and the hook returns the linears applied to that sparse input
        for o, r in zip(out, project(jnp.asarray(xs), linears[site])):
            np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,mode", [("topk", "faithful"), ("larosa", "faithful"), ("larosa", "fused")])
def test_real_activations_keep_exactly_k_at_every_site(method, mode, monkeypatch):
    """Spy on every Top-K call of a stories260K forward: one per site and layer, each keeping exactly k."""
    s = stories()
    stats = stories_stats("fused" if mode == "fused" else "faithful")
    calls = []
    orig = ops.select_topk

    def spy(x, k, width=0, side=None, prologue=None, **kw):  # every Top-K decision of the projections goes through select_topk
        keep = orig(x, k, width, side, prologue, **kw)
        row = x if prologue is None else keep.x  # with a prologue (norm, SiLU·up) the row it made
        calls.append((jnp.sum(ops.apply(row, keep.thr) != 0, axis=-1), jnp.sum(row == 0, axis=-1), jnp.asarray(k)))
        widths.append(row.shape[-1])  # static, recorded while tracing
        return keep

    monkeypatch.setattr(ops, "select_topk", spy)
    widths = []

    def run(graphdef, state, tokens):
        calls.clear()
        widths.clear()
        nnx.merge(graphdef, state)(tokens)
        return list(calls)

    compiled = {}
    tokens = jnp.asarray(held_windows(1, 128))
    dims = site_dims(s.config)
    for p in (0.25, 0.5):  # k is state: both p share one compilation
        sc = SparseConfig(method, mode, p)
        graphdef, state = nnx.split(sparsify(s.model, stats, sc))
        fn = compiled.setdefault(graphdef, jax.jit(run, static_argnums=0))
        got = jax.device_get(fn(graphdef, state, tokens))
        expected = site_ks(s.config, sc)
        assert len(got) == 4 * s.config.num_layers, "one Top-K per site and layer"
        assert widths == [dims[SITES[i % 4]] for i in range(len(got))], widths
        for i, (kept, zeros, k) in enumerate(got):
            site, layer = SITES[i % 4], i // 4
            assert int(k) == expected[site], f"p={p} {site} layer {layer}: k={int(k)}, expected {expected[site]}"
            assert (zeros == 0).all(), "test premise: real activations have no exact zeros"
            assert (kept == expected[site]).all(), f"p={p} {site} layer {layer}: kept {np.unique(kept)} != k"
    assert len(compiled) == 1


# ----------------------------------------------------------------------------- p = 0 and no-sparsity hooks
@pytest.mark.parametrize("method,mode", [("dense", "faithful"), ("topk", "faithful"), ("teal", "faithful"),
                                         ("cats", "faithful"), ("larosa", "faithful"), ("larosa", "fused")])
def test_p_zero_is_the_identity(method, mode):
    s = stories()
    tokens = held_windows(2, 128)
    dense = logits(s.model, tokens)
    stats = stories_stats("fused" if mode == "fused" else "faithful")
    sm = sparsify(s.model, stats, SparseConfig(method, mode, 0.0))
    assert sm.effective_sparsity == 0.0
    out = logits(sm, tokens)
    if mode == "fused":
        assert rel_err(out, dense) <= 1e-4
    else:
        np.testing.assert_array_equal(out, dense)


def test_hooks_without_sparsity_are_the_identity_and_sparsify_with_it():
    """k = D everywhere / thresholds below every |x|: the hooks themselves must not change the model;
    the same hooks (same compiled graph, other state) at p = 0.5 must change it."""
    s = stories()
    cfg = s.config
    tokens = held_windows(2, 128)
    dense = logits(s.model, tokens)
    full, L = site_dims(cfg), cfg.num_layers
    faithful, fused = stories_stats("faithful"), stories_stats("fused")
    cases = {  # name: (hook with no sparsity, the same method at p = 0.5 via sparsify, tolerance)
        "topk": (TopKProjection(full), sparsify(s.model, faithful, SparseConfig("topk", "faithful", 0.5)), 1e-6),
        "larosa faithful": (RotatedTopKProjection(full, faithful.rotations, gamma_free=False),
                            sparsify(s.model, faithful, SparseConfig("larosa", "faithful", 0.5)), 1e-4),
        "larosa γ-free": (RotatedTopKProjection(full, fused.rotations, gamma_free=True),
                          sparsify(s.model, fused, SparseConfig("larosa", "faithful", 0.5)), 1e-4),
        "teal": (TealProjection({site: np.full(L, -1.0) for site in SITES}),
                 sparsify(s.model, faithful, SparseConfig("teal", "faithful", 0.5)), 1e-6),
        "cats": (CatsProjection(np.full(L, -1.0)), sparsify(s.model, faithful, SparseConfig("cats", "faithful", 0.5)), 1e-6),
    }
    for name, (hook, sparse, tol) in cases.items():
        assert type(sparse.proj) is type(hook), name
        assert getattr(sparse.proj, "gamma_free", None) == getattr(hook, "gamma_free", None), name
        off = SparseConfig(sparse.method, sparse.mode, 0.0)  # same static fields: one compilation per hook
        err = rel_err(logits(SparseModel(s.model, off, hook), tokens), dense)
        assert err <= tol, f"{name} without sparsity: logits moved by {err:.3g}"
        assert rel_err(logits(sparse, tokens), dense) > 1e-3, f"{name} at p=0.5 left the logits unchanged"


# ----------------------------------------------------------------------------- effective sparsity
def test_effective_sparsity_by_hand():
    cfg = small_config()
    # weights behind each site: qkv 8·(8+4+4) = 128, o 8·8 = 64, gate_up 2·8·20 = 320, down 20·8 = 160
    assert site_params(cfg) == {"qkv": 128, "o": 64, "gate_up": 320, "down": 160}
    total = 672
    assert effective_sparsity(cfg, {"qkv": 0.5, "o": 0.25, "gate_up": 0.1, "down": 0.0}) == pytest.approx(
        (64 + 16 + 32) / total)
    # official α at p = 0.5: rot keeps int(0.6·8) = 4 of 8, o keeps int(0.4·8) = 3 of 8,
    # down keeps int(0.4·20) = 8 of 20 → (128·4/8 + 320·4/8 + 64·5/8 + 160·12/20) / 672 = 360/672
    sc = SparseConfig("larosa", "faithful", 0.5)
    assert site_ks(cfg, sc) == {"qkv": 4, "o": 3, "gate_up": 4, "down": 8}
    assert effective_sparsity_of(cfg, sc) == pytest.approx(360 / total, abs=1e-12)
    assert effective_sparsity_of(cfg, SparseConfig("topk", "faithful", 0.5)) == pytest.approx(360 / total, abs=1e-12)
    assert effective_sparsity_of(cfg, SparseConfig("topk", "faithful", 0.5, "uniform")) == pytest.approx(0.5)
    assert effective_sparsity_of(cfg, SparseConfig("teal", "faithful", 0.4)) == pytest.approx(0.4)
    # CATS skips the up columns and down rows of masked entries: 0.4 · (160 + 160) / 672
    assert effective_sparsity_of(cfg, SparseConfig("cats", "faithful", 0.4)) == pytest.approx(0.4 * 320 / total)
    assert effective_sparsity_of(cfg, SparseConfig("dense", "faithful", 0.4)) == 0.0
    assert effective_sparsity_of(cfg, SparseConfig("larosa", "fused", 0.0)) == 0.0
    # the sparse model reports the same number
    s = stories()
    sc = SparseConfig("larosa", "faithful", 0.4)
    sm = sparsify(s.model, stories_stats("faithful"), sc)
    assert sm.effective_sparsity == pytest.approx(effective_sparsity_of(s.config, sc), abs=1e-6)


CONFIGS = {"small": small_config, "stories": lambda: stories().config, "llama7b": llama7b_config}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_alpha_plain_keeps_effective_sparsity_at_p(cfg_name):
    cfg = CONFIGS[cfg_name]()
    tol = max(1.0 / d for d in site_dims(cfg).values())
    checked = 0
    for p in (0.25, 0.4, 0.5, 0.6):
        for a_rot in (0.9, 1.0, 1.1, 1.2):
            a_plain = alpha_plain_for(cfg, a_rot)
            if not 0.5 / ((1 - p) * min(site_dims(cfg).values())) < a_plain <= 1 / (1 - p):
                continue  # α_plain out of range at this p (k < 1 or k > D)
            eff = effective_sparsity_of(cfg, SparseConfig("larosa", "faithful", p, (a_rot, a_plain)))
            assert abs(eff - p) <= tol, f"p={p} α=({a_rot}, {a_plain:.4f}): effective {eff:.5f}"
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("cfg_name,p", [("stories", 0.25), ("stories", 0.5), ("llama7b", 0.25), ("llama7b", 0.4),
                                        ("llama7b", 0.5), ("small", 0.5)])
def test_alpha_grid_points_are_valid_and_keep_effective_sparsity(cfg_name, p):
    """Every point the α search will try must be a valid setting (k in [1, D] at every site) whose
    effective sparsity is p within rounding."""
    cfg = CONFIGS[cfg_name]()
    tol = max(1.0 / d for d in site_dims(cfg).values())
    grid = alpha_grid(cfg, p, points=9)
    assert len(grid) == 9 and len({a for a, _ in grid}) == 9
    for a_rot, a_plain in grid:
        sc = SparseConfig("larosa", "faithful", p, (a_rot, a_plain))
        try:
            ks = site_ks(cfg, sc)
        except SparsityError as e:
            pytest.fail(f"alpha_grid({cfg_name}, p={p}) offers an invalid point α=({a_rot:.4f}, {a_plain:.4f}): {e}")
        assert all(1 <= ks[s] <= d for s, d in site_dims(cfg).items())
        eff = effective_sparsity_of(cfg, sc)
        assert abs(eff - p) <= tol, f"α=({a_rot:.4f}, {a_plain:.4f}): effective {eff:.5f} at p={p}"


def test_teal_bf16_pairs_are_the_threshold_in_the_rows_dtype():
    """A bf16 TEAL projection compares with its precomputed pairs: the same keep set as |x·γ| > τ
    rounded to bf16, at every site, with τ chosen between bf16 neighbours (where float32 would differ)."""
    from larosa_jax.models.random_init import random_model

    cfg = small_config()
    model = random_model(cfg, jnp.bfloat16, seed=2)
    rng = np.random.default_rng(3)
    dims = site_dims(cfg)
    L = cfg.num_layers
    taus = {s: rng.uniform(0.3, 0.9, L).astype(np.float32) for s in SITES}
    proj = TealProjection(taus)
    for layer in range(L):
        linears = _site_linears(model.layers[layer])
        for site in SITES:
            x = jnp.asarray(rng.standard_normal((1, 3, dims[site])), jnp.bfloat16)
            gain = jnp.asarray(rng.uniform(0.5, 1.5, dims[site]), jnp.bfloat16) if SITE_TYPE[site] == "rot" else None
            xin = x if gain is None else gain * x
            tau = jnp.asarray(taus[site][layer], jnp.bfloat16)
            plan = DecodePlan.reference()
            want, _ = dense_projection(site, layer, jnp.where(jnp.abs(xin) > tau, xin, 0), linears[site], plan)
            got, _ = proj(site, layer, x, linears[site], plan, gain=gain)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
