"""Logits and greedy-generation parity with transformers (torch CPU, float32).

Random-weight Llama-2 (MHA), Llama-3 (GQA + llama3 RoPE scaling), Qwen2 (biases, tied
embeddings); the real stories260K; SmolLM2-135M from its GGUF against transformers' own GGUF loader.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import larosa_jax
from larosa_jax.config import ModelConfig, RopeConfig, rope_inv_freq

from conftest import SMOL_DIR, assert_logits_close, hf_logits
from conftest import forward as ours_logits


# ----------------------------------------------------------------------------- random models
@pytest.mark.parametrize("kind", ["llama2_mha", "llama3_gqa", "qwen2_tied", "llama_bias_linear"])
def test_random_model_logits_match_transformers(kind, random_model, random_tokens):
    rm = random_model(kind)
    cfg = rm.model.config
    # the converted model really has the features this case is about
    expect = {
        "llama2_mha": dict(arch="llama", num_kv_heads=6, qkv_bias=False, tie_word_embeddings=False),
        "llama3_gqa": dict(arch="llama", num_kv_heads=2, qkv_bias=False, tie_word_embeddings=False),
        "qwen2_tied": dict(arch="qwen2", num_kv_heads=3, qkv_bias=True, o_bias=False, tie_word_embeddings=True),
        "llama_bias_linear": dict(arch="llama", num_kv_heads=3, qkv_bias=True, o_bias=True, mlp_bias=True),
    }[kind]
    for k, v in expect.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_layers) == (96, 200, 6, 2)
    assert (rm.model.lm_head is None) == cfg.tie_word_embeddings

    tokens = random_tokens(2, 96, seed=1)  # 96 > original_max_position_embeddings (64) of llama3_gqa
    ref = hf_logits(rm.hf, tokens)
    assert np.abs(ref).max() > 1.0  # the random weights are large enough to matter
    assert_logits_close(ours_logits(rm.model, tokens), ref, what=kind)


def test_llama3_rope_scaling_matters(random_model, random_tokens):
    """The llama3 case would fail if the scaling were ignored: unscaled RoPE is far off."""
    rm = random_model("llama3_gqa")
    cfg = rm.model.config
    assert cfg.rope.type == "llama3" and cfg.rope.original_max_position_embeddings == 64
    inv_scaled = rope_inv_freq(cfg.rope, cfg.head_dim)
    inv_plain = rope_inv_freq(dataclasses.replace(cfg.rope, type="default"), cfg.head_dim)
    # all three llama3 regimes occur at head_dim 16 / original context 64: kept, smoothed, divided
    ratio = inv_plain / inv_scaled
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, cfg.rope.factor).any()
    assert ((ratio > 1.01) & (ratio < cfg.rope.factor - 0.01)).any()
    # HF's own inverse frequencies agree
    hf_inv = rm.hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(inv_scaled, hf_inv, rtol=1e-6)

    tokens = random_tokens(1, 96, seed=2)
    ref = hf_logits(rm.hf, tokens)
    plain = larosa_jax.load(rm.ckpt)
    plain.config = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, type="default"))
    err = np.abs(ours_logits(plain, tokens) - ref).max()
    assert err > 100 * 1e-4 * np.abs(ref).max()


def _to_v4_spelling(hf_cfg: dict) -> dict:
    """transformers 4.x layout: rope_theta at the top level, scaling in rope_scaling (or null)."""
    d = dict(hf_cfg)
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    return d


@pytest.mark.parametrize("kind", ["llama3_gqa", "qwen2_tied", "llama_bias_linear"])
def test_config_v4_and_v5_spellings_agree(kind, random_model):
    v5 = random_model(kind).hf_config
    assert "rope_parameters" in v5 and "rope_theta" not in v5
    v4 = _to_v4_spelling(v5)
    a, b = ModelConfig.from_hf(v5), ModelConfig.from_hf(v4)
    assert a == b
    # ... and both are right, not merely equal
    rp = v5["rope_parameters"]
    assert a.rope.theta == rp["rope_theta"]
    assert a.rope.type == rp["rope_type"]
    if kind == "llama3_gqa":
        assert a.rope == RopeConfig(theta=10000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=64)
    if kind == "llama_bias_linear":
        assert (a.rope.type, a.rope.factor) == ("linear", 2.0)
    # the older 4.x "type" key (instead of "rope_type") is read too
    if v4["rope_scaling"]:
        v4_old = dict(v4, rope_scaling={("type" if k == "rope_type" else k): v for k, v in v4["rope_scaling"].items()})
        assert ModelConfig.from_hf(v4_old) == a


def test_v4_spelled_checkpoint_converts_to_same_logits(random_model, random_tokens, tmp_path):
    """A checkpoint directory whose config.json uses the 4.x spelling converts to the same model."""
    rm = random_model("llama3_gqa")
    src = tmp_path / "hf-v4"
    rm.hf.save_pretrained(src)
    (src / "config.json").write_text(json.dumps(_to_v4_spelling(rm.hf_config), indent=2))
    model = larosa_jax.load(larosa_jax.convert(str(src), tmp_path / "out", dtype="float32", progress=False))
    assert model.config == rm.model.config
    tokens = random_tokens(1, 80, seed=3)
    assert_logits_close(ours_logits(model, tokens), hf_logits(rm.hf, tokens))


# ----------------------------------------------------------------------------- stories260K
def test_stories_logits_match_transformers(stories_model, stories_hf, stories_tokenizer):
    sentences = [
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
        "Tom had a big red ball. He liked to kick it to his friend Sam, but one day the ball went over the fence.",
        "The sun was hot, so the cat slept under the tree all day long.",
    ]
    ids = [stories_tokenizer(s)["input_ids"] for s in sentences]
    assert all(i[0] == 1 and len(i) > 15 for i in ids)  # BOS prepended, real text
    assert len({len(i) for i in ids}) > 1
    # one batch, right-padded to a common length: causal attention keeps the real positions exact
    n = max(len(i) for i in ids)
    batch = np.array([i + [0] * (n - len(i)) for i in ids], np.int32)
    ours = ours_logits(stories_model, batch)
    for row, (s, i) in enumerate(zip(sentences, ids)):
        assert_logits_close(ours[row, : len(i)], hf_logits(stories_hf, [i])[0], what=repr(s[:20]))


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=hf.config.eos_token_id,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids):].tolist()


def test_stories_greedy_matches_transformers(stories_hf, stories_prompts, stories_greedy):
    assert len(stories_prompts) >= 3
    for p, ours in zip(stories_prompts, stories_greedy):
        ref = hf_greedy(stories_hf, p, 64)
        assert ours == ref, f"prompt {p}: ours {ours} != HF {ref}"
    assert sum(len(r) for r in stories_greedy) > 3 * 32  # real generations, not immediate EOS


def test_stories_bos_only_reproduces_llama2c_reference(stories_model, stories_tokenizer):
    """Greedy from BOS gives Karpathy's llama2.c test_all.py expected text (see SOURCE.md)."""
    out = larosa_jax.generate(stories_model, [[1]], max_new_tokens=40)[0]
    text = stories_tokenizer.decode(out)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park."), text


# ----------------------------------------------------------------------------- SmolLM2-135M (GGUF Q4_1)
SMOL_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and"
# both prompts fall in the same 8-token bucket, so the second reuses the compiled generate
SMOL_PROMPTS = [SMOL_TEXT, "def fibonacci(n):\n    # return the n-th number"]


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smol_model, smol_hf, smol_ckpt):
    cfg = smol_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope.theta == 100000.0
    tok = larosa_jax.load_tokenizer(smol_ckpt)
    assert (smol_ckpt / "tokenizer.json").is_file() and (SMOL_DIR / "tokenizer.json").is_file()
    ids = tok(SMOL_TEXT)["input_ids"]
    assert len(ids) > 10
    ours = ours_logits(smol_model, [ids])
    ref = hf_logits(smol_hf, [ids])
    assert_logits_close(ours, ref, what="SmolLM2")
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_gguf_greedy_matches_transformers(smol_model, smol_hf, smol_ckpt):
    tok = larosa_jax.load_tokenizer(smol_ckpt)
    for text in SMOL_PROMPTS:
        ids = tok(text)["input_ids"]
        ref = hf_greedy(smol_hf, ids, 64)
        ours = larosa_jax.generate(smol_model, [ids], max_new_tokens=64)[0]
        assert ours == ref, f"{text!r}:\nours {tok.decode(ours)!r}\nHF   {tok.decode(ref)!r}"
        assert len(ref) >= 16
        assert 8 < len(ids) <= 16
