"""``larosa frontier`` and ``larosa tune``: speeds read from a bench file (never timed), the Pareto set,
the pick for a target, the quality half without speeds, and the refusals (a speed file without the
entry, mixed devices, an unreachable target)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from _helpers import TEXT_FILE, stories, stories_stats_dir
from larosa_jax import frontier
from larosa_jax.cli import main
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SparseConfig


def _speeds(path: Path, device="GPU X", methods=("teal", "topk", "larosa", "larosa-thr")) -> Path:
    """A bench_decode-shaped file: dense 10 ms, each method 10·(1 − s) + 1 ms/token at s = 0.1 … 0.7."""
    rows = [{"model": "llama2-7b", "batch": 1, "method": "dense", "effective_sparsity": 0.0, "ms_per_token": 10.0},
            {"model": "llama2-7b", "batch": 4, "method": "teal", "effective_sparsity": 0.5, "ms_per_token": 1.0}]
    for m in methods:
        for s in (0.1, 0.3, 0.5, 0.7):
            rows.append({"model": "llama2-7b", "batch": 1, "method": m, "effective_sparsity": s,
                         "ms_per_token": 10 * (1 - s) + (2.0 if m.startswith("larosa") else 1.0)})
    path.write_text(json.dumps({"meta": {"device": device, "jax": "0.0", "date": "today"}, "results": rows}))
    return path


def test_speeds_are_interpolated_never_extrapolated(tmp_path):
    sp = frontier.load_speeds([_speeds(tmp_path / "a.json")], "llama2-7b")
    assert sp["dense"] == 10.0 and sp["device"] == "GPU X"
    assert frontier.ms_per_token(sp, "teal", 0.4) == pytest.approx(10 * 0.6 + 1)  # linear between 0.3 and 0.5
    with pytest.raises(frontier.FrontierError, match=r"a\.json: 'teal' measured at effective sparsity 0\.100-0\.700"):
        frontier.ms_per_token(sp, "teal", 0.8)
    with pytest.raises(frontier.FrontierError, match=r"b\.json: no batch-1 'larosa-thr' rows for shape 'llama2-7b'"):
        frontier.ms_per_token(frontier.load_speeds([_speeds(tmp_path / "b.json", methods=("teal",))], "llama2-7b"),
                              "larosa-thr", 0.4)
    with pytest.raises(frontier.FrontierError, match="several devices"):
        frontier.load_speeds([_speeds(tmp_path / "a.json"), _speeds(tmp_path / "c.json", device="GPU Y")], "llama2-7b")
    slow = json.loads((tmp_path / "a.json").read_text())
    slow["results"][0]["ms_per_token"] = 10.5  # another run: its speed-ups do not compare with a.json's
    (tmp_path / "d.json").write_text(json.dumps(slow))
    with pytest.raises(frontier.FrontierError, match=r"dense 10\.000 ms/token in .*a\.json but 10\.500 in .*d\.json"):
        frontier.load_speeds([tmp_path / "a.json", tmp_path / "d.json"], "llama2-7b")
    assert frontier.load_speeds([tmp_path / "a.json", _speeds(tmp_path / "e.json")], "llama2-7b")["dense"] == 10.0
    with pytest.raises(frontier.FrontierError, match="no dense batch-1 row for shape 'qwen2-7b'"):
        frontier.load_speeds([tmp_path / "a.json"], "qwen2-7b")


def test_frontier_end_to_end_then_tune(tmp_path, capsys):
    """The CLI on the bundled stories260K: every row's perplexity and its speed from the bench file, the
    Pareto set in bold, the plot, --resume with nothing left to do; then tune picks from the file and
    sparsify takes what tune saved."""
    s = stories()
    speeds = _speeds(tmp_path / "speeds.json")
    out = tmp_path / "front"
    argv = ["frontier", "--ckpt", str(s.ckpt), "--rotations", f"fused={stories_stats_dir('fused')}",
            "--rotations", f"faithful={stories_stats_dir('faithful')}", "--recipes", "teal,larosa-fused-thr,larosa-faithful",
            "--sparsity", "0.3,0.5", "--data-file", str(TEXT_FILE), "--seqlen", "32", "--limit", "2",
            "--speeds", str(speeds), "--out", str(out)]
    assert main(argv) == 2  # larosa-fused-thr is not a recipe: refused before any work
    argv[argv.index("teal,larosa-fused-thr,larosa-faithful")] = "teal,larosa-fused,larosa-faithful"
    assert main(argv) == 0
    res = json.loads((tmp_path / "front.json").read_text())
    rows = {(r["recipe"], r["sparsity"]): r for r in res["rows"]}
    assert set(rows) == {("dense", 0.0)} | {(n, p) for n in ("teal", "larosa-fused", "larosa-faithful") for p in (0.3, 0.5)}
    for (name, p), r in rows.items():
        spd = "dense" if name == "dense" else frontier.RECIPES[name].speed
        assert r["ms_per_token"] == pytest.approx(frontier.ms_per_token(frontier.load_speeds([speeds], "llama2-7b"),
                                                                          spd, r["effective"]))
        assert r["speedup"] == pytest.approx(10.0 / r["ms_per_token"]) and r["ppl"] > 1
        assert r["estimated"] == (name == "larosa-faithful")
        assert (r["realized"] is None) == (name != "teal")  # thresholds drift on other text; Top-K keeps exactly k
        assert r["realized"] is None or abs(r["realized"] - r["effective"]) < 0.2
        assert (r["layer_error"] is None) == (name == "dense") or len(r["layer_error"]) == s.config.num_layers
    md = (tmp_path / "front.md").read_text()
    for r in frontier.pareto(res["rows"]):
        assert f"| **{r['recipe']}** | {r['sparsity']:.2f} |" in md
    assert "larosa-faithful* |" in md and (tmp_path / "front.png").stat().st_size > 1000
    assert main(argv + ["--resume"]) == 0  # everything measured: nothing recomputed, the same rows
    assert json.loads((tmp_path / "front.json").read_text())["rows"] == res["rows"]
    # tune: the pick, saved; sparsify reads it
    saved = tmp_path / "tuned.json"
    best = frontier.pick(res, target_speedup=1.2)
    assert main(["tune", "--frontier", str(out) + ".json", "--target-speedup", "1.2", "--out", str(saved)]) == 0
    doc = json.loads(saved.read_text())
    assert doc["measured"]["recipe"] == best["recipe"] and doc["measured"]["sparsity"] == best["sparsity"]
    from larosa_jax.calibration import CalibrationStats

    flavour = {None: None, "any": "faithful"}.get(doc["rotations_flavour"], doc["rotations_flavour"])
    sm = sparsify(s.model, flavour and CalibrationStats.load(stories_stats_dir(flavour)), str(saved))
    assert sm.method == doc["sparse_config"]["method"] and sm.effective_sparsity == pytest.approx(best["effective"])
    assert main(["tune", "--frontier", str(out) + ".json", "--target-speedup", "50"]) == 2
    # without --speeds: the quality half (perplexity, layer error against effective sparsity); tune refuses it
    q = tmp_path / "quality"
    argv_q = argv[: argv.index("--speeds")] + ["--out", str(q)]
    argv_q[argv_q.index("teal,larosa-fused,larosa-faithful")] = "teal,teal-alloc"
    assert main(argv_q) == 2  # an allocating recipe without --alloc-data-file: refused before any work
    assert main(argv_q + ["--alloc-data-file", str(TEXT_FILE), "--alloc-samples", "1", "--alloc-seqlen", "0"]) == 2
    assert main(argv_q + ["--alloc-data-file", str(TEXT_FILE), "--alloc-samples", "1", "--alloc-seqlen", "64"]) == 0
    resq = json.loads((tmp_path / "quality.json").read_text())
    assert resq["meta"]["speeds"] is None and frontier.pareto(resq["rows"]) == []
    plain = [r for r in resq["rows"] if r["recipe"] != "teal-alloc"]
    assert [r["ppl"] for r in plain] == [rows[r["recipe"], r["sparsity"]]["ppl"] for r in plain]
    alloc = [r for r in resq["rows"] if r["recipe"] == "teal-alloc"]
    assert len(alloc) == 2 and all(len(r["layers"]) == s.config.num_layers and
                                   all(len(row) == 4 for row in r["layers"]) and
                                   abs(r["effective"] - r["sparsity"]) < 0.01 for r in alloc)
    # --resume reuses the saved greedy path: a dropped row comes back the same without running the greedy again
    assert set(resq["meta"]["greedy_paths"]) == {"teal-alloc"}
    (tmp_path / "quality.json").write_text(json.dumps({**resq, "rows": resq["rows"][:-1]}))
    with mock.patch("larosa_jax.allocation.greedy_path", side_effect=AssertionError("greedy recomputed")):
        assert main(argv_q + ["--alloc-data-file", str(TEXT_FILE), "--alloc-samples", "1", "--alloc-seqlen", "64",
                              "--resume"]) == 0
    assert json.loads((tmp_path / "quality.json").read_text())["rows"] == resq["rows"]
    broken = {**resq, "meta": {**resq["meta"], "greedy_paths": {"teal-alloc": {"step": 0.05, "choices": "0123"}}}}
    (tmp_path / "quality.json").write_text(json.dumps(broken))
    assert main(argv_q + ["--alloc-data-file", str(TEXT_FILE), "--alloc-samples", "1", "--alloc-seqlen", "64",
                          "--resume"]) == 2  # a damaged saved path: refused, naming the file and key
    assert "quality.json: meta.greedy_paths: a saved greedy path must hold" in capsys.readouterr().err
    assert json.loads((tmp_path / "quality.json").read_text()) == broken
    tuned = frontier.tuned_config(alloc[0], "q.json", {"speeds": {"device": "cpu", "shape": "s"}})["sparse_config"]
    assert SparseConfig.from_dict(tuned).layers == tuple(tuple(r) for r in alloc[0]["layers"])
    assert all(r["speedup"] is None for r in resq["rows"]) and "ms/token" not in (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality.png").stat().st_size > 1000
    assert main(["tune", "--frontier", str(q) + ".json", "--target-speedup", "1.2"]) == 2
    # --from: the quality rows with a bench file's speeds attached, no model run; the same as measuring with --speeds
    paired = tmp_path / "paired"
    pair_argv = ["frontier", "--from", str(q) + ".json", "--speeds", str(speeds), "--out", str(paired)]
    assert main(pair_argv[:3] + ["--out", str(paired)]) == 2  # nothing to attach
    assert main(pair_argv + ["--rotations", f"fused={stories_stats_dir('fused')}"]) == 2  # measuring flags refused
    for extra in (["--sparsity", "0.3"], ["--seqlen", "128"], ["--protocol", "full"], ["--no-layer-errors"]):
        assert main(pair_argv + extra) == 2  # so are settings of a measurement, even at their default
    assert main(pair_argv + ["--recipes", "teal,topk"]) == 2  # topk has no row in that file
    assert main(["frontier", "--from", str(q) + ".json", "--speeds",
                 str(_speeds(tmp_path / "t.json", methods=("topk",))), "--out", str(paired)]) == 2  # no teal speeds
    assert not (tmp_path / "paired.json").exists()
    assert main(pair_argv + ["--recipes", "teal"]) == 0
    resp = json.loads((tmp_path / "paired.json").read_text())
    assert [(r["recipe"], r["sparsity"]) for r in resp["rows"]] == [("dense", 0.0), ("teal", 0.3), ("teal", 0.5)]
    for r in resp["rows"]:
        ref = rows[r["recipe"], r["sparsity"]]
        assert (r["ppl"], r["ms_per_token"], r["speedup"]) == (ref["ppl"], ref["ms_per_token"], ref["speedup"])
    assert resp["meta"]["paired_from"] == str(q) + ".json" and "--from" in (tmp_path / "paired.md").read_text()
    assert frontier.pick(resp, target_speedup=1.2)["recipe"] in ("teal", "dense")


def _row(recipe, p, ppl, speedup, estimated=False):
    return {"recipe": recipe, "sparsity": p, "effective": p, "ppl": ppl, "ms_per_token": 10 / speedup,
            "speedup": speedup, "estimated": estimated}


def test_tune_picks_the_pareto_point_of_a_synthetic_frontier():
    res = {"rows": [_row("dense", 0.0, 20.0, 1.0), _row("teal", 0.4, 26.0, 1.6), _row("teal", 0.5, 38.0, 1.8),
                    _row("larosa-joint-thr", 0.4, 24.0, 1.5), _row("larosa-joint-thr", 0.5, 30.0, 1.7),
                    _row("larosa-faithful", 0.5, 25.0, 1.9, estimated=True)]}
    front = {(r["recipe"], r["sparsity"]) for r in frontier.pareto(res["rows"])}
    assert front == {("dense", 0.0), ("larosa-joint-thr", 0.4), ("teal", 0.4), ("larosa-joint-thr", 0.5), ("teal", 0.5)}
    assert frontier.pick(res, target_speedup=1.55)["recipe"] == "teal"  # 26.0 at 1.6x beats 30.0 at 1.7x
    assert (frontier.pick(res, target_speedup=1.65)["recipe"], frontier.pick(res, target_speedup=1.65)["sparsity"]) == \
        ("larosa-joint-thr", 0.5)
    assert frontier.pick(res, max_ppl_increase=5.0)["sparsity"] == 0.4 and \
        frontier.pick(res, max_ppl_increase=5.0)["recipe"] == "larosa-joint-thr"  # +4.0, the fastest within +5
    with pytest.raises(frontier.FrontierError, match=r"no committed config reaches 2x; the fastest is teal at p=0.5: 1.800x"):
        frontier.pick(res, target_speedup=2.0)  # the estimated 1.9x row is not deployable
    with pytest.raises(frontier.FrontierError, match=r"closest is larosa-joint-thr at p=0.4: 24.000 \(\+4.000\)"):
        frontier.pick(res, max_ppl_increase=1.0)
    with pytest.raises(frontier.FrontierError, match="give one target"):
        frontier.pick(res)
    assert SparseConfig.from_dict(frontier.RECIPES["larosa-joint-thr"].config(0.4).to_dict()) == SparseConfig(
        "larosa", "fused", 0.4, select="threshold")


def _quality(rows, **settings):
    st = {"model_fingerprint": "m", "data_fingerprint": "d", "protocol": "full", "limit": None, **settings}
    return {"meta": {"settings": st, "seqlen": 2048, "windows": 4, "env": {}, "speeds": None}, "rows": rows}


def test_merge_joins_runs_of_other_recipes_on_the_same_windows():
    a = _quality([_row("dense", 0.0, 20.0, 1.0), _row("teal", 0.4, 26.0, 1.6)])
    b = _quality([_row("dense", 0.0, 20.0005, 1.0), _row("larosa-global-thr", 0.4, 24.0, 1.6)])
    m = frontier.merge([("a.json", a), ("b.json", b)])
    assert [(r["recipe"], r["ppl"]) for r in m["rows"]] == [("dense", 20.0), ("teal", 26.0), ("larosa-global-thr", 24.0)]
    assert [s["file"] for s in m["meta"]["merged"]] == ["a.json", "b.json"]
    assert frontier.merge([("a.json", a)])["rows"] == a["rows"]
    no_dense = _quality([_row("teal", 0.4, 26.0, 1.6)])  # dense from the first file that has it
    assert [r["recipe"] for r in frontier.merge([("n.json", no_dense), ("b.json", b)])["rows"]] == [
        "teal", "dense", "larosa-global-thr"]
    with pytest.raises(frontier.FrontierError, match="b.json: data_fingerprint 'x' differs"):
        frontier.merge([("a.json", a), ("b.json", _quality(b["rows"], data_fingerprint="x"))])
    with pytest.raises(frontier.FrontierError, match="dense perplexity 21.0000"):
        frontier.merge([("a.json", a), ("b.json", _quality([_row("dense", 0.0, 21.0, 1.0)]))])
    with pytest.raises(frontier.FrontierError, match="teal p=0.4 is also in a.json"):
        frontier.merge([("a.json", a), ("b.json", _quality([_row("teal", 0.4, 26.1, 1.6)]))])


def test_versus_interpolates_teal_at_each_rows_speedup():
    rows = [_row("dense", 0.0, 20.0, 1.0), _row("teal", 0.4, 26.0, 1.6), _row("teal", 0.5, 38.0, 1.8),
            _row("larosa-global-thr", 0.4, 24.0, 1.5), _row("larosa-global-thr", 0.5, 33.0, 1.7),
            _row("larosa-global-thr", 0.6, 50.0, 1.9)]  # 1.9x is outside TEAL's range: not compared
    (v,) = frontier.versus(rows)
    assert (v["recipe"], v["rows"], v["below"]) == ("larosa-global-thr", 2, 1)
    assert v["worst"] == pytest.approx(33.0 - 32.0) and v["best"] == pytest.approx(24.0 - 25.0)
    assert (v["from"], v["to"]) == (1.5, 1.7)
    assert frontier.versus([_row("dense", 0.0, 20.0, 1.0), _row("topk", 0.5, 30.0, 1.5)]) == []
    greedy = rows + [_row("teal-alloc", 0.4, 25.0, 1.6), _row("teal-alloc", 0.5, 30.0, 1.8)]
    by = {v["recipe"]: v for v in frontier.versus(greedy, "teal-alloc")}
    assert set(by) == {"teal", "larosa-global-thr"} and by["teal"]["below"] == 0
    assert by["larosa-global-thr"]["worst"] == pytest.approx(33.0 - 27.5) and by["larosa-global-thr"]["below"] == 1
