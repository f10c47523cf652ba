"""Shared fixtures: random-weight HF models, the bundled stories260K and SmolLM2-135M (GGUF).

Everything expensive (HF models, conversions, loaded JAX models) is session-scoped and shared
by the test modules; tests that damage a checkpoint work on their own copy in ``tmp_path``.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import json
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import larosa_jax

REPO = Path(__file__).resolve().parents[1]
STORIES_DIR = REPO / "larosa_jax" / "assets" / "stories260K"
SMOL_DIR = REPO.parent / "shared" / "data" / "models" / "SmolLM2-135M-Instruct-Q4_1-gguf"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.manual_seed(0)
# One torch thread: the references are small, and on a 2-core machine torch's OpenMP workers
# spinning against XLA's thread pool made HF generate up to 10x slower.
torch.set_num_threads(1)

# ----------------------------------------------------------------------------- random HF models
# Non-power-of-two sizes everywhere; 2 layers; head_dim 16.
_COMMON = dict(
    vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
    max_position_embeddings=256, rms_norm_eps=1e-5,
)
RANDOM_SPECS: dict[str, tuple[str, dict]] = {
    # Llama-2 style: multi-head attention (kv heads == heads), default RoPE, untied head.
    "llama2_mha": ("llama", dict(_COMMON, num_key_value_heads=6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Llama-3 style: GQA 6/2 and llama3 RoPE scaling with a small original context, so that
    # positions >= 64 (used by the tests) are in the scaled regime.
    "llama3_gqa": ("llama", dict(
        _COMMON, num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    )),
    # Qwen2: q/k/v biases, tied embeddings, GQA 6/3.
    "qwen2_tied": ("qwen2", dict(
        _COMMON, num_key_value_heads=3, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    # Llama with every optional bias (attention_bias covers q/k/v/o, mlp_bias) and linear RoPE.
    "llama_bias_linear": ("llama", dict(
        _COMMON, num_key_value_heads=3, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )),
}


def make_hf_model(kind: str, seed: int = 0):
    """A random HF model of ``kind`` with weights large enough that the parity tests have teeth:
    matrices N(0, 0.1²), norm gains U(0.5, 1.5), biases N(0, 0.5²)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, kw = RANDOM_SPECS[kind]
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(**kw)
    return randomize_(model_cls(cfg).to(torch.float32).eval(), seed)


def randomize_(model, seed: int = 0):
    """Re-draw an HF model's weights in place: matrices N(0, 0.1²), norm gains U(0.5, 1.5), biases N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, cache, start):
    return nnx.merge(graphdef, state)(tokens, cache, start=start)


def apply(model, tokens, cache=None, start=None):
    """``model(tokens, cache, start=start)`` jitted (one compile per model and shape); the
    graph split is cached per model, so a decode loop costs about a millisecond a step."""
    if model not in _SPLITS:
        _SPLITS[model] = nnx.split(model)
    graphdef, state = _SPLITS[model]
    tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
    if cache is None and start is None:  # same as no start; one compile per shape either way
        start = np.zeros(tokens.shape[0])
    start = None if start is None else jnp.asarray(start, jnp.int32)
    return _apply(graphdef, state, tokens, cache, start)


def forward(model, tokens, start=None) -> np.ndarray:
    """Float32 logits ``[B, T, V]`` of a whole-sequence forward (no cache)."""
    logits, cache = apply(model, tokens, start=start)
    assert cache is None and logits.dtype == jnp.float32
    return np.asarray(logits)


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def assert_logits_close(ours, ref, rel: float = 1e-4, what: str = "logits") -> float:
    """max|ours - ref| <= rel * max|ref|; returns the relative error."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= rel * scale, f"{what}: max|Δ| = {err:.3g} > {rel:g} · max|ref| = {rel * scale:.3g}"
    return err / scale


class RandomModel:
    """One random HF model saved with ``save_pretrained`` and converted to float32."""

    def __init__(self, kind: str, root: Path):
        self.kind = kind
        self.hf = make_hf_model(kind)
        self.hf_dir = root / f"{kind}-hf"
        self.hf.save_pretrained(self.hf_dir)
        self.ckpt = larosa_jax.convert(str(self.hf_dir), root / f"{kind}-larosa", dtype="float32", progress=False)
        self.model = larosa_jax.load(self.ckpt)

    @property
    def hf_config(self) -> dict:
        return json.loads((self.hf_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    """``random_model(kind)`` → a cached :class:`RandomModel` (built on first use)."""
    cache: dict[str, RandomModel] = {}
    root = tmp_path_factory.mktemp("random-models")

    def get(kind: str) -> RandomModel:
        if kind not in cache:
            cache[kind] = RandomModel(kind, root)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def random_tokens():
    """``random_tokens(batch, length, seed)`` → int32 ids below the random models' vocab."""

    def make(batch: int, length: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, _COMMON["vocab_size"], (batch, length)).astype(np.int32)

    return make


# ----------------------------------------------------------------------------- stories260K
STORIES_PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park. They saw a big",
    "The little dog was sad because",
    "One day, a girl named Sue found a shiny red ball under the old tree in her garden. She",
]


@pytest.fixture(scope="session")
def stories_ckpt(tmp_path_factory) -> Path:
    return larosa_jax.convert(str(STORIES_DIR), tmp_path_factory.mktemp("stories") / "f32", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def stories_model(stories_ckpt):
    return larosa_jax.load(stories_ckpt)


@pytest.fixture(scope="session")
def stories_tokenizer(stories_ckpt):
    return larosa_jax.load_tokenizer(stories_ckpt)


@pytest.fixture(scope="session")
def stories_prompts(stories_tokenizer) -> list[list[int]]:
    return [stories_tokenizer(p)["input_ids"] for p in STORIES_PROMPTS]


@pytest.fixture(scope="session")
def stories_greedy(stories_model, stories_prompts) -> list[list[int]]:
    """64 greedy tokens for each prompt alone (shared by the HF-parity and batching tests)."""
    return [larosa_jax.generate(stories_model, [p], max_new_tokens=64)[0] for p in stories_prompts]


@pytest.fixture(scope="session")
def stories_hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(STORIES_DIR), dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- SmolLM2-135M (GGUF)
def _need_smol():
    if not SMOL_DIR.is_dir():
        pytest.skip(f"shared data folder {SMOL_DIR} is absent (SmolLM2-135M GGUF checks need it)")
    if not (SMOL_DIR / SMOL_GGUF).is_file():
        pytest.fail(f"{SMOL_DIR} exists but holds no {SMOL_GGUF}")


@pytest.fixture(scope="session")
def smol_ckpt(tmp_path_factory) -> Path:
    _need_smol()
    return larosa_jax.convert(str(SMOL_DIR), tmp_path_factory.mktemp("smol") / "f32", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smol_model(smol_ckpt):
    return larosa_jax.load(smol_ckpt)


@pytest.fixture(scope="session")
def smol_hf():
    _need_smol()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
