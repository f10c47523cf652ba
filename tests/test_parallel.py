"""Data parallelism on 4 simulated CPU devices (a subprocess: the device count is fixed when jax starts)
gives the same perplexity, zero-shot scores and rotations as one device; bad meshes are refused with the
reason. Tensor parallelism: the same tokens as one device, shards loaded per device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from larosa_jax.config import ModelConfig
from larosa_jax.parallel import MeshError, check_model_axis, make_mesh, parse_mesh

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from larosa_jax.config import ModelConfig
    from larosa_jax.models.random_init import random_model
    from larosa_jax.calibration import calibrate
    from larosa_jax.perplexity import window_nll
    from larosa_jax.parallel import make_mesh
    from larosa_jax.sparse_model import sparsify
    from larosa_jax.sparsity import SparseConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 4, jax.devices()
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 128, "max_position_embeddings": 64})
    model = random_model(cfg, jnp.float32, seed=0)
    win = np.random.default_rng(0).integers(0, 128, (8, 32)).astype(np.int32)
    out = {}
    sm = None
    for name, spec in (("one", "data=1"), ("dp2", "data=2"), ("dp4", None)):
        mesh = make_mesh(spec)
        out[name + "_devices"] = int(mesh.devices.size)
        out[name + "_nll"] = window_nll(model, win, batch_size=4, mesh=mesh).tolist()
        stats = calibrate(model, win, flavour="fused", batch_size=4, progress=False, mesh=mesh)
        out[name + "_q"] = stats.rotations.tolist()
        out[name + "_ev"] = stats.eigenvalues.tolist()
        # one fused model (the one-device rotations) evaluated on every mesh: Top-K near-ties would flip
        # between rotations that differ in the last bits
        sm = sm or sparsify(model, stats, SparseConfig("larosa", "fused", 0.5))
        out[name + "_fused_nll"] = window_nll(sm, win, batch_size=4, mesh=mesh).tolist()
        # zero-shot loglikelihood batches (3 rows asked: rounded up to the data axis, padding rows dropped)
        from larosa_jax.zeroshot import _lm_class
        reqs = [(None, [1, 2, 3], [4, 5]), (None, list(range(1, 20)), [7]), (None, [9, 8], [3, 3, 3]),
                (None, [5] * 10, [6, 2]), (None, [2, 7], [1])] * 2
        lm = _lm_class()(model, None, batch_size=3, max_length=64, progress=False, mesh=mesh)
        out[name + "_zs"] = [list(r) for r in lm._loglikelihood_tokens(reqs)]
        out[name + "_zs_calls"] = lm.stats["calls"]
    print("RESULT " + json.dumps(out))
""")


def _on_four_devices(script: str) -> dict:
    """Run ``script`` in a fresh Python with 4 simulated CPU devices; the dict it prints after RESULT."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def four_devices():
    return _on_four_devices(SCRIPT)


def test_data_parallel_perplexity_matches_one_device(four_devices):
    import numpy as np

    o = four_devices
    assert (o["one_devices"], o["dp2_devices"], o["dp4_devices"]) == (1, 2, 4)  # default: every device on data
    for name in ("dp2", "dp4"):
        np.testing.assert_allclose(o[name + "_nll"], o["one_nll"], rtol=1e-5)
        np.testing.assert_allclose(o[name + "_fused_nll"], o["one_fused_nll"], rtol=1e-5)


def test_data_parallel_zeroshot_scores_match_one_device(four_devices):
    import numpy as np

    o = four_devices
    one = o["one_zs"]
    assert len(one) == 10 and all(lp < 0 for lp, _ in one)
    # 3 rows a call on one device; rounded up to 4 (split 2 or 4 ways) on the meshes
    assert (o["one_zs_calls"], o["dp2_zs_calls"], o["dp4_zs_calls"]) == (4, 3, 3)
    for name in ("dp2", "dp4"):
        np.testing.assert_allclose([lp for lp, _ in o[name + "_zs"]], [lp for lp, _ in one], rtol=1e-5)
        assert [g for _, g in o[name + "_zs"]] == [g for _, g in one]


def test_data_parallel_calibration_gives_the_same_rotations(four_devices):
    import numpy as np

    o = four_devices
    q1 = np.asarray(o["one_q"])
    for name in ("dp2", "dp4"):
        np.testing.assert_allclose(o[name + "_ev"], o["one_ev"], rtol=1e-4, atol=1e-6)
        q = np.asarray(o[name + "_q"])
        # eigenvectors up to sign: |Q_1ᵀ Q| is the identity (distinct eigenvalues on random data)
        for l in range(q.shape[0]):
            np.testing.assert_allclose(np.abs(q1[l].T @ q[l]), np.eye(q.shape[1]), atol=2e-3)


def test_param_spec_splits_columns_rows_and_adapters():
    from jax.sharding import PartitionSpec as P

    from larosa_jax.parallel import param_spec

    assert param_spec("layers.0.attn.q.kernel", 2) == P(None, "model")
    assert param_spec("layers.0.attn.q.bias", 1) == P("model")
    assert param_spec("base.layers.3.mlp.down.kernel", 2) == P("model", None)
    assert param_spec("adapters.7", 2) == param_spec("base.adapters.0", 2) == P(None, "model")
    assert param_spec("embed.embedding", 2) == param_spec("layers.0.attn_norm.scale", 1) == P()


def test_bad_meshes_are_refused_with_the_reason():
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 256,
                               "num_hidden_layers": 1, "num_attention_heads": 6, "num_key_value_heads": 2,
                               "vocab_size": 64})
    assert parse_mesh("data=2") == {"data": 2, "model": 1} and parse_mesh(None) is None
    for bad in ("data=0", "pipe=2", "data=two", "data2"):
        with pytest.raises(MeshError, match="expected axis=size pairs"):
            parse_mesh(bad)
    with pytest.raises(MeshError, match=r"needs 8 devices; found 1 \(cpu\)"):
        make_mesh("data=4,model=2")
    with pytest.raises(MeshError, match=r"model=4 does not divide num_attention_heads=6; model sizes that divide "
                                        r"every sharded dimension: 1, 2"):
        check_model_axis(cfg, 4)
    check_model_axis(cfg, 2)  # divides 6 heads, 2 kv heads, 256 and 96


# meshes each method decodes on (a sparse decode compiles for ~40 s per mesh); topk and teal (the same
# row-parallel projection as La RoSA's o/down) compare their model=2 logits only
SPECS = {"dense": ("model=2", "model=4", "data=2,model=2"), "larosa": ("model=2", "model=4", "data=2,model=2"),
         "topk": (), "teal": ()}
TP_SCRIPT = f"SPECS = {SPECS!r}\n" + textwrap.dedent("""
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    from larosa_jax.config import ModelConfig
    from larosa_jax.models.random_init import random_model
    from larosa_jax.calibration import calibrate
    from larosa_jax.generate import generate
    from larosa_jax.parallel import MeshError, TensorParallel, make_mesh
    from larosa_jax.sparse_model import sparsify
    from larosa_jax.sparsity import SparseConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    hf = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
          "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 128}
    cfg = ModelConfig.from_hf(hf)  # Qwen2: q/k/v biases, split with their columns
    model = random_model(cfg, jnp.float32, seed=0)
    stats = calibrate(model, np.random.default_rng(0).integers(0, 128, (4, 32)).astype(np.int32), flavour="fused",
                      batch_size=4, progress=False)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]  # left padding, different lengths
    out = {}
    probe = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    for sc in (SparseConfig("dense"), SparseConfig("larosa", "fused", 0.5), SparseConfig("topk", "faithful", 0.5),
               SparseConfig("teal", "faithful", 0.4)):
        m = sparsify(model, stats, sc)
        out[sc.method + "_one"] = generate(m, prompts, max_new_tokens=8)
        want = np.asarray(m(probe)[0])
        for spec in SPECS[sc.method] or ("model=2",):
            tp = TensorParallel(m, make_mesh(spec))
            if spec in SPECS[sc.method]:
                out[f"{sc.method}_{spec}"] = generate(tp, prompts, max_new_tokens=8)
            if not spec.startswith("data"):
                out[f"{sc.method}_{spec}_logit_err"] = float(np.max(np.abs(np.asarray(tp(probe)[0]) - want)))
    # a checkpoint loaded onto the mesh: each device holds (and read) only its block of each weight
    import tempfile
    from larosa_jax.checkpoint import load, save
    fused = sparsify(model, stats, SparseConfig("larosa", "fused", 0.5)).base
    ckpt = save(fused, tempfile.mkdtemp() + "/fused", meta={"fused": True})
    mesh = make_mesh("model=2")
    loaded = load(ckpt, mesh=mesh)
    q = loaded.layers[0].attn.q.kernel[...]
    down = loaded.layers[1].mlp.down.kernel[...]
    out["shard_shapes"] = [list(q.addressable_shards[0].data.shape), list(down.addressable_shards[0].data.shape),
                           list(loaded.adapters[0][...].addressable_shards[0].data.shape),
                           list(loaded.embed.embedding[...].addressable_shards[0].data.shape)]
    sc = SparseConfig("larosa", "fused", 0.5)
    one = np.asarray(sparsify(load(ckpt), None, sc)(probe)[0])
    out["loaded_logit_err"] = float(np.max(np.abs(np.asarray(TensorParallel(sparsify(loaded, None, sc), mesh)(probe)[0]) - one)))
    try:
        TensorParallel(model, make_mesh("data=2,model=2"))(jnp.zeros((3, 4), jnp.int32))
    except MeshError as e:
        out["odd_batch"] = str(e)
    try:
        TensorParallel(model, make_mesh("model=3"))
    except MeshError as e:
        out["bad_model"] = str(e)
    # the Pallas kernels inside shard_map (interpret mode), bf16, La RoSA fused: the logits of the jnp path
    # on the same mesh (against one device, bf16 rounding flips near-tied Top-K entries: up to ~20% apart)
    mb = sparsify(random_model(ModelConfig.from_hf({**hf, "hidden_size": 128, "intermediate_size": 512}),
                               jnp.bfloat16, seed=1, adapters=True), None, SparseConfig("larosa", "fused", 0.5))
    tok = jnp.asarray([[5]])
    from larosa_jax.models import init_cache
    tp2 = TensorParallel(mb, make_mesh("model=2"))
    ref = np.asarray(tp2(tok, init_cache(mb.config, 1, 64, jnp.bfloat16))[0], np.float32)
    from larosa_jax.plan import DecodePlan
    mb.plan = DecodePlan.kernels("larosa")  # every kernel, in interpret mode on CPU
    jax.clear_caches()
    from jax.experimental import pallas as pl
    calls, orig = [], pl.pallas_call
    pl.pallas_call = lambda *a, **k: calls.append(1) or orig(*a, **k)
    two = np.asarray(tp2(tok, init_cache(mb.config, 1, 64, jnp.bfloat16))[0], np.float32)
    pl.pallas_call = orig
    out["kernel_calls"] = len(calls)
    out["kernel_rel_err"] = float(np.linalg.norm(two - ref) / np.linalg.norm(ref))
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def tensor_parallel():
    return _on_four_devices(TP_SCRIPT)


@pytest.mark.parametrize("method", ["dense", "larosa", "topk", "teal"])
def test_tensor_parallel_gives_the_same_tokens_and_logits(tensor_parallel, method):
    """Greedy tokens of a decode on each mesh of SPECS and the logits of a prompt equal one device's."""
    o = tensor_parallel
    for spec in SPECS[method]:
        assert o[f"{method}_{spec}"] == o[f"{method}_one"], f"{method} on {spec}"
    for spec in [s for s in SPECS[method] if not s.startswith("data")] or ["model=2"]:
        assert o[f"{method}_{spec}_logit_err"] < 1e-4


def test_checkpoint_loads_onto_the_mesh_one_shard_per_device(tensor_parallel):
    o = tensor_parallel
    assert o["shard_shapes"] == [[64, 32], [96, 64], [64, 32], [128, 64]]  # q, adapter columns, down rows; embedding whole
    assert o["loaded_logit_err"] < 1e-4  # the same logits as the checkpoint loaded on one device


def test_tensor_parallel_kernels_and_refusals(tensor_parallel):
    o = tensor_parallel
    assert o["kernel_calls"] > 0 and o["kernel_rel_err"] < 2e-2  # bf16 sparse kernels on each device's shards
    assert o["odd_batch"] == "a batch of 3 rows does not split over data=2"
    assert "model=3 does not divide num_attention_heads=8" in o["bad_model"] and "1, 2, 4" in o["bad_model"]


def test_benchmarks_run_on_a_mesh(tmp_path):
    """The multi-GPU benchmark commands (TP decode, DP calibration) at tiny shapes on 4 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop("OUT", None)
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=900)
    r = run("eval/bench_decode.py", "--tiny", "--models", "llama2-13b", "--configs", "larosa@0.5", "--mesh", "model=2",
            "--prompt", "8", "--new", "4", "--out", str(tmp_path / "tp"))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "tp.json").read_text())
    assert doc["meta"]["mesh"] == {"data": 1, "model": 2}
    assert {r["config"] for r in doc["results"]} == {"dense", "larosa@0.5"}
    r = run("eval/bench_calibration.py", "--tiny", "--mesh", "data=2", "--out", str(tmp_path / "cal"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "cal.json").read_text())["mesh"] == "data=2"
