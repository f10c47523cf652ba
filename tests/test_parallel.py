"""Data parallelism on 4 simulated CPU devices (a subprocess: the device count is fixed when jax starts)
gives the same perplexity, zero-shot scores and rotations as one device; bad meshes are refused with the
reason; the benchmarks run on a mesh. Tensor parallelism: test_tensor_parallel.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _helpers import on_four_devices
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


@pytest.fixture(scope="module")
def four_devices():
    return on_four_devices(SCRIPT)


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
