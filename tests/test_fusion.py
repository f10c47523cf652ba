"""Fused (deployable) La RoSA (DESIGN.md §1 "Fused mode"): folding γ and Q_l into the weights.

- at p = 0 the fused model reproduces the dense logits (fp32, ≤ 1e-4 relative) on random Llama and
  Qwen2 models (q/k/v biases, tied embeddings that folding must untie) and on stories260K;
- at p > 0 the fused model and faithful mode with γ-free rotations compute the same function:
  checked in float64 (a subprocess: jax_enable_x64 is process-wide) to 1e-9 relative;
- a fused model saves and reloads (``checkpoint.save`` → ``load``) with the same logits, sparse too.
"""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import larosa_jax
from _helpers import (
    held_windows, logits, random_ckpt, random_rotations, random_tokens, rel_err, run_python, stats_for, stories,
    stories_stats, stories_stats_dir, workdir,
)
from larosa_jax import checkpoint
from larosa_jax.fusion import fuse
from larosa_jax.models.transformer import Transformer
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SparseConfig


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def rnd(request):
    """(kind, checkpoint, dense model, float64 random rotations) of a random HF model."""
    ckpt = random_ckpt(request.param)
    model = larosa_jax.load(ckpt)
    cfg = model.config
    return request.param, ckpt, model, random_rotations(cfg.num_layers, cfg.hidden_size, seed=5)


# ----------------------------------------------------------------------------- p = 0: fused == dense
def test_fused_random_model_reproduces_dense_logits(rnd):
    kind, _, model, q = rnd
    cfg = model.config
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_word_embeddings == (kind == "qwen2")
    fused = fuse(model, q.astype(np.float32))
    # structure: γ folded (all gains 1), tied embeddings untied, adapters Q_lᵀ·Q_{l+1}, biases unchanged
    assert isinstance(fused, Transformer) and fused.adapters is not None and fused.lm_head is not None
    assert not fused.config.tie_word_embeddings and fused.dtype == jnp.float32
    for l, blk in enumerate(fused.layers):
        for norm in (blk.attn_norm, blk.mlp_norm):
            np.testing.assert_array_equal(np.asarray(norm.scale[...]), 1.0)
        if cfg.qkv_bias:
            for n in ("q", "k", "v"):
                np.testing.assert_allclose(np.asarray(getattr(blk.attn, n).bias[...]),
                                           np.asarray(getattr(model.layers[l].attn, n).bias[...]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fused.norm.scale[...]), 1.0)
    for l in range(cfg.num_layers - 1):
        np.testing.assert_allclose(np.asarray(fused.adapters[l][...]), q[l].T @ q[l + 1], atol=1e-6)
    tokens = random_tokens(2, 48, cfg.vocab_size, seed=1)
    dense = logits(model, tokens)
    err = rel_err(logits(fused, tokens), dense)
    assert err <= 1e-4, f"{kind}: fused (p = 0) differs from dense by {err:.3g}"
    # the same through sparsify
    sm = sparsify(model, stats_for(model, q.astype(np.float32)), SparseConfig("larosa", "fused", 0.0))
    assert sm.base.adapters is not None
    assert rel_err(logits(sm, tokens), dense) <= 1e-4


def test_fused_stories_reproduces_dense_logits():
    s = stories()
    tokens = held_windows(2, 128)
    dense = logits(s.model, tokens)
    sm = sparsify(s.model, stories_stats("fused"), SparseConfig("larosa", "fused", 0.0))
    assert sm.base.adapters is not None and not sm.base.config.tie_word_embeddings  # stories260K ties its head
    err = rel_err(logits(sm, tokens), dense)
    assert err <= 1e-4, f"stories260K fused (p = 0) differs from dense by {err:.3g}"
    # rotations of the other flavour still give an exact model at p = 0, with a warning
    with pytest.warns(UserWarning, match="flavour"):
        other = sparsify(s.model, stories_stats("faithful"), SparseConfig("larosa", "fused", 0.0))
    assert rel_err(logits(other, tokens), dense) <= 1e-4


def test_fuse_rejects_wrong_rotation_shapes_and_a_fused_model_other_methods():
    s = stories()
    cfg = s.config
    with pytest.raises(ValueError, match="shape"):
        fuse(s.model, np.zeros((cfg.num_layers - 1, cfg.hidden_size, cfg.hidden_size), np.float32))
    fused = fuse(s.model, stories_stats("fused").rotations)
    for sc in (SparseConfig("teal", "faithful", 0.4), SparseConfig("larosa", "faithful", 0.4),
               SparseConfig("topk", "faithful", 0.4)):
        with pytest.raises(ValueError, match="fused model"):
            sparsify(fused, stories_stats("fused"), sc)


# ----------------------------------------------------------------------------- p > 0: fused == faithful γ-free
_FLOAT64_CHECK = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import functools
import jax.numpy as jnp
import numpy as np
from flax import nnx
import larosa_jax
from larosa_jax.calibration import CalibrationStats, fingerprint
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SparseConfig

@functools.partial(jax.jit, static_argnums=0)
def fwd(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

def run(model, tokens):
    out = fwd(*nnx.split(model), jnp.asarray(tokens))
    assert out.dtype == jnp.float64, out.dtype
    return np.asarray(out)

def orthonormal(q):  # the float32 rotations made orthonormal in float64 (closest, signs kept)
    out = []
    for m in np.asarray(q, np.float64):
        u, r = np.linalg.qr(m)
        out.append(u * np.sign(np.diag(r)))
    return np.stack(out)

rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
results = {}
for case in json.loads(sys.argv[1]):
    model = larosa_jax.load(case["ckpt"], dtype=jnp.float64)
    assert model.dtype == jnp.float64
    cfg = model.config
    if case["rotations"]:
        src = CalibrationStats.load(case["rotations"])
        assert src.flavour == "fused"
        q = orthonormal(src.rotations)
        meta = src.metadata
    else:
        rng = np.random.default_rng(case["seed"])
        q = orthonormal(rng.standard_normal((cfg.num_layers, cfg.hidden_size, cfg.hidden_size)))
        meta = {"model_fingerprint": fingerprint(model), "flavour": "fused"}
    assert np.abs(np.einsum("lij,lik->ljk", q, q) - np.eye(cfg.hidden_size)).max() < 1e-13
    stats = CalibrationStats(q, np.ones(q.shape[:2]), {}, dict(meta))
    tokens = np.load(case["tokens"])
    out = {}
    for p in (0.25, 0.5):
        faithful = sparsify(model, stats, SparseConfig("larosa", "faithful", p))
        assert faithful.proj.gamma_free
        fused = sparsify(model, stats, SparseConfig("larosa", "fused", p))
        assert fused.base.adapters is not None and fused.base.dtype == jnp.float64
        a, b = run(faithful, tokens), run(fused, tokens)
        out[str(p)] = {"fused_vs_faithful": rel(b, a), "faithful": a}
    results[case["name"]] = {
        "0.25": out["0.25"]["fused_vs_faithful"], "0.5": out["0.5"]["fused_vs_faithful"],
        "p_changes_logits": rel(out["0.25"]["faithful"], out["0.5"]["faithful"]),
    }
print("RESULTS " + json.dumps(results))
"""


def test_fused_equals_faithful_gamma_free_at_p_in_float64():
    s = stories()
    cases = []
    for name, ckpt, rotations, tokens in (
        ("stories260K", s.ckpt, stories_stats_dir("fused"), held_windows(2, 128)),
        ("llama", random_ckpt("llama"), None, random_tokens(2, 48, 300, seed=2)),
        ("qwen2", random_ckpt("qwen2"), None, random_tokens(2, 48, 300, seed=3)),
    ):
        tok_file = workdir() / f"tokens-{name}.npy"
        np.save(tok_file, tokens)
        cases.append({"name": name, "ckpt": str(ckpt), "rotations": rotations and str(rotations),
                      "tokens": str(tok_file), "seed": 11})
    out = run_python(_FLOAT64_CHECK, json.dumps(cases))
    results = json.loads(out.split("RESULTS ", 1)[1])
    assert set(results) == {"stories260K", "llama", "qwen2"}
    for name, r in results.items():
        assert r["p_changes_logits"] > 1e-3, f"{name}: sparsity had no effect (the comparison would be vacuous)"
        for p in ("0.25", "0.5"):
            assert r[p] <= 1e-9, f"{name} p={p}: fused vs faithful (γ-free rotations) differ by {r[p]:.3g} in float64"


# ----------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("which", ["stories260K", "qwen2"])
def test_fused_model_saves_and_reloads(which, tmp_path):
    if which == "stories260K":
        s = stories()
        ckpt, model, stats, tokens = s.ckpt, s.model, stories_stats("fused"), held_windows(1, 128)
    else:
        ckpt = random_ckpt("qwen2")
        model = larosa_jax.load(ckpt)
        q = random_rotations(model.config.num_layers, model.config.hidden_size, seed=9).astype(np.float32)
        stats, tokens = stats_for(model, q), random_tokens(2, 48, 300, seed=4)
    fused = fuse(model, stats.rotations)
    out = checkpoint.save(fused, tmp_path / "fused", tokenizer_from=ckpt)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["larosa"]["fused"] is True and cfg_json["tie_word_embeddings"] is False
    back = larosa_jax.load(out)
    assert back.adapters is not None and back.lm_head is not None
    assert back.config == fused.config
    np.testing.assert_array_equal(logits(back, tokens), logits(fused, tokens))
    assert rel_err(logits(back, tokens), logits(model, tokens)) <= 1e-4
    # sparse: the reloaded fused model runs larosa fused without the rotations, same logits
    sc = SparseConfig("larosa", "fused", 0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded_sparse = sparsify(back, None, sc)
    np.testing.assert_allclose(logits(reloaded_sparse, tokens), logits(sparsify(model, stats, sc), tokens),
                               rtol=0, atol=1e-6 * np.abs(logits(model, tokens)).max())
    assert reloaded_sparse.effective_sparsity == pytest.approx(sparsify(model, stats, sc).effective_sparsity)


def test_a_fused_checkpoint_of_the_older_form_is_refused(tmp_path):
    """Form 1 folded down_proj with Q_l and applied the adapter after the layer: same file layout,
    different function, so loading it now must fail loudly rather than compute something else."""
    s = stories()
    out = checkpoint.save(fuse(s.model, stories_stats("fused").rotations), tmp_path / "fused")
    cfg_file = out / "config.json"
    raw = json.loads(cfg_file.read_text())
    assert raw["larosa"]["fused_form"] == 2
    del raw["larosa"]["fused_form"]
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(checkpoint.CheckpointError, match=r"config.json: larosa.fused_form=1, this version reads form 2.*larosa fuse"):
        larosa_jax.load(out)
