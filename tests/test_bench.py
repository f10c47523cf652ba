"""The GPU benchmark scripts run end to end at tiny shapes on CPU and write their result files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from larosa_jax.sparsity import effective_sparsity_of

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_decode_tiny_sparse_configs(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    bd = _script("bench_decode")
    out = tmp_path / "decode"
    bd.main(["--tiny", "--models", "qwen2-7b", "--configs", "larosa@0.5,topk@0.25,teal@0.5", "--batch", "1,2",
             "--prompt", "8", "--new", "4", "--out", str(out)])
    doc = json.loads(Path(str(out) + ".json").read_text())
    rows = {(r["config"], r["batch"]): r for r in doc["results"]}
    assert set(rows) == {(c, b) for c in ("dense", "larosa@0.5", "topk@0.25", "teal@0.5") for b in (1, 2)}
    assert abs(rows[("larosa@0.5", 1)]["effective_sparsity"] - 0.5) < 0.01  # α_plain solved for effective = p
    assert abs(rows[("topk@0.25", 1)]["effective_sparsity"] - 0.25) < 0.01
    realized = rows[("teal@0.5", 1)]["teal_realized"]  # thresholds from one prompt, checked on another
    assert set(realized) == {"qkv", "o", "gate_up", "down"} and all(0.3 < v < 0.7 for fr in realized.values() for v in fr)
    for (c, b), r in rows.items():
        assert r["speedup_vs_dense"] > 0 and r["ideal_speedup"] >= 1.0
        assert (r["ideal_speedup"] > 1.0) == (c != "dense")
    md = Path(str(out) + ".md").read_text()
    assert "| qwen2-7b | larosa@0.5 | 0.49" in md or "| qwen2-7b | larosa@0.5 | 0.50" in md
    assert Path(str(out) + ".png").stat().st_size > 0


def test_torch_read_probe_reports_a_rate_or_why_not():
    """The roofline's torch candidate (a GPU run adds it): a positive rate where the device exists, a
    'failed: …' reason (never an exception) where it does not."""
    bd = _script("bench_decode")
    got = bd.torch_read_bandwidth(8_000_000, "cpu", repeats=3)
    assert isinstance(got, float) and got > 0
    bad = bd.torch_read_bandwidth(8_000_000, "no-such-device", repeats=3)
    assert isinstance(bad, str) and bad.startswith("failed: ")


def test_bench_decode_rejects_bad_configs():
    bd = _script("bench_decode")
    with pytest.raises(SystemExit, match="METHOD one of topk, teal, larosa, larosa-a1, larosa-thr and 0 < P < 1"):
        bd.parse_configs("cats@0.5")
    with pytest.raises(SystemExit, match="not METHOD@P"):
        bd.parse_configs("larosa@1.5")
    # La RoSA at 75%: the official α_rot leaves α_plain < 0, refused before any benchmarking; α_rot = 1 fits
    with pytest.raises(SystemExit):
        bd.main(["--tiny", "--models", "llama2-7b", "--configs", "larosa@0.75"])
    cfg = bd.ModelConfig.from_hf(bd.HF_CONFIGS["llama2-7b"])
    sc = bd.sparse_config(cfg, "larosa-a1", 0.75)
    assert sc.alphas()[0] == 1.0 and effective_sparsity_of(cfg, sc) == pytest.approx(0.75, abs=1e-3)


def test_bench_kernels_tiny_checks_and_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    bk = _script("bench_kernels")
    out = tmp_path / "kernels"
    bk.main(["--tiny", "--batches", "1,4", "--sparsities", "0.5", "--trace", "--out", str(out)])
    doc = json.loads(Path(str(out) + ".json").read_text())
    ops_rows = [r for r in doc["results"] if not r["shape"].startswith("select D")]
    assert ops_rows and all(isinstance(r["kernels_us"], dict) for r in ops_rows)  # --trace (no GPU kernels on CPU)
    ops = {(r["shape"], r["tokens"], r["op"]) for r in doc["results"]}
    for shape in ("tiny up", "tiny q/k/v"):
        for b in (1, 4):
            assert {(shape, b, "sparse"), (shape, b, "select+sparse"), (shape, b, "xla dense")} <= ops
    errs = [r["rel_err"] for r in doc["results"] if r["op"] == "sparse"]
    assert errs and max(errs) < 1e-2
    assert "select+sparse 0.5" in Path(str(out) + ".md").read_text()


def test_bench_kernels_device_table_counts_the_ops_own_kernels():
    """A traced op's device table counts only the op's own kernels (not the probe's reduction or copies)
    against XLA's GEMM."""
    bk = _script("bench_kernels")
    rows = [{"shape": "s", "tokens": 1, "op": op, "sparsity": sp, "us": 50.0,
             "kernels_us": {f"{k} [XlaModule:]": v for k, v in kern.items()}}
            for op, sp, kern in [("xla dense", 0.0, {"gemm_fusion_dot_3": 40.0, "input_reduce_fusion": 2.0}),
                                 ("select+sparse", 0.5, {"_gather_kernel": 15.0, "_select_kernel": 5.0,
                                                         "input_reduce_fusion": 2.0, "MemcpyD2D": 1.0})]]
    md = bk.markdown({"device": "x", "jax": "y", "date": "z", "iters": 2, "gemv": "gather"}, rows)
    assert "| s | 1 | select+sparse | 0.5 | _gather_kernel, _select_kernel | 20.00 | 2.00x |" in md


def test_select_window_reports_hit_rates_on_real_rows(tmp_path):
    """eval/select_window.py end to end on the bundled stories260K: a hit rate per site, sparsity and
    method, each the fraction of token rows ``window_hits`` accepts, written as JSON and Markdown."""
    from _helpers import TEXT_FILE, stories, stories_stats_dir

    sw = _script("select_window")
    out = tmp_path / "sw"
    doc = sw.main([str(stories().ckpt), str(stories_stats_dir("fused")), "--text", str(TEXT_FILE), "--rows", "2",
                   "--seqlen", "64", "--sparsity", "0.5", "--out", str(out)])
    assert set(doc["results"]) == {"larosa@0.5", "topk@0.5"}
    for row in doc["results"].values():
        for s, v in row.items():
            assert 0.0 <= v["worst_layer"] <= v["hit_rate"] <= 1.0, (s, v)
            assert 1 <= v["k"] < v["d"]
    assert json.loads((tmp_path / "sw.json").read_text())["results"] == doc["results"]
    assert "| larosa@0.5 |" in (tmp_path / "sw.md").read_text()
    with pytest.raises(SystemExit):
        sw.main([str(stories().ckpt), str(stories_stats_dir("fused")), "--text", str(tmp_path / "none.txt"),
                 "--out", str(out)])


def test_batch_shared_keep_sets_and_their_perplexity(tmp_path):
    """eval/batch_shared.py on the bundled stories260K: inside ``shared_keep_sets(2)`` each pair of rows
    reaches every projection with one common support of at most the site's k entries per position (what
    one row keeps alone; two per-token sets would cover more), B = 1 leaves the method's perplexity as it
    is, and the report is written as JSON and Markdown; a B that does not divide the rows is refused."""
    import jax.numpy as jnp
    import numpy as np
    from _helpers import TEXT_FILE, stories, stories_stats_dir

    from larosa_jax import checkpoint, sparsity
    from larosa_jax.calibration import CalibrationStats
    from larosa_jax.sparse_model import sparsify
    from larosa_jax.sparsity import SITES, SparseConfig, site_ks

    bsh = _script("batch_shared")
    out = tmp_path / "bs"
    argv = [str(stories().ckpt), str(stories_stats_dir("fused")), "--text", str(TEXT_FILE), "--rows", "4",
            "--seqlen", "32", "--sparsity", "0.5", "--batches", "1,2", "--out", str(out)]
    doc = bsh.main(argv)
    assert set(doc["results"]) == {"larosa@0.5", "topk@0.5"} and doc["dense"] > 1
    model = checkpoint.load(str(stories().ckpt))
    sc = SparseConfig("topk", "faithful", 0.5)
    sparse = sparsify(model, CalibrationStats.load(str(stories_stats_dir("fused"))), sc)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (4, 24)), jnp.int32)
    seen, orig = [], sparsity.kept_projection

    def spy(x, keep, linears, residual=None, raw=False, **gemv):
        seen.append(np.asarray(x))
        return orig(x, keep, linears, residual, raw, **gemv)

    alone = bsh.perplexity(sparse, tokens)
    sparsity.kept_projection = spy
    try:
        with bsh.shared_keep_sets(1):
            assert bsh.perplexity(sparse, tokens) == pytest.approx(alone, rel=1e-6)
        seen.clear()
        with bsh.shared_keep_sets(2):
            shared = bsh.perplexity(sparse, tokens)
    finally:
        sparsity.kept_projection = orig
    assert sparsity.kept_projection is orig
    assert shared != pytest.approx(alone, rel=1e-4)
    ks = site_ks(model.config, sc)
    assert len(seen) == 4 * model.config.num_layers
    for i, x in enumerate(seen):
        support = (x != 0).reshape(2, 2, *x.shape[1:]).any(axis=1)  # [pairs, T, D]
        assert support.sum(-1).max() <= ks[SITES[i % 4]], SITES[i % 4]
    assert "| larosa@0.5 |" in (tmp_path / "bs.md").read_text()
    assert json.loads((tmp_path / "bs.json").read_text())["results"] == doc["results"]
    with pytest.raises(SystemExit):
        bsh.main(argv[:-4] + ["--batches", "3", "--out", str(out)])
    # --resume keeps what the file holds (nothing is recomputed here), and refuses another run's file
    saved = json.loads((tmp_path / "bs.json").read_text())
    saved["results"]["larosa@0.5"]["2"] = 123.0
    (tmp_path / "bs.json").write_text(json.dumps(saved))
    assert bsh.main(argv + ["--resume"])["results"]["larosa@0.5"]["2"] == 123.0
    with pytest.raises(SystemExit):
        bsh.main(argv[:-4] + ["--batches", "1", "--out", str(out), "--resume"])


def test_site_table_splits_a_trace_by_the_models_named_scopes():
    """Each site's ops carry its name in the compiled program, a trace's op path maps to that site, and the table
    turns a site's µs per step into µs, bytes and bandwidth per layer."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from larosa_jax.config import ModelConfig
    from larosa_jax.models.random_init import random_model

    bd, kt = _script("bench_decode"), _script("kernel_trace")
    cfg = ModelConfig.from_hf(bd.tiny(bd.HF_CONFIGS["llama2-7b"]))
    graphdef, state = nnx.split(random_model(cfg, jnp.float32))
    hlo = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, jnp.zeros((1, 8), jnp.int32)).compile().as_text()
    found = {kt.scope_of(n, ("qkv", "o", "gate_up", "down", "attention")) for n in re.findall(r'op_name="([^"]+)"', hlo)}
    assert {"qkv", "o", "gate_up", "down", "attention"} <= found
    assert kt.scope_of("jit(decode)/while/body/gate_up/pallas_call", ("o", "gate_up")) == "gate_up"
    assert kt.scope_of("jit(decode)/while/body/output", ("o",)) is None  # a component, not a substring

    keep = {"qkv": 0.5, "o": 0.5, "gate_up": 0.5, "down": 0.25}
    nbytes = bd.site_bytes_per_layer(cfg, 2, keep, adapters=True)
    d, f = cfg.hidden_size, cfg.intermediate_size
    assert nbytes["gate_up"] == 0.5 * 2 * d * f * 2 and nbytes["down"] == 0.25 * f * d * 2 + d * d * 2
    scopes = {s: {"kernels_per_step": 2.0 * cfg.num_layers, "us_per_step": 10.0 * cfg.num_layers} for s in nbytes}
    r = {"config": "larosa@0.5", "layers": cfg.num_layers, "kv_bytes_per_step_mean": 0.0,
         "profile": {"scopes": {**scopes, "None": {"kernels_per_step": 3.0, "us_per_step": 6.0}},
                     "site_bytes_per_layer": nbytes}}
    rows = bd.site_table(r, {"bandwidth": {"read_GBps": 1000.0}})
    gbs = nbytes["gate_up"] / 10e-6 / 1e9
    assert f"| gate_up | 2.0 | 10.0 | {nbytes['gate_up'] / 1e6:.2f} | {gbs:.0f} | {100 * gbs / 1000:.0f} |" in rows
    assert any(row.startswith("| other (per step / layers) |") for row in rows)
    assert bd.site_table({**r, "profile": {"scopes": {"None": scopes["qkv"]}}}, {"bandwidth": {"read_GBps": 1.0}}) == []
