"""The deployable La RoSA's levers, each against a plain reference, and the per-layer teacher-forced error.

- the joint and global flavours: Q diagonalises the joint matrix of the float64 covariances of both
  rotated sites; the global flavour gives one Q and a fused model without adapters; identity gives I;
- rotated thresholds: the calibrated quantiles are those of |norm(h)·Q_l|, the projection keeps
  |row| > τ of the folded model's rows (a jnp reference on random inputs);
- weight-aware Top-K: with every weight-row norm equal it is plain Top-K, otherwise it keeps the
  Top-K of |a_i|·‖W_i‖ of the unweighted model's rows;
- p = 0 is the dense model for every variant;
- ``layer_errors`` against an independent numpy Llama layer;
- TEAL's block-wise greedy allocation: each decision against the four candidates' errors measured through
  the whole model, the table's thresholds are the calibration quantiles of its rows.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import larosa_jax

from _helpers import cal_windows, capture, held_windows, logits, rel_err, stories, stories_stats
from larosa_jax import calibration, pallas as ops
from larosa_jax.fusion import weight_aware
from larosa_jax.layer_error import layer_errors
from larosa_jax.plan import DecodePlan
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SITES, SparseConfig, SparsityError, TealProjection, site_dims, site_ks, site_sparsities


def _norm_rows(x):  # γ-free RMSNorm rows, float64
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + stories().config.rms_norm_eps)


def test_joint_and_global_rotations_diagonalise_the_joint_matrix():
    s = stories()
    cfg = s.config
    acts = capture(s.model, cal_windows())
    mets = []
    for l in range(cfg.num_layers):
        blk = s.model.layers[l]
        hs = []
        for site in ("qkv", "gate_up"):
            x = acts[f"{site}.{l}.norm"].reshape(-1, cfg.hidden_size).astype(np.float64)
            hs.append(x.T @ x)
        gains = [np.asarray(n.scale[...], np.float64) for n in (blk.attn_norm, blk.mlp_norm)]
        m = calibration.joint_metric(*hs, *gains)
        # the formula itself: Σ_s Γ H_s Γ / tr + ε H_s / tr over the damped covariances
        want = 0
        for h, g in zip(hs, gains):
            hd = h + calibration.DAMP * np.mean(np.diag(h)) * np.eye(len(h))
            ghg = g[:, None] * hd * g[None]
            want = want + ghg / np.trace(ghg) + calibration.JOINT_EPS * hd / np.trace(hd)
        np.testing.assert_allclose(m, want, rtol=1e-12)
        q = stories_stats("joint").rotations[l].astype(np.float64)
        off = q.T @ m @ q
        assert np.abs(off - np.diag(np.diag(off))).max() <= 1e-5 * np.abs(off).max(), f"layer {l}"
        mets.append(m / np.trace(m))
    qg = stories_stats("global").rotations.astype(np.float64)
    assert all(np.array_equal(qg[0], ql) for ql in qg[1:])
    assert all(np.array_equal(q, np.eye(cfg.hidden_size)) for q in stories_stats("identity").rotations)
    off = qg[0].T @ sum(mets) @ qg[0]
    assert np.abs(off - np.diag(np.diag(off))).max() <= 1e-5 * np.abs(off).max()


@pytest.mark.parametrize("flavour", ["fused", "joint", "identity"])
def test_rotated_quantiles_are_those_of_the_rotated_rows(flavour):
    """quantiles.{qkv,gate_up}_rot: of |norm(h)·Q_l| over the calibration tokens (from a row sample)."""
    s = stories()
    st = stories_stats(flavour)
    acts = capture(s.model, cal_windows())
    for site in ("qkv", "gate_up"):
        for l in range(s.config.num_layers):
            a = np.abs(acts[f"{site}.{l}.norm"].reshape(-1, s.config.hidden_size).astype(np.float64)
                       @ st.rotations[l].astype(np.float64))
            for p in (0.3, 0.5, 0.7):
                frac = float(np.mean(a <= st.rotated_threshold(site, p)[l]))
                assert abs(frac - p) < 0.03, f"{site} layer {l} p={p}: {frac:.3f} of the rotated rows at or under τ"


def test_threshold_projection_keeps_the_rows_above_the_rotated_thresholds():
    """SparseConfig(select="threshold"): TEAL's projection on the folded model's rows with the rotated
    thresholds at q/k/v and gate/up and the plain ones at o and down, at the sites' sparsities; on random
    inputs it equals (|row| > τ)·row @ W."""
    s = stories()
    st = stories_stats("joint")
    sc = SparseConfig("larosa", "fused", 0.5, select="threshold")
    m = sparsify(s.model, st, sc)
    assert isinstance(m.proj, TealProjection) and m.base.fused and m.base.adapters is not None
    sp = site_sparsities(s.config, sc)
    th = np.asarray(m.proj.thresholds[...])
    for i, site in enumerate(SITES):
        want = st.rotated_threshold(site, sp[site]) if site in ("qkv", "gate_up") else st.teal_threshold(site, sp[site])
        np.testing.assert_array_equal(th[i], want)
    rng = np.random.default_rng(0)
    blk = m.base.layers[1]
    linears = {"qkv": (blk.attn.q, blk.attn.k, blk.attn.v), "o": (blk.attn.o,), "gate_up": (blk.mlp.gate, blk.mlp.up),
               "down": (blk.mlp.down,)}
    for i, site in enumerate(SITES):
        x = jnp.asarray(rng.standard_normal((2, 5, site_dims(s.config)[site])), jnp.float32)
        got, _ = m.proj(site, 1, x, linears[site], DecodePlan.reference())
        xs = np.where(np.abs(np.asarray(x)) > th[i, 1], np.asarray(x), 0.0)
        for g, lin in zip(got, linears[site]):
            want = xs @ np.asarray(lin.kernel[...]) + (0 if lin.bias is None else np.asarray(lin.bias[...]))
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(SparsityError, match="La RoSA's fused model"):
        SparseConfig("topk", "faithful", 0.5, select="threshold")


def test_realized_sparsity_counts_the_entries_the_thresholds_drop():
    """``realized_sparsity``: each site's sown share is the share of |row| ≤ τ (a plain count on random rows);
    over a model run it averages layers and tokens and weights sites by parameters; infinite thresholds
    drop everything; Top-K (exact k) gives None; measuring leaves the model as it was."""
    from larosa_jax.sparse_model import SparseModel, realized_sparsity
    from larosa_jax.sparsity import effective_sparsity
    from flax import nnx

    s = stories()
    m = sparsify(s.model, stories_stats("joint"), SparseConfig("larosa", "fused", 0.5, select="threshold"))
    th = np.asarray(m.proj.thresholds[...])
    blk = m.base.layers[2]
    rng = np.random.default_rng(1)
    m.proj.observe = True
    x = jnp.asarray(rng.standard_normal((3, 7, site_dims(s.config)["gate_up"])), jnp.float32)
    _, sown = nnx.capture(lambda p, *a: p(*a), nnx.Intermediate)(m.proj, "gate_up", 2, x, (blk.mlp.gate, blk.mlp.up),
                                                                  DecodePlan.reference())
    sown = sown["dropped_gate_up"].get_value()
    m.proj.observe = False
    assert float(sown[0]) == pytest.approx(float(np.mean(np.abs(np.asarray(x)) <= th[SITES.index("gate_up"), 2])))
    tokens = rng.integers(0, s.config.vocab_size, (2, 48))
    r = realized_sparsity(m, tokens)
    assert set(r["sites"]) == set(SITES) and all(0.2 < v < 0.8 for v in r["sites"].values())
    assert r["effective"] == pytest.approx(effective_sparsity(s.config, r["sites"]))
    assert m.proj.observe is False and not nnx.state(m, nnx.Intermediate)
    L = s.config.num_layers
    drop_all = SparseModel(s.model, SparseConfig("teal", sparsity=0.5), TealProjection({t: np.full(L, 1e30) for t in SITES}))
    assert realized_sparsity(drop_all, tokens)["sites"] == {t: 1.0 for t in SITES}
    assert realized_sparsity(sparsify(s.model, None, SparseConfig("topk", sparsity=0.5)), tokens) is None


def _unit_rows(model):
    """Every weight row of q/k/v (together), gate/up (together) and down scaled to norm 1 (in place)."""
    for blk in model.layers:
        for lins in ((blk.attn.q, blk.attn.k, blk.attn.v), (blk.mlp.gate, blk.mlp.up), (blk.mlp.down,)):
            n = np.linalg.norm(np.concatenate([np.asarray(l.kernel[...]) for l in lins], axis=1), axis=1)
            for lin in lins:
                lin.kernel.set_value(jnp.asarray(np.asarray(lin.kernel[...]) / n[:, None]))
    return model


def test_weight_aware_with_equal_row_norms_is_plain_topk():
    from larosa_jax.fusion import fuse

    s = stories()
    tokens = held_windows(2, 64)
    plain_model = _unit_rows(larosa_jax.load(s.ckpt))  # a copy: the shared model stays as it is
    fused = _unit_rows(fuse(s.model, stories_stats("joint").rotations))  # the rows the fused model reads
    for model, method, mode in ((plain_model, "topk", "faithful"), (fused, "larosa", "fused")):
        plain = logits(sparsify(model, None, SparseConfig(method, mode, 0.5)), tokens)
        weighted = logits(sparsify(model, None, SparseConfig(method, mode, 0.5, weighted=True)), tokens)
        assert rel_err(weighted, plain) < 1e-4, method
        # and unequal norms change it: the lever acts
        other = logits(sparsify(s.model, stories_stats("joint") if method == "larosa" else None,
                                SparseConfig(method, mode, 0.5, weighted=True)), tokens)
        assert rel_err(other, logits(sparsify(s.model, stories_stats("joint") if method == "larosa" else None,
                                              SparseConfig(method, mode, 0.5)), tokens)) > 1e-3


def test_weight_aware_keeps_the_topk_of_the_weighted_magnitudes():
    """Folded weight-aware Top-K: the same function at p = 0, and at the down site (plain model) it keeps the
    entries of largest |a_i|·‖W_down,i‖ of the unweighted model's down input."""
    s = stories()
    tokens = held_windows(2, 64)
    wa = weight_aware(s.model)
    assert rel_err(logits(wa, tokens), logits(s.model, tokens)) < 1e-5
    acts, acts_w = capture(s.model, tokens), capture(wa, tokens)
    k = site_ks(s.config, SparseConfig("topk", "faithful", 0.5))["down"]
    for l in range(s.config.num_layers):
        a = acts[f"down.{l}"].astype(np.float64)
        sw = np.linalg.norm(np.asarray(s.model.layers[l].mlp.down.kernel[...], np.float64), axis=1)
        keep_w = np.asarray(ops.keep_mask(jnp.asarray(acts_w[f"down.{l}"]), ops.topk_threshold(jnp.asarray(acts_w[f"down.{l}"]), k)))
        ref = np.argsort(-np.abs(a) * sw, axis=-1)[..., :k]
        want = np.zeros_like(keep_w)
        np.put_along_axis(want, ref, True, -1)
        assert (keep_w == want).mean() > 0.999, f"layer {l}"  # up to float rounding of near-ties
    with pytest.raises(SparsityError, match="weight-aware selection"):
        SparseConfig("teal", "faithful", 0.5, weighted=True)


@pytest.mark.parametrize("flavour", ["global", "identity"])
def test_weighted_quantiles_are_those_of_the_weighted_rows(flavour):
    """quantiles.{qkv,gate_up}_rotw and down_w: of |norm(h)·Q_l|·s and |down input|·s, s the row norms of the folded
    weights each site reads (computed here from the definition: Q_lᵀ·diag(γ)·W), over the calibration tokens."""
    s = stories()
    st = stories_stats(flavour)
    acts = capture(s.model, cal_windows())
    for l in range(s.config.num_layers):
        blk, q = s.model.layers[l], st.rotations[l].astype(np.float64)
        for site, norm, lins in (("qkv", blk.attn_norm, (blk.attn.q, blk.attn.k, blk.attn.v)),
                                 ("gate_up", blk.mlp_norm, (blk.mlp.gate, blk.mlp.up))):
            w = np.concatenate([np.asarray(x.kernel[...], np.float64) for x in lins], axis=1)
            sw = np.linalg.norm(q.T @ (np.asarray(norm.scale[...], np.float64)[:, None] * w), axis=1)
            a = np.abs(acts[f"{site}.{l}.norm"].reshape(-1, s.config.hidden_size).astype(np.float64) @ q) * sw
            for p in (0.3, 0.5, 0.7):
                frac = float(np.mean(a <= st.rotated_threshold(site, p, weighted=True)[l]))
                assert abs(frac - p) < 0.03, f"{site} layer {l} p={p}: {frac:.3f}"
        sw = np.linalg.norm(np.asarray(blk.mlp.down.kernel[...], np.float64), axis=1)
        a = np.abs(acts[f"down.{l}"].reshape(-1, s.config.intermediate_size).astype(np.float64)) * sw
        for p in (0.3, 0.5, 0.7):
            frac = float(np.mean(a <= st.weighted_threshold("down", p)[l]))
            assert abs(frac - p) < 0.03, f"down layer {l} p={p}: {frac:.3f}"


def test_weighted_thresholds_with_equal_row_norms_are_plain_thresholds():
    """All s = 1 (unit weight rows, γ = 1, Q = I): the weighted thresholds are the plain ones (q/k/v and gate/up from
    the same row sample exactly; down from another sample of the same entries) and the weight-aware model is the
    same function; with the real row norms the kept entries, and the logits, change."""
    s = stories()
    unit = larosa_jax.load(s.ckpt)
    for l in range(s.config.num_layers):
        blk = unit.layers[l]
        for norm in (blk.attn_norm, blk.mlp_norm):
            norm.scale.set_value(jnp.ones_like(norm.scale[...]))
        for lins in ((blk.attn.q, blk.attn.k, blk.attn.v), (blk.mlp.gate, blk.mlp.up), (blk.mlp.down,)):
            n = np.linalg.norm(np.concatenate([np.asarray(x.kernel[...]) for x in lins], axis=1), axis=1)
            for x in lins:
                x.kernel.set_value(jnp.asarray(np.asarray(x.kernel[...]) / n[:, None]))
    st = calibration.calibrate(unit, cal_windows(), flavour="identity", batch_size=4, progress=False)
    for p in (0.3, 0.5, 0.7):
        for site in ("qkv", "gate_up"):
            np.testing.assert_allclose(st.rotated_threshold(site, p, weighted=True), st.rotated_threshold(site, p),
                                       rtol=1e-5)
        np.testing.assert_allclose(st.weighted_threshold("down", p), st.teal_threshold("down", p), rtol=0.1)
    assert rel_err(logits(weight_aware(unit), held_windows(2, 64)), logits(unit, held_windows(2, 64))) < 1e-5
    old = dataclasses.replace(st, quantiles={k: v for k, v in st.quantiles.items() if k not in calibration.WEIGHTED_KEYS})
    with pytest.raises(calibration.CalibrationError, match="hold no quantiles qkv_rotw; recalibrate"):
        sparsify(s.model, old, SparseConfig("larosa", "fused", 0.5, select="threshold", weighted=True))
    tokens, st = held_windows(2, 64), stories_stats("identity")
    other = [logits(sparsify(s.model, st, SparseConfig("larosa", "fused", 0.5, select="threshold", weighted=w)), tokens)
             for w in (False, True)]
    assert rel_err(other[1], other[0]) > 1e-3


@pytest.mark.parametrize("flavour,select,weighted", [("joint", "topk", False), ("joint", "threshold", False),
                                                     ("global", "topk", True), ("global", "threshold", False),
                                                     ("global", "threshold", True), ("identity", "threshold", False)])
def test_p_zero_is_dense_for_every_deployable_variant(flavour, select, weighted):
    s = stories()
    tokens = held_windows(2, 64)
    m = sparsify(s.model, stories_stats(flavour), SparseConfig("larosa", "fused", 0.0, select=select, weighted=weighted))
    assert (m.base.adapters is None) == (flavour in ("global", "identity"))
    assert rel_err(logits(m, tokens), logits(s.model, tokens)) < 1e-4


# ----------------------------------------------------------------------------- per-layer teacher-forced error
def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def _topk(x, k):
    idx = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
    out = np.zeros_like(x)
    np.put_along_axis(out, idx, np.take_along_axis(x, idx, -1), -1)
    return out


def _layer(blk, cfg, h, ks=None):
    """One Llama layer in float64 numpy, written from the definition (no library code): h [T, d]."""
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    sp = (lambda x, site: x) if ks is None else (lambda x, site: _topk(x, ks[site]))  # noqa: E731
    t = h.shape[0]
    x = sp(_norm_rows(h) * np.asarray(blk.attn_norm.scale[...], np.float64), "qkv")
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = np.arange(t, dtype=np.float64)
    q = _rope((x @ w(blk.attn.q)).reshape(t, hq, hd), pos, cfg.rope.theta)
    k = _rope((x @ w(blk.attn.k)).reshape(t, hkv, hd), pos, cfg.rope.theta)
    v = (x @ w(blk.attn.v)).reshape(t, hkv, hd)
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
    sc = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    o = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(t, hq * hd)
    h = h + sp(o, "o") @ w(blk.attn.o)
    x = sp(_norm_rows(h) * np.asarray(blk.mlp_norm.scale[...], np.float64), "gate_up")
    g, u = x @ w(blk.mlp.gate), x @ w(blk.mlp.up)
    return h + sp(g / (1 + np.exp(-g)) * u, "down") @ w(blk.mlp.down)


def test_layer_errors_match_an_independent_numpy_layer():
    s = stories()
    cfg = s.config
    assert cfg.rope.type == "default" and not cfg.qkv_bias
    sc = SparseConfig("topk", "faithful", 0.5)
    ks = site_ks(cfg, sc)
    tokens = held_windows(1, 64)
    got = layer_errors(sparsify(s.model, None, sc), tokens)
    h = np.asarray(s.model.embed.embedding[...], np.float64)[tokens[0]]
    want = []
    for blk in s.model.layers:
        dense = _layer(blk, cfg, h)
        sparse = _layer(blk, cfg, h, ks)
        want.append(np.linalg.norm(sparse - dense) / np.linalg.norm(dense - h))
        h = dense
    assert got.shape == (cfg.num_layers,) and (got > 0.05).all()
    np.testing.assert_allclose(got, want, rtol=2e-3)  # float32 against float64; Top-K ties: none on real rows
    assert np.array_equal(layer_errors(sparsify(s.model, None, SparseConfig("topk", "faithful", 0.0)), tokens),
                          np.zeros(cfg.num_layers))


# ----------------------------------------------------------------------------- allocation
def _one_layer_table(n_layers: int, layer: int, row) -> tuple:
    return tuple(tuple(float(v) for v in row) if l == layer else (0.0,) * len(SITES) for l in range(n_layers))


@pytest.mark.parametrize("method", ["teal", "larosa"])
def test_greedy_steps_one_site_at_a_time_and_picks_the_least_block_error(method):
    """TEAL's block-wise greedy: every step raises one site by its step (equal steps of effective sparsity);
    the site it picks has the least block error among the four candidates, each candidate's error measured
    independently through the whole model's teacher-forced sums (``layer_sums``, a sparsify of that table);
    the allocated table's errors are those sums too."""
    from larosa_jax.allocation import STEP, allocate, greedy_path
    from larosa_jax.layer_error import layer_sums
    from larosa_jax.sparsity import effective_sparsity, site_params

    s = stories()
    cfg = s.config
    st = stories_stats("joint")
    sc = SparseConfig("teal", "faithful", 0.3) if method == "teal" else SparseConfig("larosa", "fused", 0.3, select="threshold")
    win = held_windows(1, 64)
    path = greedy_path(s.model, st, sc, win, 0.3, progress=False)
    w = site_params(cfg)
    steps = np.array([STEP * cfg.hidden_size ** 2 / w[site] for site in SITES])
    for l in range(cfg.num_layers):
        d = np.diff(path.sparsity[l], axis=0)
        assert np.allclose(np.sort(d, axis=1)[:, :-1], 0) and np.allclose(d.max(axis=1), steps[d.argmax(axis=1)])
        np.testing.assert_allclose(np.diff(path.effective[l]), STEP * cfg.hidden_size ** 2 / sum(w.values()), rtol=1e-9)
        assert path.effective[l][-1] >= 0.3 - 1e-9 and path.effective[l][-2] < 0.3
    layer, step = 1, 3  # brute force one decision
    row = path.sparsity[layer][step - 1]
    errs = []
    for i in range(len(SITES)):
        cand = row.copy()
        cand[i] += steps[i]
        num, _, _ = layer_sums(sparsify(s.model, st, dataclasses.replace(sc, layers=_one_layer_table(
            cfg.num_layers, layer, cand))), win)
        errs.append(num[layer])
    assert int(np.argmin(errs)) == int(np.argmax(path.sparsity[layer][step] - row))
    assert path.error[layer][step] == pytest.approx(min(errs), rel=1e-4)
    back = type(path).from_dict(json.loads(json.dumps(path.to_dict())), cfg)  # as --resume reads it
    for a, b in zip((path.sparsity, path.effective), (back.sparsity, back.effective)):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert back.table(0.3) == path.table(0.3) and back.reaches(0.3) and not back.reaches(0.5)
    np.testing.assert_allclose(np.concatenate(back.error), np.concatenate(path.error), rtol=1e-5)
    got, rep = allocate(s.model, st, sc, win, path=path)
    num, den, _ = layer_sums(sparsify(s.model, st, got), win)
    np.testing.assert_allclose(rep["block_error"], np.sqrt(num / path.update), rtol=1e-4)
    inc = STEP * cfg.hidden_size ** 2 / sum(w.values())
    assert all(abs(effective_sparsity(cfg, dict(zip(SITES, r))) - 0.3) <= inc / 2 + 1e-9 for r in got.layers)
    with pytest.raises(SparsityError, match="reaches effective"):
        path.table(0.5)
    with pytest.raises(SparsityError, match="needs thresholds"):
        greedy_path(s.model, st, SparseConfig("topk", "faithful", 0.3), win, 0.3, progress=False)


def test_allocated_thresholds_are_per_layer_quantiles_and_set_the_effective_sparsity():
    """layers = a table [layer][site]: layer l's thresholds are the calibration quantiles at its row (TEAL's, and
    La RoSA's rotated ones at q/k/v and gate/up), the effective sparsity is the table's parameter-weighted mean;
    the config round-trips; a table of zeros is the dense model; bad tables are refused with the reason."""
    from larosa_jax.sparsity import effective_sparsity_of, site_params

    s = stories()
    st = stories_stats("joint")
    n = s.config.num_layers
    rng = np.random.default_rng(0)
    table = tuple(tuple(float(v) for v in row) for row in rng.uniform(0.1, 0.7, (n, len(SITES))))
    w = site_params(s.config)
    want_eff = np.mean([sum(r[i] * w[site] for i, site in enumerate(SITES)) / sum(w.values()) for r in table])
    for sc in (SparseConfig("teal", "faithful", 0.4, layers=table),
               SparseConfig("larosa", "fused", 0.4, select="threshold", layers=table)):
        th = np.asarray(sparsify(s.model, st, sc).proj.thresholds[...])
        for i, site in enumerate(SITES):
            rot = sc.method == "larosa" and site in ("qkv", "gate_up")
            for l in range(n):
                want = (st.rotated_threshold if rot else st.teal_threshold)(site, table[l][i])[l]
                assert th[i, l] == pytest.approx(want, rel=1e-6)
        assert effective_sparsity_of(s.config, sc) == pytest.approx(want_eff, rel=1e-12)
        assert SparseConfig.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
    toks = held_windows(1, 32)
    zeros = SparseConfig("teal", "faithful", 0.4, layers=((0.0,) * len(SITES),) * n)
    np.testing.assert_allclose(logits(sparsify(s.model, st, zeros), toks), logits(s.model, toks), rtol=1e-5, atol=1e-5)
    with pytest.raises(SparsityError, match="one row per layer of 4 site sparsities"):
        SparseConfig("teal", "faithful", 0.4, layers=((0.1, 0.2),))
    with pytest.raises(SparsityError, match=r"layer 1: \[0.1, 0.2, 0.3, 1.0\]"):
        SparseConfig("teal", "faithful", 0.4, layers=((0.1,) * 4, [0.1, 0.2, 0.3, 1.0]))
    with pytest.raises(SparsityError, match="needs thresholds"):
        SparseConfig("larosa", "fused", 0.4, layers=((0.1,) * 4,))
    with pytest.raises(SparsityError, match="expected one list of 4 site sparsities"):
        SparseConfig.from_dict({"method": "teal", "sparsity": 0.4, "layers": [1.0, 1.0]})
    with pytest.raises(SparsityError, match=f"a table of 2 layers for a model of {n} layers"):
        sparsify(s.model, st, SparseConfig("teal", "faithful", 0.4, layers=((0.1,) * 4,) * 2))


def test_allocate_cli_saves_the_greedy_table(tmp_path):
    """larosa allocate writes the greedy's config (each layer's row near p), which sparsify reads; an existing
    --out and p = 0 are refused."""
    from larosa_jax.cli import main
    from larosa_jax.sparsity import effective_sparsity, site_params

    from _helpers import TEXT_FILE, stories_stats_dir

    s = stories()
    st = stories_stats("joint")
    out = tmp_path / "alloc.json"
    argv = ["allocate", "--ckpt", str(s.ckpt), "--rotations", str(stories_stats_dir("joint")), "--method", "teal",
            "--sparsity", "0.4", "--data-file", str(TEXT_FILE), "--samples", "1", "--seqlen", "64", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    table = np.asarray(doc["sparse_config"]["layers"])
    m = sparsify(s.model, st, str(out))
    w = site_params(s.config)
    assert m.method == "teal" and table.shape == (s.config.num_layers, len(SITES)) and len(set(table.ravel())) > 4
    assert all(abs(effective_sparsity(s.config, dict(zip(SITES, r))) - 0.4) < 0.02 for r in table)
    assert m.effective_sparsity == pytest.approx(np.mean([sum(r[i] * w[x] for i, x in enumerate(SITES)) for r in table])
                                                 / sum(w.values()), rel=1e-6)
    np.testing.assert_allclose(np.asarray(m.proj.thresholds[...])[0], st.teal_threshold("qkv", table[:, 0]), rtol=1e-6)
    assert len(doc["allocation"]["block_error"]) == s.config.num_layers
    assert main(argv) == 2  # exists: refused without --overwrite
    assert main(argv[:-2] + ["--out", str(tmp_path / "b.json"), "--sparsity", "0"]) == 2
