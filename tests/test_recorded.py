"""A fused checkpoint that records its sparse config (``larosa fuse --sparsity``): ``larosa generate`` with
no other flag and ``larosa_jax.load`` decode with it, thresholds travel with the checkpoint, a stale record
is refused with the command that re-fuses; ``larosa bench --ckpt`` times dense against it."""

from __future__ import annotations

import json

import numpy as np

import larosa_jax as lj
from _helpers import stories, stories_stats, stories_stats_dir
from larosa_jax import checkpoint
from larosa_jax.cli import main
from larosa_jax.sparsity import SparseConfig, TealProjection

PROMPT = "Once upon a time"


def _fuse(tmp_path, name, *flags):
    out = tmp_path / name
    assert main(["fuse", "--ckpt", str(stories().ckpt), "--rotations", str(stories_stats_dir("joint")), "--out", str(out),
                 *flags]) == 0
    return out


def test_generate_and_load_use_the_recorded_config(tmp_path, capsys):
    fused = _fuse(tmp_path, "fused", "--sparsity", "0.4")
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(fused), "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    # the Python path with the same SparseConfig
    sm = lj.sparsify(checkpoint.load(fused), None, SparseConfig("larosa", "fused", 0.4))
    tok = lj.load_tokenizer(fused)
    ids = lj.generate(sm, [PROMPT], tokenizer=tok, max_new_tokens=12)
    assert PROMPT + tok.decode(ids[0], skip_special_tokens=True) in out
    assert f"effective sparsity {sm.effective_sparsity:.3f}" in out.splitlines()[-1]
    loaded = lj.load(fused)
    assert loaded.effective_sparsity == sm.effective_sparsity and lj.generate(loaded, [PROMPT], tokenizer=tok,
                                                                             max_new_tokens=12) == ids
    # bench: dense and the recorded config, json and md
    res = tmp_path / "bench"
    assert main(["bench", "--ckpt", str(fused), "--prompt-len", "8", "--new", "4", "--repeats", "1",
                 "--out", str(res)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [r["config"] for r in doc["rows"]] == ["dense", "recorded (larosa@0.4)"]
    assert doc["rows"][1]["effective_sparsity"] == sm.effective_sparsity and doc["rows"][0]["speedup_vs_dense"] == 1.0
    assert "| recorded (larosa@0.4) |" in (tmp_path / "bench.md").read_text()
    assert main(["bench", "--ckpt", str(fused), "--configs", "teal@0.5", "--out", str(tmp_path / "b2")]) == 2


def test_thresholds_travel_with_the_checkpoint_and_stale_records_are_refused(tmp_path, capsys):
    fused = _fuse(tmp_path, "thr", "--sparsity", "0.5", "--select", "threshold")
    m = lj.load(fused)
    want = lj.sparsify(lj.load(stories().ckpt), stories_stats("joint"),
                       SparseConfig("larosa", "fused", 0.5, select="threshold"))
    assert isinstance(m.proj, TealProjection)
    np.testing.assert_allclose(np.asarray(m.proj.thresholds[...]), np.asarray(want.proj.thresholds[...]), rtol=1e-6)
    cfg_file = fused / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["larosa"]["sparse"]["format"] = 0
    cfg_file.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(fused), "--prompt", PROMPT, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "format 0" in err and "larosa fuse --ckpt" in err
    assert main(["fuse", "--ckpt", str(stories().ckpt), "--rotations", str(stories_stats_dir("joint")),
                 "--out", str(tmp_path / "x"), "--sparsity", "0.4", "--sparse-config", "y.json"]) == 2
