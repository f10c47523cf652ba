"""Conversion and loading: sharded input, dtypes, and bad input with errors that name the culprit."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import larosa_jax
from larosa_jax.checkpoint import ConversionError
from larosa_jax.config import ConfigError
from larosa_jax.outputs import OutputError
from larosa_jax.safetensors_io import CheckpointError, SafeTensorsFile

from conftest import STORIES_DIR, assert_logits_close, forward, hf_logits

KIND = "llama2_mha"  # untied head, so every kind of tensor is present


def convert(src, out, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("progress", False)
    return larosa_jax.convert(str(src), out, **kw)


@pytest.fixture
def hf_dir(random_model, tmp_path) -> Path:
    """A fresh single-file copy of the random Llama-2 HF checkpoint (safe to damage)."""
    d = tmp_path / "hf"
    shutil.copytree(random_model(KIND).hf_dir, d)
    return d


@pytest.fixture(scope="session")
def sharded_dir(random_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sharded") / "hf"
    random_model(KIND).hf.save_pretrained(d, max_shard_size="50KB")
    return d


@pytest.fixture
def sharded_copy(sharded_dir, tmp_path) -> Path:
    d = tmp_path / "hf-sharded"
    shutil.copytree(sharded_dir, d)
    return d


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ----------------------------------------------------------------------------- good input
def test_sharded_conversion_equals_single_file(random_model, sharded_dir, tmp_path, random_tokens):
    rm = random_model(KIND)
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (sharded_dir / "model.safetensors.index.json").is_file()
    assert not (sharded_dir / "model.safetensors").exists()
    out = convert(sharded_dir, tmp_path / "out")
    a, b = SafeTensorsFile(out / "model.safetensors"), SafeTensorsFile(rm.ckpt / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    tokens = random_tokens(2, 40, seed=4)
    model = larosa_jax.load(out)
    np.testing.assert_array_equal(forward(model, tokens), forward(rm.model, tokens))
    assert_logits_close(forward(model, tokens), hf_logits(rm.hf, tokens))


def test_converted_layout(random_model):
    """Input-major kernels named after the NNX paths; config carries the larosa block."""
    rm = random_model(KIND)
    st = SafeTensorsFile(rm.ckpt / "model.safetensors")
    sd = rm.hf.state_dict()
    np.testing.assert_array_equal(st["layers.1.attn.q.kernel"], sd["model.layers.1.self_attn.q_proj.weight"].numpy().T)
    np.testing.assert_array_equal(st["layers.0.mlp.down.kernel"], sd["model.layers.0.mlp.down_proj.weight"].numpy().T)
    np.testing.assert_array_equal(st["lm_head.kernel"], sd["lm_head.weight"].numpy().T)
    np.testing.assert_array_equal(st["embed.embedding"], sd["model.embed_tokens.weight"].numpy())
    assert st.shape("layers.0.mlp.gate.kernel") == (96, 200)
    meta = json.loads((rm.ckpt / "config.json").read_text())["larosa"]
    assert meta["dtype"] == "float32" and meta["layout"] == "input-major"
    assert leftovers(rm.ckpt.parent).count(rm.ckpt.name) == 1
    assert not [n for n in leftovers(rm.ckpt.parent) if ".tmp" in n]


def test_bfloat16_conversion_close_to_float32(stories_model, stories_ckpt, stories_prompts, tmp_path):
    out = convert(STORIES_DIR, tmp_path / "bf16", dtype="bfloat16")
    st = SafeTensorsFile(out / "model.safetensors")
    assert st.header["layers.0.attn.q.kernel"]["dtype"] == "BF16"
    assert (out / "model.safetensors").stat().st_size < 0.6 * (stories_ckpt / "model.safetensors").stat().st_size
    model = larosa_jax.load(out)
    assert model.dtype == np.dtype(ml_dtypes.bfloat16)
    ids = stories_prompts[3]
    lo, hi = forward(model, [ids]), forward(stories_model, [ids])
    assert lo.dtype == np.float32
    err = np.abs(lo - hi).max() / np.abs(hi).max()
    assert 0 < err < 0.05, err
    assert (lo.argmax(-1) == hi.argmax(-1)).mean() >= 0.8
    # and generation runs end to end in bf16
    out_ids = larosa_jax.generate(model, stories_prompts[:2], max_new_tokens=8)
    assert [len(r) for r in out_ids] == [8, 8]


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_source_reads_exactly(src_dtype, random_model, tmp_path, random_tokens):
    """A bf16/fp16 HF checkpoint converts to float32 values equal to the upcast source."""
    rm = random_model(KIND)
    hf = type(rm.hf)(rm.hf.config).eval()
    hf.load_state_dict(rm.hf.state_dict())
    hf = hf.to(src_dtype)  # (also casts the RoPE buffer, so it is no float32 reference)
    hf.save_pretrained(tmp_path / "hf")
    ref = type(rm.hf)(rm.hf.config).eval()
    ref.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
    st_in = SafeTensorsFile(tmp_path / "hf" / "model.safetensors")
    assert st_in.header["model.layers.0.self_attn.q_proj.weight"]["dtype"] == {torch.bfloat16: "BF16", torch.float16: "F16"}[src_dtype]
    out = convert(tmp_path / "hf", tmp_path / "out")
    st = SafeTensorsFile(out / "model.safetensors")
    want = hf.state_dict()["model.layers.1.mlp.up_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(st["layers.1.mlp.up.kernel"], want)
    tokens = random_tokens(1, 32, seed=5)
    assert_logits_close(forward(larosa_jax.load(out), tokens), hf_logits(ref, tokens))


# ----------------------------------------------------------------------------- bad input
def test_unknown_architecture(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        convert(hf_dir, tmp_path / "out")
    msg = str(e.value)
    assert "MistralForCausalLM" in msg and "config.json" in msg
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg  # lists the supported ones
    assert not (tmp_path / "out").exists()


def test_missing_shard(sharded_copy, tmp_path):
    victim = sorted(sharded_copy.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        convert(sharded_copy, tmp_path / "out")
    msg = str(e.value)
    assert victim.name in msg and "model.safetensors.index.json" in msg and "missing" in msg
    assert leftovers(tmp_path) == ["hf-sharded"]


@pytest.mark.parametrize("keep", ["most", "header-part", "4-bytes"])
def test_truncated_shard(keep, sharded_copy, tmp_path):
    victim = sorted(sharded_copy.glob("model-*.safetensors"))[1]
    size = victim.stat().st_size
    n = {"most": size - 100, "header-part": 20, "4-bytes": 4}[keep]
    with open(victim, "r+b") as f:
        f.truncate(n)
    with pytest.raises(CheckpointError) as e:
        convert(sharded_copy, tmp_path / "out")
    msg = str(e.value)
    assert victim.name in msg and "truncated" in msg
    assert leftovers(tmp_path) == ["hf-sharded"]


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_header_inconsistent_with_data(hf_dir, tmp_path):
    """A header whose shape and byte range disagree is caught when the file is opened."""
    f = hf_dir / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_header(f, lambda h: h[name].__setitem__("dtype", "F16"))  # same shape, half the bytes
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, tmp_path / "out")
    msg = str(e.value)
    assert str(f) in msg and name in msg and "F16" in msg
    f.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        convert(hf_dir, tmp_path / "out")
    assert leftovers(tmp_path) == ["hf"]


def test_truncated_single_file(hf_dir, tmp_path):
    f = hf_dir / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        convert(hf_dir, tmp_path / "out")
    assert str(f) in str(e.value)


def test_shape_disagrees_with_config(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 208
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, tmp_path / "out")
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg
    assert "(200, 96)" in msg and "(208, 96)" in msg  # both shapes
    assert "model.safetensors" in msg
    # a failed conversion leaves neither the output nor a temporary directory behind
    assert leftovers(tmp_path) == ["hf"]


def test_missing_tensor(hf_dir, tmp_path):
    from safetensors.numpy import save_file

    st = SafeTensorsFile(hf_dir / "model.safetensors")
    tensors = {k: np.array(st[k]) for k in st.keys() if k != "model.layers.1.self_attn.v_proj.weight"}
    del st
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, tmp_path / "out")
    assert "model.layers.1.self_attn.v_proj.weight" in str(e.value) and "missing" in str(e.value)


def test_failure_while_writing_cleans_up(hf_dir, tmp_path, random_model):
    """A tensor that cannot be read (unsupported dtype) fails the conversion half-way through
    writing: no output directory, no temporary directory, and an existing output is kept."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float8_e4m3fn)  # right shape, odd dtype
    save_file(sd, str(hf_dir / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, out)
    msg = str(e.value)
    assert "model.norm.weight" in msg and "F8_E4M3" in msg and "model.safetensors" in msg
    assert leftovers(tmp_path) == ["hf"]
    # with overwrite=True a failed conversion leaves the previous checkpoint untouched
    shutil.copytree(random_model(KIND).ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError):
        convert(hf_dir, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == ["hf", "out"]


def test_existing_output_refused_unless_overwrite(random_model, tmp_path, random_tokens):
    """An existing checkpoint is replaced only with overwrite; a directory holding other files never."""
    rm = random_model(KIND)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    for overwrite in (False, True):
        with pytest.raises(OutputError) as e:
            convert(rm.hf_dir, out, overwrite=overwrite)
        assert str(out) in str(e.value) and ("overwrite" in str(e.value) or "stale.txt" in str(e.value))
    assert (out / "stale.txt").read_text() == "old"
    (out / "stale.txt").unlink()
    for name in ("config.json", "model.safetensors"):  # an HF directory is no larosa checkpoint either
        shutil.copyfile(STORIES_DIR / name, out / name)
    with pytest.raises(OutputError, match="not a checkpoint directory"):
        convert(rm.hf_dir, out, overwrite=True)
    shutil.rmtree(out)
    convert(STORIES_DIR, out)
    with pytest.raises(OutputError, match="already exists"):
        convert(rm.hf_dir, out)
    convert(rm.hf_dir, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    tokens = random_tokens(1, 16)
    np.testing.assert_array_equal(forward(larosa_jax.load(out), tokens), forward(rm.model, tokens))
    assert leftovers(tmp_path) == ["out"]


def test_hub_id_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError) as e:
        convert("larosa-tests/no-such-model-xyz", tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg
    assert "larosa-tests/no-such-model-xyz" in msg and "Hugging Face Hub" in msg
    assert e.value.__cause__ is None  # one line, not a chained traceback
    assert leftovers(tmp_path) == []


def test_not_a_path_nor_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match="no such file or directory"):
        convert("./missing/dir/here", tmp_path / "out")


def test_directory_without_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises((CheckpointError, ConversionError)) as e:
        convert(d, tmp_path / "out")
    assert str(d) in str(e.value)


def test_bad_dtype(random_model, tmp_path):
    with pytest.raises(ConversionError, match="float64"):
        convert(random_model(KIND).hf_dir, tmp_path / "out", dtype="float64")


# ----------------------------------------------------------------------------- loading errors
def test_load_unconverted_hf_dir(random_model):
    with pytest.raises(CheckpointError) as e:
        larosa_jax.load(random_model(KIND).hf_dir)
    assert "convert" in str(e.value) and "config.json" in str(e.value)


def test_load_checks_shapes_and_files(random_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_model(KIND).ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 208
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        larosa_jax.load(ckpt)
    msg = str(e.value)
    assert re.search(r"tensor 'layers\.0\.mlp\.(gate|up|down)\.kernel'", msg), msg
    assert ("(96, 200)" in msg and "(96, 208)" in msg) or ("(200, 96)" in msg and "(208, 96)" in msg), msg
    # truncated weights
    shutil.rmtree(ckpt)
    shutil.copytree(random_model(KIND).ckpt, ckpt)
    f = ckpt / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 8)
    with pytest.raises(CheckpointError, match="truncated") as e:
        larosa_jax.load(ckpt)
    assert str(f) in str(e.value)
    # missing weights file
    f.unlink()
    with pytest.raises(CheckpointError) as e:
        larosa_jax.load(ckpt)
    assert str(f) in str(e.value)


def test_truncated_gguf(tmp_path):
    from conftest import SMOL_DIR, SMOL_GGUF, _need_smol

    _need_smol()
    src = SMOL_DIR / SMOL_GGUF
    bad = tmp_path / "model.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(4 << 20))  # header and the first few tensors only
    with pytest.raises(CheckpointError) as e:
        convert(bad, tmp_path / "out")
    assert str(bad) in str(e.value)
    assert leftovers(tmp_path) == ["model.gguf"]
