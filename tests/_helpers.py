"""Shared helpers for the La RoSA core tests (test_sparsity, test_calibration, test_fusion, test_cli_core).

Everything expensive is memoised for the whole pytest process (``functools.lru_cache``): the
stories260K conversion, its token stream (loading the tokenizer imports transformers, ~7 s), the
calibrations (8 windows x 128 tokens per flavour) and the random HF models. Cached models and
stats are shared: tests must never mutate them (load a fresh copy to poison or perturb weights).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit
import dataclasses
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import larosa_jax
from larosa_jax import data
from larosa_jax.calibration import CalibrationStats, calibrate, fingerprint
from larosa_jax.models.transformer import dense_projection, site_row

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "larosa_jax" / "assets"
STORIES_DIR = ASSETS / "stories260K"
TEXT_FILE = ASSETS / "tinystories-valid-head.txt"

CAL_SAMPLES, CAL_SEQLEN, CAL_BATCH = 8, 128, 4  # the shared calibration: 8 x 128 tokens, 4 per step


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    """One temporary directory for the whole process, removed at exit."""
    d = Path(tempfile.mkdtemp(prefix="larosa-core-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


# ----------------------------------------------------------------------------- stories260K
@dataclasses.dataclass
class Stories:
    ckpt: Path
    model: object
    ids: np.ndarray  # the TinyStories head as one token stream

    @property
    def config(self):
        return self.model.config


@functools.lru_cache(maxsize=None)
def stories() -> Stories:
    ckpt = larosa_jax.convert(str(STORIES_DIR), workdir() / "stories260K", dtype="float32", progress=False)
    model = larosa_jax.load(ckpt)
    ids = data.tokenize(larosa_jax.load_tokenizer(ckpt), TEXT_FILE.read_text(encoding="utf-8"))
    return Stories(ckpt, model, ids)


@functools.lru_cache(maxsize=None)
def cal_windows() -> np.ndarray:
    return data.calibration_windows(stories().ids, CAL_SAMPLES, CAL_SEQLEN, seed=0, source=str(TEXT_FILE))


@functools.lru_cache(maxsize=None)
def held_windows(n: int = 2, seqlen: int = 128) -> np.ndarray:
    """Windows disjoint from the calibration ones (same seed, skipping them)."""
    return data.calibration_windows(stories().ids, n, seqlen, seed=0, skip=CAL_SAMPLES, source=str(TEXT_FILE))


@functools.lru_cache(maxsize=None)
def stories_stats(flavour: str) -> CalibrationStats:
    s = stories()
    return calibrate(s.model, cal_windows(), flavour=flavour, batch_size=CAL_BATCH, data_source=TEXT_FILE.name,
                     model_source=str(s.ckpt), progress=False)


@functools.lru_cache(maxsize=None)
def stories_stats_dir(flavour: str) -> Path:
    """The shared calibration saved as ``<dir>/rotations.safetensors``."""
    out = workdir() / f"rotations-{flavour}"
    stories_stats(flavour).save(out)
    return out


# ----------------------------------------------------------------------------- random HF models
def make_hf_model(kind: str, seed: int = 0):
    """Random HF Llama / Qwen2 (hidden 96, intermediate 200, 6 heads, 2 kv heads, 2 layers, vocab 300).
    Weights N(0, 0.1²), norm gains U(0.5, 1.5) (so γ matters), biases N(0, 0.5²)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False))
    else:
        raise ValueError(kind)
    from conftest import randomize_  # the parity tests' weight distribution

    return randomize_(model.to(torch.float32).eval(), seed)


@functools.lru_cache(maxsize=None)
def random_ckpt(kind: str) -> Path:
    hf_dir = workdir() / f"{kind}-hf"
    make_hf_model(kind).save_pretrained(hf_dir)
    return larosa_jax.convert(str(hf_dir), workdir() / f"{kind}-larosa", dtype="float32", progress=False)


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def random_rotations(n_layers: int, d: int, seed: int = 0) -> np.ndarray:
    """Haar-ish random orthogonal matrices [L, d, d] in float64."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_layers):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        out.append(q * np.sign(np.diag(r)))
    return np.stack(out)


def stats_for(model, rotations: np.ndarray, flavour: str = "fused") -> CalibrationStats:
    """Stats carrying the given rotations, stamped with ``model``'s fingerprint (no quantiles)."""
    rotations = np.asarray(rotations)
    return CalibrationStats(rotations, np.ones(rotations.shape[:2], np.float32), {},
                            {"model_fingerprint": fingerprint(model), "flavour": flavour, "model_source": "test"})


# ----------------------------------------------------------------------------- running models
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return logits


def logits(model, tokens) -> np.ndarray:
    """Whole-sequence logits of a dense Transformer or a SparseModel (jitted)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(np.asarray(tokens), jnp.int32)))


@functools.partial(jax.jit, static_argnums=0)
def _capture(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    rec = {}

    def hook(site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        out, keep = dense_projection(site, layer, x, linears, plan, gain=gain, prologue=prologue, raw=raw)
        rec[f"{site}.{layer}"] = keep.x  # what the linears see
        if gain is not None:
            rec[f"{site}.{layer}.norm"] = site_row(x, None, prologue)[0]  # γ-free norm(h)
        if site == "gate_up":
            rec[f"cats.{layer}"] = jax.nn.silu(out[0][..., : linears[0].kernel.shape[1]].astype(jnp.float32))
        return out, keep

    model(tokens, proj=hook)
    return rec


def capture(model, tokens) -> dict[str, np.ndarray]:
    """Dense forward recording every projection input: ``{site}.{layer}`` (x·γ at qkv/gate_up, the
    plain input at o/down), ``{site}.{layer}.norm`` (norm(h), γ-free) and ``cats.{layer}`` (SiLU(gate))."""
    graphdef, state = nnx.split(model)
    rec = _capture(graphdef, state, jnp.asarray(np.asarray(tokens), jnp.int32))
    return {k: np.asarray(v) for k, v in rec.items()}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all(), "non-finite values"
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_python(code: str, *args: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter (for float64: jax_enable_x64 is process-global); returns stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(REPO))
    assert proc.returncode == 0, f"subprocess failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def on_four_devices(script: str) -> dict:
    """Run ``script`` in a fresh Python with 4 simulated CPU devices (the device count is fixed when jax
    starts); the dict it prints after RESULT."""
    import json

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
