"""Calibration (DESIGN.md §1 "Calibration"): H_l = Σ XᵀX, damping, eigh → Q_l; baseline thresholds.

- Q_l orthogonal; Q·diag(λ)·Qᵀ reproduces a float64 numpy reference of the damped H_l computed from
  activations captured in an ordinary forward (X = norm(h) for ``fused``, norm(h)·γ_attn for
  ``faithful``); eigenvalues match; a second calibration gives the same Q up to column signs;
- TEAL thresholds zero a fraction p of the calibration activations at every site and layer (±1%),
  CATS thresholds likewise on |SiLU(gate)|;
- memory: the jitted layer step sees one window batch at a time, and its compiled footprint is
  bounded by one layer's weights + one batch's activations, the same for 4 or 16 windows;
- bad input: rotations of another model, unknown flavour, too little text, NaN/Inf activations.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import larosa_jax
from _helpers import CAL_BATCH, CAL_SEQLEN, cal_windows, capture, stories, stories_stats
from larosa_jax import calibration, data
from larosa_jax.calibration import STAT_SITES, CalibrationError, CalibrationStats, calibrate, fingerprint
from larosa_jax.models.random_init import random_model
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SITES, SparseConfig, threshold

FLAVOURS = ("fused", "faithful")


@pytest.fixture(scope="module")
def acts() -> dict[str, np.ndarray]:
    """Every projection input of the dense stories260K model on the calibration windows."""
    return capture(stories().model, cal_windows())


# ----------------------------------------------------------------------------- rotations
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rotations_are_orthogonal(flavour):
    st = stories_stats(flavour)
    cfg = stories().config
    d, L = cfg.hidden_size, cfg.num_layers
    assert st.rotations.shape == (L, d, d) and st.rotations.dtype == np.float32
    assert st.eigenvalues.shape == (L, d)
    for l, q in enumerate(st.rotations.astype(np.float64)):
        err = np.abs(q.T @ q - np.eye(d)).max()
        assert err <= 1e-5, f"layer {l}: ‖QᵀQ − I‖∞ = {err:.3g}"
    meta = st.metadata
    assert meta["flavour"] == flavour and meta["model_fingerprint"] == fingerprint(stories().model)
    assert int(meta["tokens"]) == cal_windows().size and int(meta["samples"]) == len(cal_windows())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_covariance_eigendecomposition_matches_float64_reference(flavour, acts):
    st = stories_stats(flavour)
    cfg = stories().config
    d = cfg.hidden_size
    for l in range(cfg.num_layers):
        x = acts[f"qkv.{l}.norm"] if flavour == "fused" else acts[f"qkv.{l}"]  # norm(h) / norm(h)·γ_attn
        x = x.reshape(-1, d).astype(np.float64)
        h_ref = x.T @ x
        h_ref += 0.01 * np.mean(np.diag(h_ref)) * np.eye(d)
        q, lam = st.rotations[l].astype(np.float64), st.eigenvalues[l].astype(np.float64)
        rebuilt = q @ np.diag(lam) @ q.T
        # a float64 eigendecomposition of the float64 H (Q stored in float32): float32 rounding only
        err = np.abs(rebuilt - h_ref).max() / np.abs(h_ref).max()
        assert err <= 2e-6, f"layer {l}: Q·diag(λ)·Qᵀ differs from the damped reference H by {err:.3g} (relative)"
        ref_lam = np.linalg.eigvalsh(h_ref)
        lam_err = np.abs(np.sort(lam) - ref_lam).max() / ref_lam.max()
        assert lam_err <= 2e-6, f"layer {l}: eigenvalues differ by {lam_err:.3g} of λ_max"
        # the columns are eigenvectors of the reference: QᵀHQ is diagonal
        off = q.T @ h_ref @ q
        off -= np.diag(np.diag(off))
        assert np.abs(off).max() <= 2e-6 * ref_lam.max(), f"layer {l}: QᵀHQ not diagonal"


def test_rotation_is_a_float64_eigendecomposition_of_the_damped_covariance():
    """``rotation_of`` damps and decomposes in float64: on an ill-conditioned H (eigenvalues 1e-9…1) its
    Q diagonalises H to float64 accuracy, where a float32 decomposition is off by orders of magnitude."""
    rng = np.random.default_rng(0)
    d = 96
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.logspace(-9, 0, d)
    h = (basis * lam) @ basis.T
    hh = h.astype(np.float32).astype(np.float64)  # as the device's float32 products arrive
    w, q = calibration.rotation_of(hh)
    assert q.dtype == np.float64 and w.dtype == np.float64
    damped = hh + calibration.DAMP * np.mean(np.diag(hh)) * np.eye(d)
    off = q.T @ damped @ q
    assert np.abs(off - np.diag(w)).max() <= 1e-12 * w.max()
    w32, q32 = np.linalg.eigh(damped.astype(np.float32))
    off32 = q32.astype(np.float64).T @ damped @ q32.astype(np.float64)
    assert np.abs(off32 - np.diag(np.diag(off32))).max() > 1e-9 * w.max()  # what float32 would have given


def test_flavours_give_different_rotations(acts):
    """γ_attn matters: the γ-free Q does not diagonalise the faithful H (stories260K gains are not 1)."""
    q_fused = stories_stats("fused").rotations[0].astype(np.float64)
    x = acts["qkv.0"].reshape(-1, stories().config.hidden_size).astype(np.float64)
    h = x.T @ x
    m = q_fused.T @ h @ q_fused
    off = np.abs(m - np.diag(np.diag(m))).max() / np.abs(m).max()
    assert off > 1e-2


def test_calibrating_twice_gives_the_same_rotations():
    """Same windows, another seed (it only draws the quantile samples): same Q up to column signs."""
    first = stories_stats("fused")
    s = stories()
    again = calibrate(s.model, cal_windows(), flavour="fused", batch_size=CAL_BATCH, seed=1, progress=False)
    np.testing.assert_allclose(again.eigenvalues, first.eigenvalues, rtol=1e-5, atol=1e-6 * first.eigenvalues.max())
    for l, (q1, q2) in enumerate(zip(first.rotations, again.rotations)):
        signs = np.sign(np.sum(q1 * q2, axis=0))
        assert (signs != 0).all()
        err = np.abs(q2 * signs - q1).max()
        assert err <= 1e-5, f"layer {l}: rotations differ by {err:.3g} beyond column signs"


def test_stats_save_load_roundtrip(tmp_path):
    st = stories_stats("faithful")
    path = st.save(tmp_path)
    assert path.name == "rotations.safetensors"
    back = CalibrationStats.load(tmp_path)
    np.testing.assert_array_equal(back.rotations, st.rotations)
    np.testing.assert_array_equal(back.eigenvalues, st.eigenvalues)
    assert set(back.quantiles) == set(calibration.QUANTILE_KEYS)  # the rotated rows' quantiles too
    for k in st.quantiles:
        np.testing.assert_array_equal(back.quantiles[k], st.quantiles[k])
    assert back.metadata == st.metadata
    back.check_model(stories().model)  # same model: accepted


# ----------------------------------------------------------------------------- baseline thresholds
@pytest.mark.parametrize("p", [0.25, 0.4, 0.5])
def test_teal_and_cats_thresholds_hit_target_sparsity(p, acts):
    st = stories_stats("faithful")
    L = stories().config.num_layers
    for site in (*SITES, "cats"):
        ts = st.cats_threshold(p) if site == "cats" else st.teal_threshold(site, p)
        assert ts.shape == (L,)
        for l in range(L):
            x = acts[f"{site}.{l}"]
            if site == "cats":  # CATS zeroes where |SiLU(gate)| <= t
                zero = float(np.mean(np.abs(x) <= ts[l]))
            else:  # TEAL's own thresholding applied to the activations the site sees
                assert np.count_nonzero(x == 0) == 0
                zero = float(np.mean(np.asarray(threshold(jnp.asarray(x), jnp.asarray(ts[l]))) == 0))
            assert abs(zero - p) <= 0.01, f"{site} layer {l} at p={p}: {zero:.4f} of the activations zeroed"


# ----------------------------------------------------------------------------- memory
def _step_calls(monkeypatch, n_windows: int):
    """Calibrate on ``n_windows`` windows, recording the arguments of every jitted layer step."""
    calls = []
    orig = calibration._block_step

    def spy(graphdef, state, h, rope, start, key, *, flavour, cfg):
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731 (shapes only)
        calls.append((graphdef, jax.tree.map(spec, (state, h, rope, start, key)), flavour, cfg))
        return orig(graphdef, state, h, rope, start, key, flavour=flavour, cfg=cfg)

    monkeypatch.setattr(calibration, "_block_step", spy)
    ids = stories().ids
    win = data.calibration_windows(ids, n_windows, CAL_SEQLEN, seed=3)
    calibrate(stories().model, win, flavour="fused", batch_size=CAL_BATCH, progress=False)
    monkeypatch.setattr(calibration, "_block_step", orig)
    return calls


def _footprint(call) -> tuple[int, int]:
    graphdef, (state, h, rope, start, key), flavour, cfg = call
    ma = calibration._block_step.lower(graphdef, state, h, rope, start, key, flavour=flavour, cfg=cfg) \
        .compile().memory_analysis()
    return int(ma.argument_size_in_bytes), int(ma.temp_size_in_bytes)


def test_calibration_memory_is_one_layer_one_batch(monkeypatch):
    cfg = stories().config
    d, f, L, T, B = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, CAL_SEQLEN, CAL_BATCH
    small, large = _step_calls(monkeypatch, 4), _step_calls(monkeypatch, 16)
    assert len(small) == L * 1 and len(large) == L * 4, "one step per layer and window batch"
    layer_params = d * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * d + 3 * d * f + 2 * d
    for graphdef, (state, h, *_), _, _ in small + large:
        assert h.shape == (B, T, d), f"a step saw activations of shape {h.shape}, not one batch {(B, T, d)}"
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))
        assert n_params == layer_params, f"a step was given {n_params} parameters, not one layer's {layer_params}"
    fp_small, fp_large = _footprint(small[-1]), _footprint(large[-1])
    assert fp_small == fp_large, f"per-step memory grew with the number of windows: {fp_small} -> {fp_large}"
    # bound: a small multiple of one layer's weights + one batch's activations (incl. attention
    # scores and the fixed-size quantile samples) + the d×d product
    weights = 4 * layer_params
    activations = 4 * (B * T * (3 * d + cfg.q_dim + 2 * cfg.kv_dim + 3 * f) + B * cfg.num_heads * T * T
                       + len(STAT_SITES) * calibration.SAMPLES_PER_BATCH)
    budget = weights + activations + 2 * 4 * d * d
    total = sum(fp_large)
    assert total <= 3 * budget, f"step needs {total} bytes, over 3x one layer + one batch ({budget})"


# ----------------------------------------------------------------------------- bad input
def test_rotations_of_another_model_are_refused():
    s = stories()
    other = random_model(s.config, dtype=jnp.float32, seed=1)  # same shapes, other weights
    perturbed = larosa_jax.load(s.ckpt)
    emb = perturbed.embed.embedding[...]
    perturbed.embed.embedding.set_value(emb + 0.05 * jnp.sign(emb))
    for stats in (stories_stats("faithful"), stories_stats("fused")):
        for model in (other, perturbed):
            fp = fingerprint(model)
            assert fp != stats.metadata["model_fingerprint"]
            for sc in (SparseConfig("larosa", "faithful", 0.4), SparseConfig("larosa", "fused", 0.4),
                       SparseConfig("teal", "faithful", 0.4)):
                with pytest.raises(CalibrationError) as ei:
                    sparsify(model, stats, sc)
                msg = str(ei.value)
                assert stats.metadata["model_fingerprint"] in msg and fp in msg, msg


def test_fingerprint_is_independent_of_dtype():
    """Documented: "independent of dtype". Rotations calibrated on the float32 load of a checkpoint
    must be accepted by the same checkpoint loaded in bfloat16 (e.g. for GPU inference)."""
    s = stories()
    model = larosa_jax.load(s.ckpt, dtype=jnp.bfloat16)
    assert fingerprint(model) == fingerprint(s.model), "the bfloat16 load of the same checkpoint has another fingerprint"
    sparsify(model, stories_stats("faithful"), SparseConfig("larosa", "faithful", 0.4))


def test_unknown_flavour_lists_the_valid_ones():
    with pytest.raises(CalibrationError) as ei:
        calibrate(stories().model, cal_windows()[:1], flavour="gamma", progress=False)
    assert "gamma" in str(ei.value) and "faithful" in str(ei.value) and "fused" in str(ei.value)


def test_too_little_text_is_an_error_stating_the_tokens_available():
    ids = stories().ids[:1000]
    with pytest.raises(data.DataError) as ei:
        data.calibration_windows(ids, 16, 128, seed=0, source="tiny.txt")
    msg = str(ei.value)
    assert "tiny.txt" in msg and "1000 tokens available" in msg and "2048" in msg
    with pytest.raises(data.DataError, match="1000 tokens available"):  # held-out windows come after
        data.calibration_windows(ids, 4, 128, seed=0, skip=4, source="tiny.txt")
    data.calibration_windows(ids, 7, 128, seed=0)  # 7 · 128 = 896 <= 1000: fine
    with pytest.raises(data.DataError, match="1000 tokens"):
        data.split_windows(ids, 2048, source="tiny.txt")


def _poisoned(fn):
    model = larosa_jax.load(stories().ckpt)
    fn(model)
    return model


def _calibration_error(model, windows) -> str:
    with pytest.raises(CalibrationError) as ei:
        calibrate(model, windows, flavour="fused", batch_size=CAL_BATCH, progress=False)
    return str(ei.value)


def test_nan_weights_name_layer_and_window():
    def nan_down(m):
        k = m.layers[3].mlp.down.kernel
        k.set_value(k[...].at[5, 7].set(jnp.nan))

    msg = _calibration_error(_poisoned(nan_down), cal_windows())
    assert re.search(r"\blayer 3\b", msg) and re.search(r"\bwindow 0\b", msg), msg


def test_inf_activation_names_layer_and_window():
    def huge_up(m):  # |u| overflows float32 in layer 1's MLP
        k = m.layers[1].mlp.up.kernel
        k.set_value(k[...] * 3e38)

    msg = _calibration_error(_poisoned(huge_up), cal_windows())
    assert re.search(r"\blayer 1\b", msg) and re.search(r"\bwindow 0\b", msg), msg


def test_nan_in_one_window_names_that_window():
    win = cal_windows()
    # a token present in window 5 and in none of windows 0..4: poisoning its embedding makes window 5
    # (the second of the second batch) the first non-finite one, at layer 0
    candidates = sorted(set(win[5].tolist()) - set(win[:5].ravel().tolist()))
    assert candidates, "test premise: window 5 has a token of its own"
    tok = candidates[0]

    def nan_embedding(m):
        e = m.embed.embedding
        e.set_value(e[...].at[tok].set(jnp.nan))

    msg = _calibration_error(_poisoned(nan_embedding), win)
    assert re.search(r"\blayer 0\b", msg) and re.search(r"\bwindow 5\b", msg), msg
