"""Model configuration read from a Hugging Face ``config.json`` (transformers 4.x and 5.x spellings)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
    """A config.json that this library cannot serve, with the file and key at fault."""


# Upper bounds on untrusted sizes, checked before anything is allocated; generous next to the
# largest Llama / Qwen2 models (405B: 126 layers, hidden 16384, intermediate 53248, 128 heads).
LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
    "max_position_embeddings": 1 << 24, "original_max_position_embeddings": 1 << 24,
}


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; unreadable text, bad JSON or another type is a one-line :class:`ConfigError`."""
    p = Path(path)
    try:
        raw = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); expected a {what}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e}); expected a {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a JSON object ({what}), found {type(raw).__name__}")
    return raw


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict (transformers 4.x spelling) that :meth:`from_hf` reads back equal."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.arch]
        r = self.rope
        scaling = None if r.type == "default" else {
            "rope_type": r.type, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor, "original_max_position_embeddings": r.original_max_position_embeddings,
        }
        out = {
            "architectures": [arch], "model_type": self.arch, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": r.theta, "rope_scaling": scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu", "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids), "pad_token_id": self.pad_token_id,
        }
        if self.arch == "llama":
            out["attention_bias"] = self.qkv_bias
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path, source: str = "config.json") -> "ModelConfig":
        """Parse an HF config dict or the path of a config.json / a directory holding one."""
        src = source
        if not isinstance(hf, dict):
            p = Path(hf)
            p = p / "config.json" if p.is_dir() else p
            src = str(p)
            if not p.exists():
                raise ConfigError(f"{src}: no such file (expected a Hugging Face config.json)")
            hf = read_json(p, "Hugging Face config.json")
        return _parse_hf(hf, src)


def _integer(src: str, key: str, v: Any, lo: int, hi: int | None = None) -> int:
    """An integer size in [lo, hi]: bools, fractions, strings and out-of-range values are errors."""
    ok = (isinstance(v, numbers.Integral) and not isinstance(v, bool)
          or isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v == int(v))
    if ok and lo <= int(v) and (hi is None or int(v) <= hi):
        return int(v)
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ConfigError(f"{src}: {key}={v!r}: expected an integer in {rng}")


def _positive(src: str, key: str, v: Any, hi: float | None = None) -> float:
    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
          and (hi is None or v < hi))
    if not ok:
        raise ConfigError(f"{src}: {key}={v!r}: expected a finite number > 0{f' and < {hi:g}' if hi else ''}")
    return float(v)


def _token_ids(src: str, key: str, v: Any, vocab: int) -> tuple[int, ...]:
    vals = v if isinstance(v, list) else [] if v is None else [v]
    for t in vals:
        _integer(src, key, t, 0, vocab - 1)
    return tuple(int(t) for t in vals)


def _parse_hf(hf: dict[str, Any], src: str) -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"{src}: expected a JSON object, found {type(hf).__name__}")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{src}: architectures={archs!r}: expected a list of class names")
    arch_name = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        hf.get("model_type", ""), hf.get("model_type", "<none>")
    )
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{src}: architecture {arch_name!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    arch = SUPPORTED_ARCHITECTURES[arch_name]

    def need(key: str) -> Any:
        if key not in hf:
            raise ConfigError(f"{src}: missing key {key!r} required for {arch_name}")
        return hf[key]

    def size(key: str, value: Any, lo: int = 1) -> int:
        return _integer(src, key, value, lo, LIMITS[key])

    d = size("hidden_size", need("hidden_size"))
    n_heads = size("num_attention_heads", need("num_attention_heads"))
    n_kv = n_heads if hf.get("num_key_value_heads") is None else size("num_key_value_heads", hf["num_key_value_heads"])
    if hf.get("head_dim") is not None:
        head_dim = size("head_dim", hf["head_dim"], 2)
    elif d % n_heads:
        raise ConfigError(f"{src}: hidden_size={d} is not a multiple of num_attention_heads={n_heads} (and no head_dim)")
    else:
        head_dim = d // n_heads
    if head_dim % 2:
        raise ConfigError(f"{src}: head_dim={head_dim} is odd; rotary embeddings need an even head_dim")
    if n_kv > n_heads or n_heads % n_kv:
        raise ConfigError(f"{src}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError(f"{src}: use_sliding_window=true is not supported (set it to false)")

    # transformers 5.x moves rope_theta and rope_scaling into rope_parameters.
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ConfigError(f"{src}: {key}={hf[key]!r}: expected an object")
    rp = dict(hf.get("rope_parameters") or {})
    rs = dict(hf.get("rope_scaling") or {})
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**rs, **{k: v for k, v in rp.items() if k != "rope_theta"}}
    rtype = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{src}: rope type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    rope = RopeConfig(
        theta=_positive(src, "rope_theta", theta),
        type=rtype,
        factor=_positive(src, "rope factor", scaling.get("factor", 1.0)),
        low_freq_factor=_positive(src, "low_freq_factor", scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=_positive(src, "high_freq_factor", scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=size("original_max_position_embeddings",
                                              scaling.get("original_max_position_embeddings", 8192)),
    )
    if rtype == "llama3" and not rope.low_freq_factor < rope.high_freq_factor:
        raise ConfigError(f"{src}: llama3 rope needs low_freq_factor < high_freq_factor "
                          f"(found {rope.low_freq_factor:g} and {rope.high_freq_factor:g})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{src}: hidden_act={act!r} is not supported (expected 'silu')")

    vocab = size("vocab_size", need("vocab_size"))
    eos_ids = _token_ids(src, "eos_token_id", hf.get("eos_token_id"), vocab)
    bos, pad = (hf.get(k) for k in ("bos_token_id", "pad_token_id"))
    for key, v in (("bos_token_id", bos), ("pad_token_id", pad)):
        if v is not None:
            _integer(src, key, v, 0, vocab - 1)
    attn_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=size("intermediate_size", need("intermediate_size")),
        num_layers=size("num_hidden_layers", need("num_hidden_layers")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_positive(src, "rms_norm_eps", hf.get("rms_norm_eps", 1e-6), 1.0),
        rope=rope,
        max_position_embeddings=size("max_position_embeddings", hf.get("max_position_embeddings", 2048), 2),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attn_bias,
        o_bias=False if arch == "qwen2" else attn_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        pad_token_id=None if pad is None else int(pad),
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies as in transformers' ROPE_INIT_FUNCTIONS (default, linear, llama3)."""
    import numpy as np

    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.type == "linear":
        inv = inv / rope.factor
    elif rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl = old / rope.low_freq_factor
        high_wl = old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
