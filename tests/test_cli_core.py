"""The La RoSA commands of the ``larosa`` CLI on stories260K: calibrate, search, fuse, and their errors.

- ``larosa calibrate`` writes rotations equal to the library's ``calibrate`` on the same windows;
- ``larosa search`` (small: 2 held-out windows of 128, 3 grid points) prints a table per p, marks
  the best α, and writes alpha.json that ``stored_alpha`` reads back;
- ``larosa fuse`` writes a fused checkpoint that ``larosa_jax.load`` opens with the same logits;
- user errors (too little text, rotations of another model, p outside [0, 1), unknown method)
  print one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import larosa_jax
from _helpers import CAL_BATCH, CAL_SAMPLES, CAL_SEQLEN, TEXT_FILE, held_windows, logits, rel_err, stories, stories_stats
from larosa_jax import checkpoint
from larosa_jax.calibration import CalibrationStats, fingerprint
from larosa_jax.cli import main
from larosa_jax.fusion import fuse
from larosa_jax.search import stored_alpha
from larosa_jax.sparsity import SparseConfig, SparsityError, effective_sparsity_of, site_dims

DATA = ["--data-file", str(TEXT_FILE)]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


_BAR = re.compile(r"\d+%\|.*\| \d+/\d+ \[")


def assert_one_line_error(rc, err, command: str) -> str:
    assert rc == 2, f"exit status {rc}, expected 2; stderr: {err}"
    # progress-bar frames (tqdm, on stderr) are not part of the message
    lines = [ln for ln in err.replace("\r", "\n").strip().splitlines() if ln.strip() and not _BAR.search(ln)]
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{err}"
    assert lines[0].startswith(f"larosa {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_rotations(tmp_path_factory) -> Path:
    """``larosa calibrate`` (flavour fused) on the shared calibration windows."""
    out = tmp_path_factory.mktemp("cli") / "rotations"
    rc = main(["calibrate", "--ckpt", str(stories().ckpt), "--out", str(out), *DATA, "--samples",
                        str(CAL_SAMPLES), "--seqlen", str(CAL_SEQLEN), "--batch", str(CAL_BATCH)])
    assert rc == 0
    return out


def test_calibrate_writes_the_library_rotations(cli_rotations):
    stats = CalibrationStats.load(cli_rotations)
    ref = stories_stats("fused")  # same text, samples, seqlen, seed (0) and batch: the same windows
    assert stats.flavour == "fused"
    assert stats.metadata["model_fingerprint"] == fingerprint(stories().model)
    assert stats.metadata["data_source"] == str(TEXT_FILE) and stats.metadata["tokens"] == str(CAL_SAMPLES * CAL_SEQLEN)
    np.testing.assert_allclose(stats.eigenvalues, ref.eigenvalues, rtol=1e-5, atol=1e-6 * ref.eigenvalues.max())
    for q_cli, q_ref in zip(stats.rotations, ref.rotations):
        signs = np.sign(np.sum(q_cli * q_ref, axis=0))
        np.testing.assert_allclose(q_cli * signs, q_ref, atol=1e-5)
    for site, q in ref.quantiles.items():
        np.testing.assert_allclose(stats.quantiles[site], q, rtol=1e-5, atol=1e-7)


_ROW = re.compile(r"^\s*([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)( \*)?$")


def test_search_prints_a_table_and_stores_alpha(cli_rotations, capsys):
    rc, out, err = run_cli(capsys, "search", "--ckpt", stories().ckpt, "--rotations", cli_rotations,
                           "--sparsity", "0.25,0.5", *DATA, "--samples", 2, "--seqlen", 128, "--points", 3,
                           "--calib-samples", CAL_SAMPLES)
    assert rc == 0, err
    cfg = stories().config
    tol = max(1.0 / d for d in site_dims(cfg).values())
    saved = json.loads((cli_rotations / "alpha.json").read_text())
    blocks = out.split("α search, larosa faithful, p = ")[1:]
    assert len(blocks) == 2, out
    for p, block in zip((0.25, 0.5), blocks):
        assert block.startswith(f"{p:g}, 2 held-out windows of 128"), block
        assert re.search(r"α_rot\s+α_plain\s+nominal p\s+effective\s+ppl", block), block
        rows = [m.groups() for m in map(_ROW.match, block.splitlines()) if m]
        assert len(rows) == 3, block
        marked = [r for r in rows if r[5]]
        assert len(marked) == 1, "exactly one row marked best"
        ppls = [float(r[4]) for r in rows]
        assert all(np.isfinite(ppls)) and min(ppls) > 1.0
        assert float(marked[0][4]) == min(ppls)
        for r in rows:
            assert float(r[2]) == pytest.approx(p, abs=5e-4)
            assert abs(float(r[3]) - p) <= tol + 5e-4, f"effective {r[3]} at p={p}"
        # alpha.json: the whole table and the winner, which stored_alpha reads back
        entry = saved[f"{p:g}"]["faithful"]
        assert len(entry["table"]) == 3 and entry["sparsity"] == p and entry["mode"] == "faithful"
        best_row = min(entry["table"], key=lambda r: r["ppl"])
        assert tuple(entry["best"]) == (best_row["alpha_rot"], best_row["alpha_plain"])
        best = stored_alpha(cli_rotations, p, "faithful")
        assert best == (best_row["alpha_rot"], best_row["alpha_plain"])
        assert (f"{best[0]:.3f}", f"{best[1]:.3f}") == (marked[0][0], marked[0][1])
        assert f"best α = ({best[0]:.3f}, {best[1]:.3f})" in block
        for r in entry["table"]:
            eff = effective_sparsity_of(cfg, SparseConfig("larosa", "faithful", p, (r["alpha_rot"], r["alpha_plain"])))
            assert r["effective"] == pytest.approx(eff) and abs(eff - p) <= tol
        SparseConfig("larosa", "faithful", p, best)  # a usable setting
    with pytest.raises(SparsityError, match=r"larosa search --sparsity 0.4 --mode faithful"):
        stored_alpha(cli_rotations, 0.4, "faithful")
    with pytest.raises(SparsityError, match="mode fused"):
        stored_alpha(cli_rotations, 0.25, "fused")


def test_fuse_writes_a_loadable_fused_checkpoint(cli_rotations, capsys, tmp_path):
    s = stories()
    out = tmp_path / "fused"
    rc, stdout, err = run_cli(capsys, "fuse", "--ckpt", s.ckpt, "--rotations", cli_rotations, "--out", out)
    assert rc == 0, err
    assert "wrote fused checkpoint" in stdout
    meta = json.loads((out / "config.json").read_text())["larosa"]
    assert meta["fused"] is True and meta["rotations_model_fingerprint"] == fingerprint(s.model)
    assert (out / "tokenizer.json").exists()
    fused = larosa_jax.load(out)
    assert fused.adapters is not None
    tokens = held_windows(2, 128)
    in_memory = fuse(s.model, CalibrationStats.load(cli_rotations).rotations)
    np.testing.assert_array_equal(logits(fused, tokens), logits(in_memory, tokens))
    assert rel_err(logits(fused, tokens), logits(s.model, tokens)) <= 1e-4
    # an existing output is not replaced silently
    rc, _, err = run_cli(capsys, "fuse", "--ckpt", s.ckpt, "--rotations", cli_rotations, "--out", out)
    assert "already exists" in assert_one_line_error(rc, err, "fuse")


# ----------------------------------------------------------------------------- user errors: one line, exit 2
def test_cli_calibrate_with_too_little_text(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(TEXT_FILE.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    rc, _, err = run_cli(capsys, "calibrate", "--ckpt", stories().ckpt, "--out", tmp_path / "rot",
                         "--data-file", short, "--samples", 16, "--seqlen", 128)
    line = assert_one_line_error(rc, err, "calibrate")
    assert re.search(r"\b\d+ tokens available\b", line) and "16 x 128 = 2048" in line and str(short) in line
    assert not (tmp_path / "rot").exists()


def test_cli_fuse_refuses_rotations_of_another_model(cli_rotations, capsys, tmp_path):
    s = stories()
    other = larosa_jax.load(s.ckpt)  # same shapes, slightly other weights
    emb = other.embed.embedding[...]
    other.embed.embedding.set_value(emb * 1.1)
    other_ckpt = checkpoint.save(other, tmp_path / "other", tokenizer_from=s.ckpt)
    rc, _, err = run_cli(capsys, "fuse", "--ckpt", other_ckpt, "--rotations", cli_rotations, "--out", tmp_path / "f")
    line = assert_one_line_error(rc, err, "fuse")
    assert fingerprint(s.model) in line and fingerprint(other) in line, line
    assert not (tmp_path / "f").exists()


def test_cli_search_with_sparsity_outside_unit_interval(cli_rotations, capsys):
    for p in ("1.5", "1.0"):
        try:
            rc, _, err = run_cli(capsys, "search", "--ckpt", stories().ckpt, "--rotations", cli_rotations,
                                 "--sparsity", p, *DATA, "--samples", 1, "--seqlen", 64, "--points", 2)
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"larosa search --sparsity {p} crashed with {type(e).__name__}: {e} "
                        "instead of a one-line error naming the range [0, 1) and exit status 2")
        assert "[0, 1)" in assert_one_line_error(rc, err, "search")


def test_cli_unknown_method_lists_the_valid_ones(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "ppl", "--ckpt", stories().ckpt, "--methods", "dense,wina", "--out", tmp_path / "r")
    line = assert_one_line_error(rc, err, "ppl")
    assert "'wina'" in line and all(m in line for m in ("dense", "topk", "teal", "cats", "larosa"))
