"""Perplexity: agreement with transformers, the grid runner (files, resume, refusals), the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import larosa_jax
from larosa_jax import cli, data
from larosa_jax.perplexity import perplexity

TINY_TEXT = Path(larosa_jax.__file__).parent / "assets" / "tinystories-valid-head.txt"


def _hf_ppl(hf, windows) -> float:
    with torch.no_grad():
        logits = hf(torch.tensor(windows)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, torch.tensor(windows)[:, 1:, None]).mean()
    return float(torch.exp(nll))


def test_dense_ppl_equals_transformers_stories(stories_model, stories_tokenizer, stories_hf):
    ids = data.tokenize(stories_tokenizer, TINY_TEXT.read_text())
    win = data.split_windows(ids, 256)[:6]
    ours, ref = perplexity(stories_model, win, batch_size=3), _hf_ppl(stories_hf, win)
    assert abs(ours / ref - 1) < 1e-3, (ours, ref)
    assert 2.0 < ours < 20.0  # the model knows TinyStories


def test_dense_ppl_equals_transformers_smollm2(smol_model, smol_hf):
    from transformers import AutoTokenizer

    from conftest import SMOL_DIR

    tok = AutoTokenizer.from_pretrained(str(SMOL_DIR))
    text = (Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw-v1/wiki.valid.raw").read_text()[:20000]
    win = data.split_windows(data.tokenize(tok, text), 512)[:2]
    ours, ref = perplexity(smol_model, win), _hf_ppl(smol_hf, win)
    assert abs(ours / ref - 1) < 1e-3, (ours, ref)


@pytest.fixture(scope="module")
def rotations(stories_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("rot")
    assert cli.main(["calibrate", "--ckpt", str(stories_ckpt), "--data-file", str(TINY_TEXT), "--samples", "4",
                     "--seqlen", "128", "--batch", "4", "--out", str(out)]) == 0
    return out


def _ppl_args(ckpt, rot, out, *extra):
    return ["ppl", "--ckpt", str(ckpt), "--rotations", str(rot), "--data-file", str(TINY_TEXT), "--seqlen", "128",
            "--limit", "4", "--batch", "4", "--out", str(out), *extra]


def test_ppl_grid_files_resume_and_refusal(stories_ckpt, rotations, tmp_path, capsys):
    out = tmp_path / "res" / "grid"
    args = _ppl_args(stories_ckpt, rotations, out, "--methods", "dense,larosa,teal", "--sparsity", "0.5",
                     "--mode", "faithful,fused")
    assert cli.main(args) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["dense", "larosa faithful (official α)", "larosa fused (official α)", "teal"]
    dense = res["rows"][0]["ppl"]
    assert all(r["ppl"] > dense for r in res["rows"][1:])  # sparsity costs something at p = 0.5
    assert res["meta"]["tokens_scored"] == 4 * 127 and res["meta"]["env"]["jax"]
    md = out.with_suffix(".md").read_text()
    assert "| teal | 0.50 | 0.500 |" in md and out.with_suffix(".png").stat().st_size > 1000
    # an existing result is not overwritten ...
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    # ... but --resume adds only the missing rows and keeps the measured ones
    assert cli.main(args + ["--resume", "--methods", "dense,larosa,teal,topk"]) == 0
    res2 = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in res2["rows"]] == labels + ["topk (official α)"]
    assert res2["rows"][0]["ppl"] == dense


@pytest.mark.parametrize("bad,needle", [
    (["--data-file", "/nonexistent/text.txt"], "data file not found"),
    (["--seqlen", "200000"], "--seqlen 200000: must be in [2, 512]"),
    (["--seqlen", "1024"], "max_position_embeddings"),
    (["--methods", "dense,magic"], "unknown method 'magic'"),
    (["--mode", "sideways"], "unknown mode 'sideways'"),
])
def test_ppl_bad_input_one_line(stories_ckpt, rotations, tmp_path, capsys, bad, needle):
    assert cli.main(_ppl_args(stories_ckpt, rotations, tmp_path / "r") + bad) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_ppl_rotations_of_another_model(stories_ckpt, rotations, tmp_path, capsys):
    from flax import nnx

    from larosa_jax.checkpoint import save

    other = larosa_jax.load(stories_ckpt)  # same shapes, different weights
    emb = other.embed.embedding
    emb.set_value(emb.get_value() * 1.5) if hasattr(emb, "set_value") else setattr(emb, "value", emb.value * 1.5)
    ckpt = save(other, tmp_path / "other", tokenizer_from=stories_ckpt)
    assert isinstance(other, nnx.Module)
    assert cli.main(_ppl_args(ckpt, rotations, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "calibrated on model" in err and "this model is" in err and str(rotations) in err


def test_demo_runs(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for row in ("dense", "larosa fused", "teal", "Once upon a time"):
        assert row in out
