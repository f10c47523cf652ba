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
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from . import outputs
from .config import ConfigError, ModelConfig, read_json
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


def _is_checkpoint(path: Path) -> bool:
    try:
        return "larosa" in read_json(path / "config.json")
    except (ConfigError, OSError):
        return False


CHECKPOINT = outputs.Kind("checkpoint directory", True, _is_checkpoint,
                          frozenset({"config.json", "model.safetensors", *TOKENIZER_FILES}))
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def check_layers(names, cfg: ModelConfig, where: str, config_file: str) -> None:
    """Stored tensors of layers the config does not have (a config with fewer layers than the
    weights) are an error, before anything is allocated."""
    found = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            found.setdefault(int(m.group(1)), n)
    extra = sorted(i for i in found if i >= cfg.num_layers)
    if extra:
        raise CheckpointError(
            f"{where}: holds tensors of layer {extra[0]}{f' to {extra[-1]}' if len(extra) > 1 else ''} "
            f"(e.g. {found[extra[0]]!r}), but {config_file} says num_hidden_layers={cfg.num_layers}; "
            "the config must describe every stored layer")


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
            weight_map = read_json(index, what="safetensors index")["weight_map"]
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        except KeyError:
            raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: not a valid safetensors index ('weight_map' must map tensor names to file names)")
        for fname in set(weight_map.values()):
            if Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise CheckpointError(f"{index}: shard name {fname!r} points outside {root}")
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

    def g(k):
        if f"llama.{k}" not in meta:
            raise ConfigError(f"{path}: GGUF metadata has no 'llama.{k}' (and there is no config.json beside the file)")
        return meta[f"llama.{k}"]

    if len(shapes.get("model.embed_tokens.weight", ())) != 2:
        raise CheckpointError(f"{path}: no 2-d token_embd.weight tensor")
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
def convert(model: str, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False, progress: bool = True) -> Path:
    """Convert an HF checkpoint (dir, hub id or .gguf) into a larosa checkpoint directory.

    Streams tensor by tensor (peak memory ≈ the largest tensor) into a temporary directory next
    to ``out`` and renames it at the end (:mod:`larosa_jax.outputs`), so an interrupted run leaves
    nothing half-written and an existing checkpoint is replaced only once the new one is complete.
    """
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    local = Path(model).expanduser()
    out = outputs.check_target(out, CHECKPOINT, overwrite=overwrite, inputs=(local,) if local.exists() else ())
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
            hf_cfg, cfg_src = read_json(root / "config.json"), str(root / "config.json")
        else:
            hf_cfg, cfg_src = _config_from_gguf(meta, source.shapes, gguf_file), f"{gguf_file} (metadata)"
    else:
        if not (root / "config.json").exists():
            raise ConversionError(f"{root}: no config.json")
        hf_cfg, cfg_src = read_json(root / "config.json"), str(root / "config.json")
        source = _safetensors_source(root)
    cfg = ModelConfig.from_hf(hf_cfg, source=cfg_src)
    check_layers(source.shapes, cfg, str(gguf_file or root), cfg_src)
    check_tokenizer_code(root, error=ConversionError)

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

    with outputs.staged_dir(out) as tmp:
        bar = tqdm(total=len(specs), desc=f"convert {src.name}", unit="tensor", disable=not progress)
        write_safetensors(tmp / "model.safetensors", specs, tensors(), {"format": "larosa", "dtype": dtype}, bar)
        bar.close()
        hf_cfg = dict(hf_cfg)
        hf_cfg["larosa"] = {"format_version": FORMAT_VERSION, "dtype": dtype, "source": str(model), "layout": "input-major"}
        _finish(tmp, hf_cfg, root)
    return out


def _finish(tmp: Path, config: dict, tokenizer_from: str | Path | None) -> None:
    """Write config.json and the tokenizer files into the staged directory ``tmp``."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_from) / fname).is_file():
                shutil.copyfile(Path(tokenizer_from) / fname, tmp / fname)


# ----------------------------------------------------------------------------- loading
def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, larosa block) of a converted checkpoint directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (no such directory)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory from `larosa convert`?)")
    raw = read_json(cfg_file)
    if "larosa" not in raw:
        raise CheckpointError(f"{cfg_file}: no 'larosa' block; convert the HF checkpoint first: larosa convert --model {path} --out DIR")
    if not isinstance(raw["larosa"], dict):
        raise ConfigError(f"{cfg_file}: 'larosa' must be an object, not {type(raw['larosa']).__name__}")
    return ModelConfig.from_hf(raw, source=str(cfg_file)), raw["larosa"]


def _float_dtype(dtype, where: str):
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a floating-point type (float32, bfloat16, float16)")
    return dt


def load(path: str | Path, dtype=None, mesh=None) -> Transformer:
    """Open a converted (or fused, see :func:`save`) checkpoint as an NNX :class:`Transformer`
    (weights cast to ``dtype`` if given). With a ``mesh``, every weight is split for tensor parallelism
    (:func:`larosa_jax.parallel.param_spec`) and each device reads only its block from the file."""
    path = Path(path)
    cfg, meta = read_config(path)
    dtype = _float_dtype(dtype, "load") if dtype is not None else _float_dtype(meta.get("dtype", "float32"),
                                                                               str(path / "config.json"))
    st = SafeTensorsFile(path / "model.safetensors")
    check_layers(st.keys(), cfg, str(st.path), str(path / "config.json"))
    fused = bool(meta.get("fused", False))
    if fused:
        from .fusion import FUSED_FORM

        if meta.get("fused_form", 1) != FUSED_FORM:
            raise CheckpointError(
                f"{path / 'config.json'}: larosa.fused_form={meta.get('fused_form', 1)}, this version reads form "
                f"{FUSED_FORM} (down_proj folded with the next layer's rotation); fuse again from the converted "
                "checkpoint: larosa fuse --ckpt DIR --rotations FILE --out NEW_DIR")
    adapters = bool(meta.get("adapters", fused))  # a fused model with one shared Q (flavour global) has none
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0), adapters=adapters))
    model.fused = fused
    names = {".".join(str(p) for p in p_) for p_, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}
    extra = sorted(set(st.keys()) - names)
    if extra:
        raise CheckpointError(
            f"{st.path}: holds {len(extra)} tensor{'s' if len(extra) > 1 else ''} the model described by config.json "
            f"does not have ({', '.join(map(repr, extra[:3]))}{', ...' if len(extra) > 3 else ''})")
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
    out = outputs.check_target(out, CHECKPOINT, overwrite=overwrite,
                               inputs=(tokenizer_from,) if tokenizer_from is not None else ())
    params = {k: np.asarray(v) for k, v in params_of(model).items()}
    dtype = str(model.dtype)
    with outputs.staged_dir(out) as tmp:
        specs = [(k, a.shape, a.dtype) for k, a in params.items()]
        write_safetensors(tmp / "model.safetensors", specs, params.items(), {"format": "larosa", "dtype": dtype})
        hf = model.config.to_hf()
        hf["larosa"] = {"format_version": FORMAT_VERSION, "dtype": dtype, "layout": "input-major",
                        "fused": model.fused, "adapters": model.adapters is not None, **(meta or {})}
        if model.fused:
            from .fusion import FUSED_FORM

            hf["larosa"]["fused_form"] = FUSED_FORM
        _finish(tmp, hf, tokenizer_from)
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


def check_tokenizer_code(path: str | Path, error=CheckpointError) -> None:
    """Refuse a tokenizer that names custom code (``auto_map``): larosa never runs code from a checkpoint."""
    for fname, key in (("tokenizer_config.json", None), ("config.json", "AutoTokenizer")):
        f = Path(path) / fname
        if not f.is_file():
            continue
        try:
            raw = read_json(f)
        except ConfigError as e:
            raise error(str(e)) from None
        amap = raw.get("auto_map")
        if amap and (key is None or (isinstance(amap, dict) and key in amap)):
            raise error(f"{f}: the tokenizer names custom code (auto_map: {json.dumps(amap)[:120]}); larosa never runs "
                        "code from a checkpoint: use a standard transformers tokenizer (remove 'auto_map' if its class "
                        "is a standard one)")


def load_tokenizer(path: str | Path):
    """The checkpoint's Hugging Face tokenizer, with remote code disabled (never prompts)."""
    # transformers' advice that PyTorch is missing is for its models; larosa needs only its tokenizers
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    check_tokenizer_code(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from None
