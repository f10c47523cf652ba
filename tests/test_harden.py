"""Bad input and faults (issue 27): one test per defect class found by the bad-input battery.

1. outputs: never the current directory, a parent or a directory with foreign files; replaced only
   with --overwrite and only once the new one is complete; calibrate and demo included;
2. a tokenizer that names custom code is refused, never run, never prompts;
3. untrusted sizes are bounded before anything is allocated; stored layers must match the config;
4. no silently wrong results: result paths with dots, --resume with other settings, broken rotations
   files, stale α, nonsense flag values, held-out windows on the calibration text, NaN temperature;
5. ppl checks every cell before its first row;
6. one-line errors naming the file / flag instead of tracebacks;
7. a convert killed with SIGKILL leaves a temporary that the next run removes; SIGTERM cleans up.

Everything runs in-process on stories260K (the shared calibration of ``_helpers``) except the kill
test, which needs a process to kill.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import larosa_jax
from _helpers import REPO, STORIES_DIR, TEXT_FILE, stories, stories_stats, stories_stats_dir
from larosa_jax import checkpoint, evaluate
from larosa_jax.calibration import CalibrationError, CalibrationStats
from larosa_jax.cli import main
from larosa_jax.config import ConfigError, ModelConfig
from larosa_jax.safetensors_io import CheckpointError, SafeTensorsFile, save_tensors
from larosa_jax.search import SearchResult, store_alpha, stored_alpha
from larosa_jax.sparsity import SparsityError
from test_cli_core import assert_one_line_error, run_cli

DATA = ["--data-file", str(TEXT_FILE)]


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a command loads the model (checks must come first)."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(checkpoint, "load", refuse)


def hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def ckpt_copy(tmp_path: Path, name: str = "ckpt") -> Path:
    out = tmp_path / name
    shutil.copytree(stories().ckpt, out)
    return out


def ppl_args(out, *extra, seqlen=32, limit=1):
    return ["ppl", "--ckpt", stories().ckpt, *DATA, "--seqlen", seqlen, "--limit", limit, "--methods", "dense",
            "--out", out, *extra]


# ============================================================================ 1. data loss
def test_convert_never_replaces_the_current_directory_or_a_parent(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        rc, _, err = run_cli(capsys, "convert", "--model", STORIES_DIR, "--out", out, "--overwrite")
        line = assert_one_line_error(rc, err, "convert")
        assert "current directory" in line, line
    assert (work / "mine.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_overwrite_never_replaces_a_directory_with_foreign_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "convert", "--model", STORIES_DIR, "--out", out, "--overwrite")
    line = assert_one_line_error(rc, err, "convert")
    assert "notes.txt" in line and str(out) in line
    assert tree(out) == {"notes.txt": b"mine"}
    # a checkpoint directory is replaced with --overwrite, and only once the new one is complete
    (out / "notes.txt").unlink()
    assert run_cli(capsys, "convert", "--model", STORIES_DIR, "--out", out)[0] == 0
    assert run_cli(capsys, "convert", "--model", STORIES_DIR, "--out", out, "--dtype", "float32", "--overwrite")[0] == 0
    assert json.loads((out / "config.json").read_text())["larosa"]["dtype"] == "float32"
    assert hidden(tmp_path) == []


def test_demo_does_not_delete_files_in_its_directory(tmp_path, capsys):
    demo = tmp_path / "demo"
    (demo / "stories260K").mkdir(parents=True)
    (demo / "stories260K" / "mine.txt").write_text("keep me")
    (demo / "notes.txt").write_text("mine too")
    rc, _, err = run_cli(capsys, "demo", "--out", demo)
    line = assert_one_line_error(rc, err, "demo")
    assert "stories260K" in line
    assert tree(demo) == {"notes.txt": b"mine too", "stories260K/mine.txt": b"keep me"}


def _calibrate(capsys, out, *extra):
    return run_cli(capsys, "calibrate", "--ckpt", stories().ckpt, "--out", out, *DATA, "--samples", 2, "--seqlen", 32,
                   "--batch", 2, *extra)


def test_calibrate_replaces_rotations_only_with_overwrite_and_drops_their_alpha(tmp_path, capsys):
    rot = tmp_path / "rot"
    assert _calibrate(capsys, rot)[0] == 0
    store_alpha(rot, SearchResult(0.5, "faithful", [], (1.0, 1.0)))
    before = tree(rot)
    assert set(before) == {"rotations.safetensors", "alpha.json"}
    rc, _, err = _calibrate(capsys, rot, "--seed", 1)
    assert "already exists" in assert_one_line_error(rc, err, "calibrate")
    assert tree(rot) == before
    rc, _, err = _calibrate(capsys, rot, "--seed", 1, "--overwrite")
    assert rc == 0, err
    assert set(tree(rot)) == {"rotations.safetensors"}  # the α of the old rotations went with them
    assert tree(rot)["rotations.safetensors"] != before["rotations.safetensors"]


def test_killed_overwrite_run_keeps_the_old_results(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    args = ppl_args(out, "--methods", "dense,topk", "--alpha", "uniform", "--sparsity", "0.5")
    assert run_cli(capsys, *args)[0] == 0
    before = tree(tmp_path)
    calls = []

    def dies_on_second_row(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed between rows
        return real(*a, **k)

    real = evaluate.window_nll
    monkeypatch.setattr(evaluate, "window_nll", dies_on_second_row)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in args] + ["--overwrite"])
    assert len(calls) == 2
    assert tree(tmp_path) == before  # old results intact, no temporaries


def test_results_files_replace_old_results_only_at_the_end(tmp_path):
    """The one staging rule of ppl, frontier and zeroshot: new or resumed files are written in place; replaced
    ones through temporaries that take their place at the end, or vanish if the run fails."""
    from larosa_jax import outputs

    files = [tmp_path / "r.json", tmp_path / "r.md"]
    with outputs.results_files(files, resume=False) as t:
        assert t == files  # new: written where they go
    for f in files:
        f.write_text("old")
    with outputs.results_files(files, resume=True) as t:
        assert t == files  # resumed: rows are added to the same files
    with pytest.raises(KeyboardInterrupt), outputs.results_files(files, resume=False) as t:
        assert t != files and not any(x.exists() for x in t)
        for x in t:
            x.write_text("new")
        raise KeyboardInterrupt
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json", "r.md"] and files[0].read_text() == "old"
    with outputs.results_files(files, resume=False) as t:
        for x in t:
            x.write_text("new")
        assert files[0].read_text() == "old"  # until the run ends
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json", "r.md"] and files[1].read_text() == "new"


# ============================================================================ 2. code from a checkpoint
def test_tokenizer_custom_code_is_refused_without_prompting(tmp_path, monkeypatch):
    ckpt = ckpt_copy(tmp_path)
    marker = tmp_path / "code-ran"
    (ckpt / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"  # (without it transformers ignores auto_map and asks nothing)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a piped "y"
    with pytest.raises(CheckpointError) as e:
        larosa_jax.load_tokenizer(ckpt)
    assert "auto_map" in str(e.value) and "tokenizer_config.json" in str(e.value)
    assert not asked and not marker.exists()


# ============================================================================ 3. untrusted sizes
_BASE = json.loads((STORIES_DIR / "config.json").read_text())


@pytest.mark.parametrize("key,value", [
    ("num_hidden_layers", 10**9), ("num_hidden_layers", 0), ("num_hidden_layers", -1), ("hidden_size", 0),
    ("num_attention_heads", 0), ("num_key_value_heads", 0), ("vocab_size", -5), ("intermediate_size", 0),
    ("head_dim", 7), ("max_position_embeddings", 0), ("rms_norm_eps", -1.0), ("hidden_size", "64"),
    ("num_hidden_layers", 2.5), ("eos_token_id", 10**6), ("rope_theta", float("nan")),
])
def test_config_sizes_are_checked(key, value):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**_BASE, key: value}, source="cfg.json")
    assert key in str(e.value) and "cfg.json" in str(e.value), str(e.value)


def test_convert_refuses_zero_layers_and_fewer_layers_than_stored(tmp_path):
    for layers, error, needle in ((0, ConfigError, "num_hidden_layers=0"), (4, CheckpointError, "layer 4")):
        hf = tmp_path / f"hf{layers}"
        shutil.copytree(STORIES_DIR, hf)
        (hf / "config.json").write_text(json.dumps({**_BASE, "num_hidden_layers": layers}))
        with pytest.raises(error, match=needle):
            larosa_jax.convert(str(hf), tmp_path / f"out{layers}", progress=False)
        assert not (tmp_path / f"out{layers}").exists()


def test_load_refuses_fewer_layers_than_stored_and_extra_tensors(tmp_path):
    ckpt = ckpt_copy(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match=r"layer 4 .*num_hidden_layers=4"):
        larosa_jax.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps(raw))
    st = SafeTensorsFile(ckpt / "model.safetensors")
    tensors = {k: np.array(st[k]) for k in st.keys()}
    del st
    tensors["extra.weight"] = np.zeros(3, np.float32)
    save_tensors(ckpt / "model.safetensors", tensors, {"format": "larosa", "dtype": "float32"})
    with pytest.raises(CheckpointError, match="extra.weight"):
        larosa_jax.load(ckpt)


# ============================================================================ 4. silently wrong results
def test_result_paths_keep_the_users_name(tmp_path, capsys):
    for name in ("grid_p0.4", "grid_p0.5"):
        rc, _, err = run_cli(capsys, *ppl_args(tmp_path / name))
        assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"grid_p0.{i}.{e}" for i in (4, 5) for e in ("json", "md", "png")]


def test_resume_refuses_results_of_other_settings(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(capsys, *ppl_args(out))[0] == 0
    before = tree(tmp_path)
    for kw in ({"seqlen": 64}, {"limit": 2}):
        rc, _, err = run_cli(capsys, *ppl_args(out, "--resume", **kw))
        line = assert_one_line_error(rc, err, "ppl")
        assert "other settings" in line and str(out) in line and next(iter(kw)) in line, line
    rc, _, err = run_cli(capsys, *ppl_args(out, "--resume", "--data-file", STORIES_DIR / "SOURCE.md"))
    assert "data_fingerprint" in assert_one_line_error(rc, err, "ppl")
    assert tree(tmp_path) == before


def _write_rotations(path: Path, edit) -> Path:
    s = stories_stats("fused")
    tensors = {f"layers.{l}.Q": s.rotations[l].copy() for l in range(len(s.rotations))}
    tensors["eigenvalues"] = s.eigenvalues.copy()
    tensors.update({f"quantiles.{k}": q.copy() for k, q in s.quantiles.items()})
    meta = dict(s.metadata)
    edit(tensors, meta)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "rotations.safetensors", tensors, meta)
    return path


def _set(name, value):
    def edit(t, m):
        t[name] = value(t[name])
    return edit


@pytest.mark.parametrize("case,edit,needle", [
    ("nan-q", _set("layers.2.Q", lambda q: np.where(np.eye(len(q)) > 0, np.nan, q)), "layers.2.Q"),
    ("not-orthogonal", _set("layers.1.Q", lambda q: q * 1.01), "layers.1.Q"),
    ("too-few-layers", lambda t, m: t.pop("layers.4.Q"), "layers"),
    ("nan-threshold", _set("quantiles.qkv", lambda q: np.full_like(q, np.nan)), "quantiles.qkv"),
    ("missing-quantiles", lambda t, m: t.pop("quantiles.cats"), "quantiles.cats"),
    ("missing-flavour", lambda t, m: m.pop("flavour"), "flavour"),
])
def test_broken_rotations_files_are_refused(case, edit, needle, tmp_path):
    rot = _write_rotations(tmp_path / case, edit)
    with pytest.raises((CheckpointError, CalibrationError)) as e:
        CalibrationStats.load(rot).check_model(stories().model, where=str(rot))
    assert needle in str(e.value) and str(rot) in str(e.value), str(e.value)


def test_alpha_is_tied_to_the_rotations_it_was_searched_on(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(stories_stats_dir("fused"), a)
    shutil.copytree(stories_stats_dir("faithful"), b)
    store_alpha(a, SearchResult(0.5, "faithful", [], (0.9, 1.1)))
    assert stored_alpha(a, 0.5, "faithful") == (0.9, 1.1)
    shutil.copy(a / "alpha.json", b / "alpha.json")  # α of other rotations
    with pytest.raises(SparsityError, match="stale"):
        stored_alpha(b, 0.5, "faithful")
    raw = json.loads((a / "alpha.json").read_text())
    raw.pop("rotations_fingerprint")
    (b / "alpha.json").write_text(json.dumps(raw))  # one that says nothing of its rotations
    with pytest.raises(SparsityError, match="not tied"):
        stored_alpha(b, 0.5, "faithful")


def test_search_keeps_held_out_windows_off_the_calibration_text(tmp_path, capsys, monkeypatch):
    text = tmp_path / "short.txt"
    text.write_text(TEXT_FILE.read_text(encoding="utf-8")[:4500], encoding="utf-8")
    rot = tmp_path / "rot"
    rc, _, err = run_cli(capsys, "calibrate", "--ckpt", stories().ckpt, "--out", rot, "--data-file", text,
                         "--samples", 24, "--seqlen", 64, "--batch", 8)
    assert rc == 0, err
    from larosa_jax import data, search

    ids = data.tokenize(larosa_jax.load_tokenizer(stories().ckpt), text.read_text(encoding="utf-8"))
    n = len(ids) // 64
    assert 24 < n < 40, n  # calibration covers most of the text
    cal = {int(i) for i in np.random.default_rng(0).permutation(n)[:24]}
    seen = []

    def fake_search(model, stats, p, windows, **kw):
        seen.append(np.asarray(windows))
        return SearchResult(p, kw.get("mode", "faithful"), [], (1.0, 1.0))

    monkeypatch.setattr(search, "search_alpha", fake_search)
    rc, _, err = run_cli(capsys, "search", "--ckpt", stories().ckpt, "--rotations", rot, "--data-file", text,
                         "--sparsity", 0.5, "--samples", 3, "--seqlen", 64, "--seed", 1, "--points", 1,
                         "--calib-samples", 24)
    assert rc == 0, err
    grid = ids[: n * 64].reshape(n, 64)
    used = {int(np.flatnonzero((grid == w).all(axis=1))[0]) for w in seen[0]}
    assert len(used) == 3 and not used & cal, (sorted(used), sorted(cal))


def test_generate_refuses_nan_temperature_and_out_of_vocabulary_ids():
    model = stories().model
    with pytest.raises(ValueError, match="temperature"):
        larosa_jax.generate(model, [[1, 5, 9]], max_new_tokens=4, temperature=float("nan"))
    with pytest.raises(ValueError, match="eos_token_ids.*1000000"):
        larosa_jax.generate(model, [[1, 5, 9]], max_new_tokens=4, eos_token_ids=[10**6])


def test_generate_checks_the_real_prompt_length():
    """505 prompt tokens + 7 new ones fit a 512-token model; the bucket (512) + 7 does not, so the
    check must use the real length. The first token is the full forward's argmax."""
    from _helpers import logits

    model = stories().model
    prompt = stories().ids[:505].tolist()
    out = larosa_jax.generate(model, [prompt], max_new_tokens=7, eos_token_ids=[])[0]
    assert len(out) == 7
    assert out[0] == int(np.argmax(logits(model, [prompt])[0, -1]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        larosa_jax.generate(model, [prompt], max_new_tokens=8)


# ============================================================================ 4-6. flags checked first, one line
@pytest.mark.parametrize("argv,needle", [
    (["ppl", "--seqlen", "1"], "--seqlen 1: must be an integer in [2,"),
    (["ppl", "--limit", "0"], "--limit 0"),
    (["ppl", "--limit", "-1"], "--limit -1"),
    (["ppl", "--batch", "0"], "--batch 0"),
    (["ppl", "--protocol", "random", "--samples", "-3"], "--samples -3"),
    (["ppl", "--seqlen", "1024"], "--seqlen 1024: must be in [2, 512]"),
    (["ppl", "--sparsity", "nan"], "--sparsity nan"),
    (["calibrate", "--samples", "-3"], "--samples -3"),
    (["calibrate", "--seqlen", "1024"], "--seqlen 1024: must be in [2, 512]"),
    (["search", "--calib-samples", "-5"], "--calib-samples -5"),
    (["search", "--points", "0"], "--points 0"),
    (["search", "--seqlen", "600"], "--seqlen 600: must be in [2, 512]"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["generate", "--temperature", "nan"], "--temperature nan"),
    (["generate", "--temperature", "-1"], "--temperature -1"),
    (["generate", "--top-p", "0"], "--top-p 0"),
    (["generate", "--seed", "-1"], "--seed -1"),
    (["generate", "--dtype", "foo"], "--dtype foo"),
])
def test_flags_are_range_checked_before_any_work(argv, needle, tmp_path, capsys, no_load):
    cmd = argv[0]
    base = {
        "ppl": ["--ckpt", stories().ckpt, *DATA, "--methods", "dense", "--out", tmp_path / "r"],
        "calibrate": ["--ckpt", stories().ckpt, *DATA, "--out", tmp_path / "rot"],
        "search": ["--ckpt", stories().ckpt, *DATA, "--rotations", stories_stats_dir("fused"), "--sparsity", "0.5"],
        "generate": ["--ckpt", stories().ckpt, "--prompt", "Once"],
    }[cmd]
    rc, _, err = run_cli(capsys, cmd, *base, *argv[1:])
    line = assert_one_line_error(rc, err, cmd)
    assert needle in line, line
    assert list(tmp_path.iterdir()) == []


def test_ppl_checks_every_cell_before_the_first_row(tmp_path, capsys, no_load):
    rc, _, err = run_cli(capsys, *ppl_args(tmp_path / "r", "--methods", "dense,topk", "--alpha", "uniform",
                                           "--sparsity", "0.4,0.995"))
    line = assert_one_line_error(rc, err, "ppl")
    assert "p=0.995" in line and "k=0" in line, line
    assert list(tmp_path.iterdir()) == []


def _bad_ckpt(tmp_path, text: bytes) -> Path:
    ckpt = ckpt_copy(tmp_path)
    (ckpt / "config.json").write_bytes(text)
    return ckpt


@pytest.mark.parametrize("case", ["non-utf8-text", "bad-config-json", "config-list", "non-utf8-config", "bad-resume-json",
                                  "file-as-out", "bad-index"])
def test_bad_files_give_one_line_naming_the_file(case, tmp_path, capsys):
    ckpt = stories().ckpt
    if case == "non-utf8-text":
        bad = tmp_path / "latin1.txt"
        bad.write_bytes("Once upon a time, café\n".encode("latin-1") * 200)
        argv = ["ppl", "--ckpt", ckpt, "--data-file", bad, "--seqlen", 32, "--methods", "dense", "--out", tmp_path / "r"]
    elif case in ("bad-config-json", "config-list", "non-utf8-config"):
        bad = _bad_ckpt(tmp_path, {"bad-config-json": b'{"vocab_size": 512,', "config-list": b"null",
                                   "non-utf8-config": b'{"x": "\xff"}'}[case]) / "config.json"
        argv = ["generate", "--ckpt", bad.parent, "--prompt", "Once"]
    elif case == "bad-resume-json":
        bad = tmp_path / "r.json"
        bad.write_text('{"meta": {}, "rows": [')
        argv = ppl_args(tmp_path / "r", "--resume")
    elif case == "file-as-out":
        bad = tmp_path / "out"
        bad.write_text("a file")
        argv = ["convert", "--model", STORIES_DIR, "--out", bad, "--overwrite"]
    else:
        hf = tmp_path / "hf"
        shutil.copytree(STORIES_DIR, hf)
        bad = hf / "model.safetensors.index.json"
        bad.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
        (hf / "model.safetensors").unlink()
        argv = ["convert", "--model", hf, "--out", tmp_path / "out"]
    try:
        rc, _, err = run_cli(capsys, *argv)
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: {type(e).__name__}: {e} instead of a one-line error naming {bad}")
    line = assert_one_line_error(rc, err, argv[0])
    assert str(bad) in line, line
    if case == "file-as-out":
        assert bad.read_text() == "a file"


# ============================================================================ 7. leftovers of a killed convert
_SLOW_CONVERT = r"""
import sys, time
import larosa_jax.checkpoint as ck
from larosa_jax.cli import main

real = ck.write_safetensors

def slow(path, specs, tensors, *a, **k):
    def gen():
        for i, t in enumerate(tensors):
            if i == 3:
                print("WRITING", path, flush=True)
                time.sleep(600)
            yield t
    return real(path, specs, gen(), *a, **k)

ck.write_safetensors = slow
sys.exit(main(["convert", "--model", sys.argv[1], "--out", sys.argv[2], "--dtype", "float32"]))
"""


def test_convert_killed_mid_write_leaves_a_temporary_the_next_run_removes(tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(STORIES_DIR), str(out)], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("WRITING"), f"the converter did not start writing: {line!r}"
        partial = Path(line.split(" ", 1)[1].strip())
        assert partial.is_file() and partial.stat().st_size > 8 and partial.parent.parent == tmp_path
    finally:
        proc.kill()  # SIGKILL: no cleanup can run
        proc.wait()
    stale = hidden(tmp_path)
    assert len(stale) == 1 and not out.exists()
    rc, stdout, err = run_cli(capsys, "convert", "--model", STORIES_DIR, "--out", out)
    assert rc == 0, err
    assert re.search(rf"removed .*{re.escape(stale[0])}.*interrupted run \(process {proc.pid}\)", err), err
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()
    larosa_jax.load(out)


def test_sigterm_during_convert_removes_the_temporary(tmp_path, monkeypatch):
    real = checkpoint.write_safetensors

    def terminated(path, specs, tensors, *a, **k):
        def gen():
            for i, t in enumerate(tensors):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield t
        return real(path, specs, gen(), *a, **k)

    def fallback(signum, frame):  # only if main installs no handler: never let SIGTERM end pytest
        raise RuntimeError("SIGTERM reached the test's own handler")

    monkeypatch.setattr(checkpoint, "write_safetensors", terminated)
    previous = signal.signal(signal.SIGTERM, fallback)
    try:
        with pytest.raises(SystemExit) as e:
            main(["convert", "--model", str(STORIES_DIR), "--out", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
