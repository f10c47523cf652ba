"""Checkpoints: HF → larosa name map, conversion (safetensors, sharded, GGUF, hub ids), loading.

A converted checkpoint directory holds ``config.json`` (the HF config plus a ``larosa`` block),
``model.safetensors`` with input-major kernels named after the NNX state paths
(``layers.3.attn.q.kernel``), and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .config import ConfigError, ModelConfig
from .models import Transformer
from .safetensors_io import CheckpointError, SafeTensorsFile, write_safetensors

FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

_HF_LAYER = {
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
}


class ConversionError(ValueError):
    """Conversion refused, with the path, file or tensor at fault."""


# ----------------------------------------------------------------------------- names and shapes
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a larosa checkpoint (our names, input-major), in file order."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {"embed.embedding": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm.scale"] = (d,)
        for name, (din, dout), bias in (
            ("attn.q", (d, cfg.q_dim), cfg.qkv_bias), ("attn.k", (d, cfg.kv_dim), cfg.qkv_bias),
            ("attn.v", (d, cfg.kv_dim), cfg.qkv_bias), ("attn.o", (cfg.q_dim, d), cfg.o_bias),
        ):
            out[p + name + ".kernel"] = (din, dout)
            if bias:
                out[p + name + ".bias"] = (dout,)
        out[p + "mlp_norm.scale"] = (d,)
        for name, (din, dout) in (("mlp.gate", (d, f)), ("mlp.up", (d, f)), ("mlp.down", (f, d))):
            out[p + name + ".kernel"] = (din, dout)
            if cfg.mlp_bias:
                out[p + name + ".bias"] = (dout,)
    out["norm.scale"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.kernel"] = (d, cfg.vocab_size)
    return out


def hf_name(ours: str) -> tuple[str, bool]:
    """Our tensor name → (HF transformers name, whether the HF tensor is [out, in] and needs a transpose)."""
    if ours == "embed.embedding":
        return "model.embed_tokens.weight", False
    if ours == "norm.scale":
        return "model.norm.weight", False
    if ours == "lm_head.kernel":
        return "lm_head.weight", True
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(kernel|bias|scale)", ours)
    if not m:
        raise KeyError(ours)
    i, mod, kind = m.groups()
    if kind == "scale":
        return f"model.layers.{i}." + ("input_layernorm" if mod == "attn_norm" else "post_attention_layernorm") + ".weight", False
    hf_mod = {v: k for k, v in _HF_LAYER.items()}[mod]
    return f"model.layers.{i}.{hf_mod}." + ("weight" if kind == "kernel" else "bias"), kind == "kernel"


# ----------------------------------------------------------------------------- sources
class TensorSource:
    """HF-named tensors of one checkpoint: ``shapes`` (HF layout) and ``get(name)`` → numpy."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray], where: Callable[[str], str]):
        self.shapes, self.get, self.where = shapes, get, where


def _safetensors_source(root: Path) -> TensorSource:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for fname in sorted(set(weight_map.values())):
            if not (root / fname).is_file():
                raise CheckpointError(f"{root / fname}: shard named in {index.name} is missing")
            files[fname] = SafeTensorsFile(root / fname)
        for name, fname in weight_map.items():
            if name not in files[fname]:
                raise CheckpointError(f"{root / fname}: tensor {name!r} named in {index.name} is not in the shard")
        owner = {n: files[fn] for n, fn in weight_map.items()}
    else:
        single = root / "model.safetensors"
        if not single.exists():
            found = sorted(p.name for p in root.iterdir())
            raise CheckpointError(
                f"{root}: no model.safetensors or model.safetensors.index.json (found: {', '.join(found) or 'nothing'})"
            )
        st = SafeTensorsFile(single)
        owner = {n: st for n in st.keys()}
    return TensorSource(
        {n: f.shape(n) for n, f in owner.items()}, lambda n: owner[n][n], lambda n: str(owner[n].path)
    )


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _gguf_source(path: Path) -> tuple[TensorSource, dict]:
    """GGUF tensors dequantized to float32, renamed to HF, Q/K rows un-permuted (llama.cpp permutes
    them for its interleaved RoPE; see SmolLM2's SOURCE.md)."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:  # pragma: no cover
        raise ConversionError("reading .gguf needs the 'gguf' package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare errors on truncated files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = _gguf_metadata(reader)
    tensors = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m:
            i, part, kind = m.groups()
            if part not in _GGUF_LAYER:
                continue
            name = f"model.layers.{i}.{_GGUF_LAYER[part]}.{kind}"
        elif t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            continue
        tensors[name] = t
    n_head, n_kv = meta.get("llama.attention.head_count"), meta.get("llama.attention.head_count_kv")

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))
        heads = n_head if ".q_proj." in name else n_kv if ".k_proj." in name else None
        if heads and w.ndim == 2:
            rows, cols = w.shape
            w = w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        return w

    shapes = {n: tuple(int(x) for x in reversed(t.shape)) for n, t in tensors.items()}
    return TensorSource(shapes, get, lambda n: str(path)), meta


def _gguf_metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith(("llama.", "general.architecture")):
            continue
        try:
            v = field.contents()
        except Exception:  # older gguf: no contents()
            v = field.parts[field.data[0]].tolist() if field.data else None
            v = v[0] if isinstance(v, list) and len(v) == 1 else v
        out[key] = v
    return out


def _config_from_gguf(meta: dict, shapes: dict, path: Path) -> dict:
    """An HF-style Llama config from GGUF metadata, for a bare .gguf with no config.json beside it."""
    if meta.get("general.architecture") != "llama":
        raise ConfigError(f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not supported (expected 'llama')")
    g = lambda k: meta[f"llama.{k}"]  # noqa: E731
    vocab, d = shapes["model.embed_tokens.weight"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
        "num_attention_heads": g("attention.head_count"), "num_key_value_heads": g("attention.head_count_kv"),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": g("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
    }


def resolve_source(model: str) -> Path:
    """A local directory / .gguf file as is; otherwise a hub id fetched with huggingface_hub."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ConversionError(f"{model}: no such file or directory, and not a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: one line, not a traceback
        raise ConversionError(
            f"could not fetch {model!r} from the Hugging Face Hub ({type(e).__name__}); "
            "without network, download it elsewhere and pass the local directory"
        ) from None


# ----------------------------------------------------------------------------- conversion
def _tmp_dir(out: Path) -> Path:
    """A sibling temporary directory (same filesystem, so the final rename is atomic), with the
    permissions a plain mkdir would give (mkdtemp makes it private)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def convert(model: str, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False, progress: bool = True) -> Path:
    """Convert an HF checkpoint (dir, hub id or .gguf) into a larosa checkpoint directory.

    Streams tensor by tensor (peak memory ≈ the largest tensor) into a temporary directory next
    to ``out`` and renames it at the end, so an interrupted run leaves nothing half-written.
    """
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    src = resolve_source(model)
    root = src.parent if src.is_file() else src
    if src.is_file():
        gguf_file = src
    elif (src / "model.safetensors").exists() or (src / "model.safetensors.index.json").exists():
        gguf_file = None
    else:
        gguf_file = next(iter(sorted(src.glob("*.gguf"))), None)
    if gguf_file is not None:
        if gguf_file.suffix != ".gguf":
            raise ConversionError(f"{gguf_file}: expected a checkpoint directory or a .gguf file")
        source, meta = _gguf_source(gguf_file)
        if (root / "config.json").exists():
            hf_cfg = json.loads((root / "config.json").read_text())
        else:
            hf_cfg = _config_from_gguf(meta, source.shapes, gguf_file)
    else:
        if not (root / "config.json").exists():
            raise ConversionError(f"{root}: no config.json")
        hf_cfg = json.loads((root / "config.json").read_text())
        source = _safetensors_source(root)
    cfg = ModelConfig.from_hf(hf_cfg, source=str(root / "config.json"))

    np_dtype = DTYPES[dtype]
    specs, plan = [], []
    for ours, shape in expected_shapes(cfg).items():
        name, transpose = hf_name(ours)
        if name not in source.shapes:
            raise CheckpointError(f"{root}: tensor {name!r} is missing (needed for {ours})")
        want = tuple(reversed(shape)) if transpose else shape
        if source.shapes[name] != want:
            raise CheckpointError(
                f"{source.where(name)}: tensor {name!r} has shape {source.shapes[name]}, config.json implies {want}"
            )
        specs.append((ours, shape, np_dtype))
        plan.append((ours, name, transpose))

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for ours, name, transpose in plan:
            a = np.asarray(source.get(name))
            a = a.T if transpose else a
            yield ours, a.astype(np_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(out)
    try:
        bar = tqdm(total=len(specs), desc=f"convert {src.name}", unit="tensor", disable=not progress)
        write_safetensors(tmp / "model.safetensors", specs, tensors(), {"format": "larosa", "dtype": dtype}, bar)
        bar.close()
        hf_cfg = dict(hf_cfg)
        hf_cfg["larosa"] = {"format_version": FORMAT_VERSION, "dtype": dtype, "source": str(model), "layout": "input-major"}
        _finish(tmp, out, hf_cfg, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _finish(tmp: Path, out: Path, config: dict, tokenizer_from: str | Path | None) -> None:
    """Write config.json and the tokenizer files into ``tmp``, then move it to ``out`` in one rename."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_from) / fname).exists():
                shutil.copyfile(Path(tokenizer_from) / fname, tmp / fname)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- loading
def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, larosa block) of a converted checkpoint directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory from `larosa convert`?)")
    raw = json.loads(cfg_file.read_text())
    if "larosa" not in raw:
        raise CheckpointError(f"{cfg_file}: no 'larosa' block; convert the HF checkpoint first: larosa convert --model {path} --out DIR")
    return ModelConfig.from_hf(raw), raw["larosa"]


def load(path: str | Path, dtype=None, mesh=None) -> Transformer:
    """Open a converted (or fused, see :func:`save`) checkpoint as an NNX :class:`Transformer`
    (weights cast to ``dtype`` if given). With a ``mesh``, every weight is split for tensor parallelism
    (:func:`larosa_jax.parallel.param_spec`) and each device reads only its block from the file."""
    path = Path(path)
    cfg, meta = read_config(path)
    dtype = jnp.dtype(dtype or meta.get("dtype", "float32"))
    st = SafeTensorsFile(path / "model.safetensors")
    fused = bool(meta.get("fused", False))
    if fused:
        from .fusion import FUSED_FORM

        if meta.get("fused_form", 1) != FUSED_FORM:
            raise CheckpointError(
                f"{path / 'config.json'}: larosa.fused_form={meta.get('fused_form', 1)}, this version reads form "
                f"{FUSED_FORM} (down_proj folded with the next layer's rotation); fuse again from the converted "
                "checkpoint: larosa fuse --ckpt DIR --rotations FILE --out NEW_DIR")
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0), adapters=fused))
    if mesh is not None:
        from .parallel import check_model_axis, place

        check_model_axis(cfg, mesh.shape["model"])
        to_device = lambda name, arr: place(name, arr, mesh, dtype)  # noqa: E731
    else:
        to_device = None
    assign_params(model, lambda name: st[name] if name in st else None, where=str(st.path), dtype=dtype,
                  to_device=to_device)
    return model


def save(model: Transformer, out: str | Path, *, meta: dict | None = None, tokenizer_from: str | Path | None = None,
         overwrite: bool = False) -> Path:
    """Write ``model`` as a checkpoint directory (atomically: temporary dir, then rename).

    ``meta`` goes into the config's ``larosa`` block (a fused model sets ``fused: true`` and the
    rotations' metadata); tokenizer files are copied from ``tokenizer_from``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    params = {k: np.asarray(v) for k, v in params_of(model).items()}
    dtype = str(model.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(out)
    try:
        specs = [(k, a.shape, a.dtype) for k, a in params.items()]
        write_safetensors(tmp / "model.safetensors", specs, params.items(), {"format": "larosa", "dtype": dtype})
        hf = model.config.to_hf()
        hf["larosa"] = {"format_version": FORMAT_VERSION, "dtype": dtype, "layout": "input-major",
                        "fused": model.adapters is not None, **(meta or {})}
        if model.adapters is not None:
            from .fusion import FUSED_FORM

            hf["larosa"]["fused_form"] = FUSED_FORM
        _finish(tmp, out, hf, tokenizer_from)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def assign_params(model: nnx.Module, get: Callable[[str], np.ndarray | None], *, where: str, dtype=None,
                  to_device: Callable[[str, np.ndarray], jax.Array] | None = None) -> None:
    """Fill every Param of ``model`` from ``get(dotted_name)``, checking presence and shape
    (``to_device(name, array)`` places each one; default: one device)."""
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Param):
            continue
        name = ".".join(str(p) for p in path)
        arr = get(name)
        current = node.get_value()
        want = tuple(current.shape)
        if arr is None:
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        if tuple(arr.shape) != want:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)}, the model expects {want}")
        node.set_value(to_device(name, arr) if to_device else jnp.asarray(arr, dtype=dtype or current.dtype))


def params_of(model: nnx.Module) -> dict[str, jax.Array]:
    """Dotted name → array for every Param (the on-disk names)."""
    return {".".join(str(p) for p in path): node.get_value() for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from None
