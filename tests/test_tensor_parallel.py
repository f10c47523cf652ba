"""Tensor parallelism on 4 simulated CPU devices (a subprocess: the device count is fixed when jax starts):
the same tokens and logits as one device, a checkpoint loaded one shard per device, the Pallas kernels
inside shard_map, and the refusals. (Its own file so that the test runner's two processes split it from
the data-parallel checks.)"""

from __future__ import annotations

import textwrap

import pytest

from _helpers import on_four_devices

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
    return on_four_devices(TP_SCRIPT)


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
