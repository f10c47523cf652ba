"""Zero-shot evaluation: ``LarosaLM`` against lm-eval's own HF model (HFLM) on the bundled stories260K.

The reference is ``lm_eval.models.huggingface.HFLM`` over the same weights in transformers, with the
same tokenizer: tokenization, per-request log-likelihoods (with and without left truncation),
whole-task accuracy through ``simple_evaluate``, rolling log-likelihoods and greedy generation with
stop strings must all agree. lm-eval is a test dependency (pyproject's ``test`` extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import larosa_jax
from larosa_jax import zeroshot
from larosa_jax.cli import main
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SparseConfig
from larosa_jax.zeroshot import TASKS, LarosaLM, ZeroShotError, local_tasks, run_zeroshot

from conftest import SMOL_DIR, forward

TINY = Path(__file__).parent / "data" / "zeroshot_tiny"
TINY_TASK = "tiny_arc"
STORY = (Path(larosa_jax.__file__).parent / "assets" / "tinystories-valid-head.txt").read_text()


@pytest.fixture(autouse=True)
def _no_env_report(monkeypatch):
    """simple_evaluate's environment report runs torch's collect_env (pip, nvidia-smi): ~6 s a call."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


@pytest.fixture(scope="module")
def tok(stories_ckpt):
    """A tokenizer of our own: HFLM sets a pad token on the tokenizer it is given."""
    return larosa_jax.load_tokenizer(stories_ckpt)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny task's yaml with its data file made absolute (an include_path)."""
    d = tmp_path_factory.mktemp("tiny-task")
    cfg = yaml.safe_load((TINY / "tiny_arc.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(TINY / "test.jsonl")
    (d / "tiny_arc.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def tiny_requests(tiny_dir) -> list[Instance]:
    task = TaskManager(include_path=str(tiny_dir), include_defaults=False).load([TINY_TASK])["tasks"][TINY_TASK]
    task.build_all_requests(rank=0, world_size=1)
    assert len(task.instances) == 32  # 8 questions × 4 choices
    return task.instances


def hflm(stories_hf, tok, **kw) -> HFLM:
    return HFLM(pretrained=stories_hf, tokenizer=tok, batch_size=kw.pop("batch_size", 4), device="cpu", **kw)


def ll_requests(pairs) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


# ----------------------------------------------------------------------------- tokenization
TOKENIZATION_STRINGS = ["Once upon a time", " Once upon a time", "<s>Once upon a time", "Hello\nAnswer:", "a  b  "]
PAIRS = [("Question: Is the sky blue?\nAnswer:", " yes"), ("The cat sat on the ", "mat"), ("Tom  ", " ran away."),
         ("<s>Lily saw", " a dog")]


def _tokenizers(stories_ckpt):
    out = [("stories260K (Llama: BOS)", larosa_jax.load_tokenizer(stories_ckpt))]
    if SMOL_DIR.is_dir():
        from transformers import AutoTokenizer

        out.append(("SmolLM2 (GPT-2 style: no BOS)", AutoTokenizer.from_pretrained(str(SMOL_DIR))))
    return out


@pytest.mark.parametrize("add_bos", [None, False, True])
def test_tokenization_matches_hflm(stories_model, stories_hf, stories_ckpt, add_bos):
    for what, t in _tokenizers(stories_ckpt):
        ours, ref = LarosaLM(stories_model, t, add_bos_token=add_bos), hflm(stories_hf, t, add_bos_token=add_bos)
        assert ours.prefix_token_id == ref.prefix_token_id and ours.eot_token_id == ref.eot_token_id, what
        for s in TOKENIZATION_STRINGS:
            assert ours.tok_encode(s) == ref.tok_encode(s), (what, s)
        for c, x in PAIRS:
            assert ours._encode_pair(c, x) == ref._encode_pair(c, x), (what, c, x)
        if what.startswith("stories"):
            bos = t.bos_token_id
            first = ours.tok_encode("Once upon a time")[0]
            # the Llama tokenizer adds BOS by default (lm-eval 0.4.13 HFLM keeps that); False removes it
            assert (first == bos) == (add_bos is not False), (add_bos, first)
            assert ours.tok_encode("<s>Once")[:2] != [bos, bos]  # a BOS in the text is not doubled


@pytest.mark.parametrize("add_bos", [None, True])
def test_batched_encoding_matches_hflm(stories_model, stories_hf, stories_ckpt, add_bos):
    """loglikelihood encodes every string in one batched call up front: the token pairs it scores are HFLM's, and
    no string is left to encode one at a time."""
    reqs = ll_requests(PAIRS + [("", "Once upon a time"), ("Lily and Ben  ", "went to the park.")])
    for what, t in _tokenizers(stories_ckpt):
        ours, ref = LarosaLM(stories_model, t, add_bos_token=add_bos), hflm(stories_hf, t, add_bos_token=add_bos)
        seen = []
        with mock.patch.object(type(ours), "_loglikelihood_tokens", lambda self, r, **k: seen.extend(r) or [(0.0, True)] * len(r)), \
                mock.patch.object(t, "encode", wraps=t.encode) as encode:
            ours.loglikelihood(reqs, disable_tqdm=True)
        want = ref.loglikelihood.__func__  # HFLM's pairs: its own loglikelihood's tokenization
        with mock.patch.object(type(ref), "_loglikelihood_tokens", lambda self, r, **k: r):
            pairs = want(ref, reqs, disable_tqdm=True)
        assert [(c, x) for _, c, x in seen] == [(c, x) for _, c, x in pairs], what
        assert encode.call_count == 1, (what, encode.call_args_list)  # only the empty context's continuation
        assert ours._encoded == {}, "the batch's encodings are dropped after the call"


# ----------------------------------------------------------------------------- loglikelihood
@pytest.mark.parametrize("max_length", [None, 24])  # 24: most requests are cut from the left
def test_loglikelihood_matches_hflm(stories_model, stories_hf, tok, tiny_requests, max_length):
    greedy = larosa_jax.generate(stories_model, [tok("Once upon a time")["input_ids"]], max_new_tokens=12)[0]
    greedy_text = tok.decode(greedy, skip_special_tokens=True)
    extra = ll_requests([("Once upon a time", greedy_text), ("Once upon a time", " there was a big red cat"),
                         ("", "Once upon a time"), ("Lily and Ben  ", "went to the park.")])
    reqs = tiny_requests + extra
    ours = LarosaLM(stories_model, tok, batch_size=4, max_length=max_length, progress=False).loglikelihood(reqs)
    ref = hflm(stories_hf, tok, max_length=max_length).loglikelihood(reqs, disable_tqdm=True)
    lp, lp_ref = np.array([a for a, _ in ours]), np.array([a for a, _ in ref])
    assert np.all(lp < 0) and np.ptp(lp) > 1.0
    err = np.abs(lp - lp_ref)
    assert err.max() < 1e-3, f"max |Δ log-likelihood| {err.max():.2e} at request {int(err.argmax())}"
    assert [g for _, g in ours] == [g for _, g in ref]
    assert ours[len(tiny_requests)][1], "the model's own greedy continuation must be flagged greedy"


def test_simple_evaluate_matches_hflm(stories_model, stories_hf, tok, tiny_dir):
    import lm_eval.utils

    original = lm_eval.utils.apply_template
    res = run_zeroshot(stories_model, tok, [TINY_TASK], include_path=tiny_dir, batch_size=8)
    assert lm_eval.utils.apply_template is original  # the compiled-template cache lasts one run
    ref = simple_evaluate(model=hflm(stories_hf, tok), tasks=[TINY_TASK], log_samples=False,
                          task_manager=TaskManager(include_path=str(tiny_dir), include_defaults=False))
    r, rr = res["results"][TINY_TASK], ref["results"][TINY_TASK]
    assert res["n-samples"][TINY_TASK]["effective"] == 8
    for key in ("acc,none", "acc_norm,none"):
        assert r[key] == rr[key], (key, r[key], rr[key])


def test_sparse_model_scores_like_unpadded_forward(stories_model, tok, tiny_requests):
    """Batching, right padding and buckets must not change a sparse model's scores (Top-K per token).
    Reference: requests of one total length stacked without padding (two lengths: two compiles)."""
    sparse = sparsify(stories_model, None, SparseConfig("topk", "faithful", 0.5, "uniform"))
    lm = LarosaLM(sparse, tok, batch_size=4, progress=False)
    by_len: dict[int, list] = {}
    for req in tiny_requests:
        ctx, cont = lm._encode_pair(*req.args)
        by_len.setdefault(len(ctx) + len(cont), []).append((req, ctx, cont))
    groups = sorted(by_len.values(), key=len)[-2:]
    assert sum(map(len, groups)) >= 5
    reqs, want = [], []
    for g in groups:
        seqs = np.array([ctx + cont for _, ctx, cont in g], np.int32)
        logits = forward(sparse, seqs[:, :-1]).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        for row, (req, ctx, cont) in zip(logp, g):
            reqs.append(req)
            want.append(sum(row[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    got = np.array([a for a, _ in lm.loglikelihood(reqs, disable_tqdm=True)])
    np.testing.assert_allclose(got, want, atol=1e-3)
    dense = np.array([a for a, _ in LarosaLM(stories_model, tok, batch_size=4, progress=False).loglikelihood(reqs, disable_tqdm=True)])
    assert np.abs(dense - got).max() > 1e-2, "Top-K at p = 0.5 should change the scores"


def test_loglikelihood_rolling_matches_hflm(stories_model, stories_hf, tok):
    texts = [STORY[:900], STORY[1000:1150], "<s>" + STORY[2000:2100], "Hi"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = LarosaLM(stories_model, tok, batch_size=4, max_length=64, progress=False)
    got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    ref = hflm(stories_hf, tok, max_length=64).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(tok.encode(texts[0])) > 3 * 64  # several windows
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    assert ours.stats["requests"] > len(texts)


def test_generate_until_matches_hflm(stories_model, stories_hf, tok):
    greedy = {"until": [".", "\n"], "max_gen_toks": 40, "do_sample": False}
    prompts = ["Once upon a time", "Lily and Ben went to the park. They saw a big", "The little dog was sad because",
               "One day, a girl named Sue found a shiny red ball under the old tree in her garden. She"]
    reqs = [Instance("generate_until", {}, (p, greedy), i) for i, p in enumerate(prompts)]
    reqs.append(Instance("generate_until", {}, ("Tom had a red ball", {"until": ["never"], "max_gen_toks": 24}), 9))
    got = LarosaLM(stories_model, tok, batch_size=3, progress=False).generate_until(reqs, disable_tqdm=True)
    ref = hflm(stories_hf, tok).generate_until(reqs, disable_tqdm=True)
    assert got == ref
    assert all(got[:4]) and not any("." in g or "\n" in g for g in got[:4])
    assert "." in got[4] and len(tok.encode(got[4], add_special_tokens=False)) > 16  # ran to max_gen_toks


# ----------------------------------------------------------------------------- tasks and errors
def test_unknown_task_names(stories_model, tok, tiny_dir):
    with pytest.raises(ZeroShotError, match=f"unknown task 'nope'; available: {TINY_TASK}"):
        run_zeroshot(stories_model, tok, ["nope"], include_path=tiny_dir)
    with pytest.raises(ZeroShotError, match="available: arc_easy, arc_challenge, piqa, boolq, hellaswag, openbookqa, winogrande"):
        zeroshot.task_name("mmlu")
    assert zeroshot.task_name("piqa") == zeroshot.task_name("piqa_local") == "piqa_local"


def test_local_tasks_yaml(tmp_path):
    data = tmp_path / "data"
    for name, (_, split) in TASKS.items():
        (data / name).mkdir(parents=True)
        (data / name / f"{split}.jsonl").write_text("{}\n")
    inc = local_tasks(data, tmp_path / "yamls")
    tm = TaskManager(include_path=inc, include_defaults=False)
    assert {f"{t}_local" for t in TASKS} <= set(tm.all_subtasks)
    boolq = yaml.safe_load((Path(inc) / "boolq_local.yaml").read_text())
    assert boolq["include"].endswith("super_glue/boolq/default.yaml") and Path(boolq["include"]).is_file()
    assert boolq["dataset_kwargs"]["data_files"] == {"validation": str((data / "boolq" / "validation.jsonl").resolve())}
    assert boolq["validation_split"] == "validation" and boolq["test_split"] is None and "group" not in boolq
    (data / "piqa" / "validation.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="piqa"):
        local_tasks(data, tmp_path / "again")


def test_local_tasks_real_splits(stories_model, tok, tmp_path):
    """The shared offline splits load through the harness (first 2 examples of 3 tasks)."""
    data = zeroshot.default_data_dir()
    if not data.is_dir():
        pytest.skip(f"shared data folder {data} is absent")
    names = ["arc_challenge", "winogrande", "boolq"]
    res = run_zeroshot(stories_model, tok, [f"{n}_local" for n in names], limit=2,
                       include_path=local_tasks(data, tmp_path, tasks=names), batch_size=8)
    for n in names:
        assert 0.0 <= res["results"][f"{n}_local"]["acc,none"] <= 1.0
        assert res["n-samples"][f"{n}_local"] == {"original": {"arc_challenge": 1172, "winogrande": 1267, "boolq": 3270}[n],
                                                  "effective": 2}


def _tiny_as_arc_easy(tmp_path):
    """The tiny task as arc_easy's split under ``tmp_path/data`` (the CLI's --data-dir)."""
    data = tmp_path / "data" / "arc_easy"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text((TINY / "test.jsonl").read_text())


def test_cli(stories_ckpt, tmp_path, capsys):
    _tiny_as_arc_easy(tmp_path)
    out = tmp_path / "res" / "zs"
    argv = ["zeroshot", "--ckpt", str(stories_ckpt), "--tasks", "arc_easy", "--data-dir", str(tmp_path / "data"),
            "--method", "dense,topk", "--sparsity", "0.3,0.6", "--alpha", "uniform", "--limit", "4", "--batch", "8",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "arc_easy_local" in printed and "|Tasks" in printed.replace(" ", "")
    res = json.loads(out.with_suffix(".json").read_text())
    assert [(r["label"], r["sparsity"]) for r in res["rows"]] == [("dense", 0.0), ("topk (uniform)", 0.3), ("topk (uniform)", 0.6)]
    assert res["meta"]["limit"] == 4 and res["meta"]["tasks"] == ["arc_easy_local"]
    assert all(r["results"]["arc_easy_local"]["acc,none"] is not None and r["stats"]["requests"] == 16 for r in res["rows"])
    assert res["rows"][2]["effective"] > res["rows"][1]["effective"] > 0
    md = out.with_suffix(".md").read_text()
    assert "limit 4 examples per task" in md and "| topk (uniform) | 0.60 |" in md and "jax" in md
    assert main(argv) == 2  # results exist
    assert "results exist" in capsys.readouterr().err
    assert main(argv[:3] + ["--tasks", "arc_easy,mmlu", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'mmlu'; available: arc_easy" in capsys.readouterr().err


def test_cli_rotated_thresholds(stories_ckpt, tmp_path, capsys):
    """--select threshold scores La RoSA's fused model with thresholds on the rotated rows (one global Q), and
    its effective sparsity follows p; Top-K methods or the simulation are refused before any work."""
    rot = tmp_path / "rot"
    text = tmp_path / "calib.txt"
    text.write_text(STORY)
    assert main(["calibrate", "--ckpt", str(stories_ckpt), "--data-file", str(text), "--samples", "2", "--seqlen", "128",
                 "--flavour", "global", "--out", str(rot)]) == 0
    _tiny_as_arc_easy(tmp_path)
    out = tmp_path / "res" / "zs"
    base = ["zeroshot", "--ckpt", str(stories_ckpt), "--rotations", str(rot), "--tasks", "arc_easy", "--data-dir",
            str(tmp_path / "data"), "--limit", "4", "--batch", "8", "--out", str(out)]
    assert main(base + ["--method", "larosa", "--mode", "fused", "--select", "threshold", "--sparsity", "0.3,0.6"]) == 0
    capsys.readouterr()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["label"], r["select"]) for r in rows] == [("larosa fused thresholds (official, global Q)", "threshold")] * 2
    assert rows[1]["effective"] > rows[0]["effective"] > 0
    assert all(r["results"]["arc_easy_local"]["acc,none"] is not None for r in rows)
    assert main(base[:-1] + [str(tmp_path / "x"), "--method", "larosa", "--select", "threshold"]) == 2
    assert "--select threshold applies to --method larosa with --mode fused" in capsys.readouterr().err


def test_markdown_standard_errors():
    """Each accuracy carries the harness's standard error, the mean the tasks' combined; a task without one
    (the harness's "N/A") shows the value alone and leaves the mean's error out."""
    env = {"device": "cpu", "jax": "x", "date": "d"}
    res = {"a_local": {"acc,none": 0.5, "acc_stderr,none": 0.03}, "b_local": {"acc,none": 0.7, "acc_stderr,none": 0.04}}
    row = {"label": "dense", "sparsity": 0.0, "effective": 0.0, "results": res, "stats": {"requests": 10}, "seconds": 1.0}
    na = dict(row, label="teal", results={**res, "b_local": {"acc,none": 0.6, "acc_stderr,none": "N/A"}})
    meta = {"model": "m", "tasks": ["a_local", "b_local"], "lm_eval": "0", "data_dir": "d", "env": env}
    md = zeroshot.markdown({"meta": meta, "rows": [row, na]})
    assert "| dense | 0.00 | 0.000 | 50.00 ± 3.00 | 70.00 ± 4.00 | 60.00 ± 2.50 |" in md
    assert "| teal | 0.00 | 0.000 | 50.00 ± 3.00 | 60.00 | 55.00 |" in md
    assert "Device cpu, jax x, d." in md and "| dense | 0.00 | 10 | 1 | 10.0 | cpu, x, d |" in md
    # rows resumed on another machine: each row names its own, the header names both
    gpu = dict(na, env={"device": "gpu:H200", "jax": "y", "date": "e"})
    md = zeroshot.markdown({"meta": dict(meta, env=gpu["env"]), "rows": [dict(row, env=env), gpu]})
    assert "Devices cpu, gpu:H200 (each row's in the last table)" in md
    assert "| dense | 0.00 | 10 | 1 | 10.0 | cpu, x, d |" in md and "| teal | 0.00 | 10 | 1 | 10.0 | gpu:H200, y, e |" in md


def test_a_row_is_saved_before_the_harness_table_prints(stories_ckpt, tmp_path, monkeypatch):
    """The harness's table is display only: a failure in it (a GPU image once lacked pytz, which it needs) must
    not lose the row just scored."""
    import lm_eval.utils

    _tiny_as_arc_easy(tmp_path)
    out = tmp_path / "zs"

    def broken(*a, **k):
        raise ModuleNotFoundError("No module named 'pytz'")

    monkeypatch.setattr(lm_eval.utils, "make_table", broken)
    with pytest.raises(ModuleNotFoundError, match="pytz"):
        main(["zeroshot", "--ckpt", str(stories_ckpt), "--tasks", "arc_easy", "--data-dir", str(tmp_path / "data"),
              "--method", "dense", "--limit", "4", "--batch", "8", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense"] and rows[0]["stats"]["requests"] == 16
