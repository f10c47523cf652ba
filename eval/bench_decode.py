"""Decode throughput, dense and sparse, against the HBM roofline.

Random bf16 weights are built on the device (no checkpoint) for real model shapes; a prompt of
``--prompt`` tokens is prefilled, then ``--new`` tokens are decoded by one call of
:func:`larosa_jax.generate.decode` (a single ``lax.while_loop`` jit). Only that call is timed,
after a warm-up call on the same shapes; the median of ``--repeats`` runs is reported.

``--configs`` lists what to decode besides ``dense``: ``larosa@P`` (the fused, deployable La RoSA
model: γ and Q folded, d × d adapters between layers, Top-K at every site; the official α_rot with
α_plain solved so that the effective sparsity is exactly P), ``topk@P`` (Top-K without rotation,
no adapters, α = 1: the TEAL-like peer) and ``teal@P`` (TEAL itself: per-layer, per-site magnitude
thresholds at the p-quantile of |x|, calibrated on the prompt; no selection at decode, so each
token's sparsity scatters around P; ``teal_realized`` records it on a second prompt). ``--batch`` lists batch sizes. Speed-ups are against dense
at the same batch, in the same run.

Roofline: bytes read per decode step = every weight matrix (the lm_head in full; the embedding
row is negligible) + the KV cache of the live context (mean over the decoded steps), divided by
the read bandwidth measured in the same run: the best of several large streaming reads (XLA
reductions, Pallas block sums and, on a GPU with torch, torch's sum in a child process; the JSON
names the winner). Decode reads its weights and writes
almost nothing, so a read, not a copy, is its bound.

    python eval/bench_decode.py --models llama2-7b,llama3-8b,qwen2-7b --prompt 128 --new 256 \\
        --out eval/results/dense_decode_h100
    python eval/bench_decode.py --models llama2-7b --configs larosa@0.4,larosa@0.5,topk@0.5 --batch 1,4 \\
        --out eval/results/sparse_decode_h200
    python eval/bench_decode.py --tiny            # CPU smoke test

``--profile MODEL`` adds a jax.profiler trace of one decode call of that model and prints the
GPU kernel time per step by kernel (where the time goes); ``--dump`` writes XLA's optimized HLO
of the decode jit. With ``$OUT`` set, results (and diagnostics) are also written there.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))  # kernel_trace, when imported as a module (tests)


def _pre_jax_flags(argv):
    """XLA flags must be set before jax is imported."""
    if "--dump" in argv:
        d = os.path.join(tempfile.gettempdir(), "xla_dump_decode")
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_dump_to={d} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*"
        ).strip()
        return d
    return None


DUMP_DIR = _pre_jax_flags(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from larosa_jax.config import ModelConfig  # noqa: E402
from larosa_jax.generate import DecodeState, SamplingConfig, decode, prefill  # noqa: E402
from larosa_jax.models import init_cache  # noqa: E402
from larosa_jax.pallas.sparse_gemv import NARROW, NARROW_TILE, WIDE_TILE  # noqa: E402
from larosa_jax.models.random_init import random_model  # noqa: E402
from larosa_jax.parallel import TensorParallel, make_mesh, shard_params  # noqa: E402
from larosa_jax.plan import DecodePlan, PlanError  # noqa: E402
from larosa_jax.search import alpha_plain_for  # noqa: E402
from larosa_jax.models.transformer import dense_projection  # noqa: E402
from larosa_jax.sparse_model import SparseModel, decode_kind, sparsify  # noqa: E402
from kernel_trace import kernel_profile, print_profile  # noqa: E402  (eval/kernel_trace.py)
from larosa_jax.sparsity import (SITES, SparseConfig, SparsityError, TealProjection, site_dims, site_ks,  # noqa: E402
                                 site_params)

HF_CONFIGS = {
    "llama2-7b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "llama2-13b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
}


def tiny(hf: dict) -> dict:
    """Same architecture (GQA ratio, biases, rope) at a CPU-friendly size."""
    h = dict(hf)
    ratio = hf["num_attention_heads"] // hf["num_key_value_heads"]
    h.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=max(4 // ratio, 1), vocab_size=512)
    return h


# ----------------------------------------------------------------------------- random weights on device
def build_random(cfg: ModelConfig, dtype, seed: int = 0, adapters: bool = False):
    """(graphdef, state, specs) of a Transformer with random weights made on the device."""
    graphdef, state = nnx.split(random_model(cfg, dtype, seed, adapters=adapters))
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    specs = tuple((jax.tree_util.keystr(p), tuple(l.shape), jnp.dtype(l.dtype)) for p, l in flat)
    return graphdef, state, specs


def weight_bytes_per_step(cfg: ModelConfig, specs, ks: dict[str, int] | None = None) -> int:
    """Bytes of weights read by one decode step: everything except the embedding table (one row
    is gathered), unless it doubles as the lm_head (tied). With Top-K ``ks`` per site, only the kept
    rows of the seven projections (the adapters and the lm_head stay dense)."""
    total = 0
    for name, shape, dt in specs:
        n = int(np.prod(shape)) * dt.itemsize
        if "embedding" in name and not cfg.tie_word_embeddings:
            n = shape[-1] * dt.itemsize
        total += n
    if ks:
        dims, w = site_dims(cfg), site_params(cfg)
        itemsize = specs[0][2].itemsize
        total -= int(sum((1 - ks[s] / dims[s]) * w[s] for s in SITES) * cfg.num_layers * itemsize)
    return total


def site_bytes_per_layer(cfg: ModelConfig, itemsize: int, keep: dict[str, float], adapters: bool) -> dict[str, float]:
    """Weight bytes each site reads per layer and token: its rows times the kept share ``keep[site]``; with
    ``adapters`` (La RoSA's fused model) the down site also reads the d × d adapter (it runs in that scope)."""
    w = site_params(cfg)
    out = {s: keep[s] * w[s] * itemsize for s in SITES}
    if adapters:
        out["down"] += cfg.hidden_size ** 2 * itemsize
    return out


def kv_bytes_per_step(cfg: ModelConfig, prompt: int, new: int, itemsize: int) -> float:
    """KV bytes read per step, mean over the ``new`` decode steps (step i attends prompt+i+1 slots)."""
    mean_ctx = prompt + (new + 1) / 2
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * mean_ctx


# ----------------------------------------------------------------------------- bandwidth
def _median_seconds(fn, xs, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls alternating between the buffers ``xs``,
    after one warm-up call (compile)."""
    jax.block_until_ready(fn(xs[0]))
    ts = []
    for i in range(repeats):
        x = xs[i % 2]
        jax.block_until_ready(x)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second); two buffers rotate."""
    n = nbytes // 4
    copy = jax.jit(lambda x: x + jnp.uint32(1))  # elementwise: one read + one write per element
    xs = [jax.random.bits(jax.random.key(i), (n,), jnp.uint32) for i in range(2)]
    t = _median_seconds(copy, xs, repeats)
    plain = jax.jit(lambda x: jnp.copy(x))  # a plain device-to-device copy (the output may not alias x)
    t_plain = _median_seconds(plain, xs, repeats)
    add_bw = 2 * 4 * n / t / 1e9
    t = min(t, t_plain)
    # read-only bandwidth, for reference (a full reduction)
    t_read = _median_seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.uint32)), xs, repeats)
    del xs
    return {"bytes": 2 * 4 * n, "seconds": t, "copy_GBps": 2 * 4 * n / t / 1e9, "add_one_GBps": add_bw,
            "plain_copy_GBps": 2 * 4 * n / t_plain / 1e9,
            "read_only_GBps": 4 * n / t_read / 1e9}


def _pallas_block_sum(x: jax.Array, blk: int, warps: int) -> jax.Array:
    """A streaming read in Pallas: one program per ``blk`` words, each writing its block's sum."""
    from jax.experimental import pallas as pl

    from larosa_jax.pallas.common import interpret, triton_params

    nb = x.shape[0] // blk

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.broadcast_to(jnp.sum(x_ref[...], dtype=jnp.uint32), (16,))

    part = pl.pallas_call(kernel, grid=(nb,), in_specs=[pl.BlockSpec((blk,), lambda i: (i,))],
                          out_specs=pl.BlockSpec((16,), lambda i: (i,)), out_shape=jax.ShapeDtypeStruct((nb * 16,), jnp.uint32),
                          compiler_params=triton_params(num_warps=warps, num_stages=1), interpret=interpret())(x)
    return jnp.sum(part, dtype=jnp.uint32)


def read_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """The best of several large streaming reads (bytes read per second), and which kernel got it: the
    honest bound for decode, which reads its weights and writes almost nothing."""
    n = nbytes // 4 // (1 << 16) * (1 << 16)
    xs = [jax.random.bits(jax.random.key(i), (n,), jnp.uint32) for i in range(2)]
    candidates = {
        "XLA full sum (uint32)": lambda x: jnp.sum(x, dtype=jnp.uint32),
        "XLA row sums (bf16 rows of 4096, float32)": lambda x: jnp.sum(
            jax.lax.bitcast_convert_type(x, jnp.bfloat16).reshape(-1, 4096).astype(jnp.float32), axis=-1),
        "XLA row max (uint32 rows of 8192)": lambda x: jnp.max(x.reshape(-1, 8192), axis=-1),
    }
    if jax.default_backend() == "gpu":  # (interpret mode elsewhere: no bandwidth to learn from)
        for blk, warps in ((1 << 14, 8), (1 << 16, 16)):
            candidates[f"Pallas block sums ({blk} words, {warps} warps)"] = functools.partial(_pallas_block_sum, blk=blk,
                                                                                             warps=warps)
    got = {}
    for name, fn in candidates.items():
        try:
            got[name] = 4 * n / _median_seconds(jax.jit(fn), xs, repeats) / 1e9
        except Exception as e:  # noqa: BLE001  (a kernel that does not build here is reported, not fatal)
            got[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    del xs
    if jax.default_backend() == "gpu":
        got["torch sum (float16 → float32, 20 back to back)"] = torch_read_bandwidth(4 * n, "cuda")
    ok = {k: v for k, v in got.items() if isinstance(v, float)}
    best = max(ok, key=ok.get)
    return {"read_GBps": ok[best], "read_kernel": best, "read_bytes": 4 * n, "reads": got}


_TORCH_READ = """
import sys, time, torch
nbytes, dev, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
a = torch.ones(nbytes // 2, dtype=torch.float16, device=dev)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for _ in range(3):
    a.sum(dtype=torch.float32)
sync()
t = time.perf_counter()
for _ in range(reps):
    a.sum(dtype=torch.float32)
sync()
print(a.numel() * 2 * reps / (time.perf_counter() - t) / 1e9)
"""


def torch_read_bandwidth(nbytes: int, device: str, repeats: int = 20) -> float | str:
    """GB/s of torch's read-only sum (the stream TEAL's gpt-fast runner measures), in a child process so
    torch's allocator never meets JAX's; a reason string where torch or the device is missing."""
    try:
        r = subprocess.run([sys.executable, "-c", _TORCH_READ, str(nbytes), device, str(repeats)],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {type(e).__name__}"
    if r.returncode:
        return f"failed: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1][:200]}"
    return float(r.stdout.split()[-1])


# ----------------------------------------------------------------------------- decode benchmark
NO_EOS = jnp.asarray([-1], jnp.int32)  # never sampled: every run decodes exactly --new tokens


def _fresh_state(graphdef, state, cfg, prompt_ids, max_len, cache_dtype, new):
    b = prompt_ids.shape[0]
    cache = init_cache(cfg, b, max_len, cache_dtype)
    logits, cache = prefill(graphdef, state, prompt_ids, cache)
    return DecodeState(
        cache=cache, logits=logits, tokens=jnp.zeros((b, new), jnp.int32),
        step=jnp.zeros((), jnp.int32), done=jnp.zeros((b,), bool), key=jax.random.key(0),
    )


def parse_configs(text: str) -> list[tuple[str, float]]:
    """``"larosa@0.4,topk@0.5"`` → [("dense", 0), ("larosa", 0.4), ("topk", 0.5)] (dense always first)."""
    out = [("dense", 0.0)]
    for c in (t.strip() for t in (text or "").split(",")):
        if not c or c == "dense":
            continue
        m, _, p = c.partition("@")
        try:
            pv = float(p)
        except ValueError:
            pv = -1.0
        if m not in BENCH_METHODS or not 0 < pv < 1:
            raise SystemExit(f"--configs: {c!r} is not METHOD@P with METHOD one of {', '.join(BENCH_METHODS)} and 0 < P < 1")
        out.append((m, pv))
    return out


# each bench method and the decode it runs (plan.KINDS)
KIND = {"dense": "dense", "topk": "topk", "teal": "teal", "larosa": "larosa", "larosa-a1": "larosa",
        "larosa-thr": "larosa-threshold"}
BENCH_METHODS = tuple(m for m in KIND if m != "dense")
THRESHOLDS = ("teal", "larosa-thr")  # thresholds calibrated on the prompt (no k)


def sparse_config(cfg: ModelConfig, method: str, p: float) -> SparseConfig:
    """larosa: the fused model, official α_rot, α_plain solved for effective = p; larosa-a1: the same
    with α_rot = 1 (where the official α_rot leaves no valid α_plain, e.g. p = 0.75); larosa-thr: the
    fused model with calibrated thresholds on its rotated rows (p at every site, like TEAL); topk: α = 1."""
    if method == "dense":
        return SparseConfig("dense")
    if method == "topk":
        return SparseConfig("topk", "faithful", p, "uniform")
    if method == "teal":
        return SparseConfig("teal", "faithful", p)
    if method == "larosa-thr":
        return SparseConfig("larosa", "fused", p, "uniform", select="threshold")
    a_rot = 1.0 if method == "larosa-a1" else SparseConfig("larosa", "fused", p).alphas()[0]
    return SparseConfig("larosa", "fused", p, (a_rot, alpha_plain_for(cfg, a_rot)))


def label(method: str, p: float) -> str:
    return "dense" if method == "dense" else f"{method}@{p:g}"


def bench_model(name: str, hf: dict, args, on_result=lambda r: None) -> list[dict]:
    """Every (config, batch) of ``args`` on one model shape; one result dict each (``on_result`` sees
    each as it completes, so a cut-off run keeps what it measured)."""
    cfg = ModelConfig.from_hf(hf, source=name)
    dtype = jnp.bfloat16
    configs = parse_configs(args.configs)
    bases = {}
    t0 = time.perf_counter()
    bases[False] = build_random(cfg, dtype)
    if any(m.startswith("larosa") for m, _ in configs):  # the fused model: adapters, untied head (random weights)
        bases[True] = build_random(cfg, dtype, seed=1, adapters=True)
    jax.block_until_ready([b[1] for b in bases.values()])
    t_build = time.perf_counter() - t0
    results = []
    dense_ms = {}
    for method, p in configs:
        graphdef0, state0, specs = bases[method.startswith("larosa")]
        sc = sparse_config(cfg, method, p)
        plan = plan_for(KIND[method], args.plan)
        teal = None
        if method in THRESHOLDS:
            base = nnx.merge(graphdef0, state0)
            thresholds, teal = teal_calibration(base, _prompt(cfg, 1, args.prompt), _prompt(cfg, 1, args.prompt, seed=1), p)
            m = SparseModel(base, sc, TealProjection(thresholds), plan)
            dims = site_dims(cfg)
            ks, eff = {s: int(round((1 - p) * dims[s])) for s in SITES}, m.effective_sparsity
        else:
            m = sparsify(nnx.merge(graphdef0, state0), None, sc, plan)
            ks, eff = (None, 0.0) if method == "dense" else (site_ks(cfg, sc), m.effective_sparsity)
        if args.mesh:  # tensor-parallel: each device keeps its shards only
            m = TensorParallel(shard_params(m, args.mesh), args.mesh)
        graphdef, state = nnx.split(m)
        for b in args.batches:
            res = time_decode(name, label(method, p), m, cfg, b, args)
            wbytes = weight_bytes_per_step(cfg, specs, ks)
            kvbytes = b * kv_bytes_per_step(cfg, args.prompt, args.new, jnp.dtype(dtype).itemsize)
            bw = args.bandwidth["read_GBps"] * 1e9
            roof_ms = (wbytes + kvbytes) / bw * 1e3
            ms_tok = res["ms_per_token"]
            res.update(model=name, config=label(method, p), method=method, sparsity=p, effective_sparsity=eff,
                       site_k=ks, batch=b, params=sum(int(np.prod(s)) for _, s, _ in specs), layers=cfg.num_layers,
                       hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=cfg.num_heads,
                       kv_heads=cfg.num_kv_heads, vocab=cfg.vocab_size, prompt=args.prompt, new_tokens=args.new,
                       weight_bytes_per_step=wbytes, kv_bytes_per_step_mean=kvbytes, roofline_ms_per_token=roof_ms,
                       pct_of_roofline=100 * roof_ms / ms_tok, build_seconds=t_build)
            if teal is not None:
                res["teal_realized"] = teal
            if method == "dense":
                dense_ms[b] = (ms_tok, wbytes + kvbytes)
            if b in dense_ms:
                res["speedup_vs_dense"] = dense_ms[b][0] / ms_tok
                res["ideal_speedup"] = dense_ms[b][1] / (wbytes + kvbytes)  # bytes ratio (per-token keep sets)
            print(f"{name} {label(method, p)} b={b}: {res['tokens_per_s']:.1f} tok/s/row, {ms_tok:.3f} ms/step, "
                  f"roofline {roof_ms:.3f} ({res['pct_of_roofline']:.1f}%)"
                  + (f", {res['speedup_vs_dense']:.3f}x dense (ideal {res['ideal_speedup']:.3f}x)"
                     if method != "dense" and "speedup_vs_dense" in res else ""), flush=True)
            want = [t.split(":") for t in (args.profile or "").split(",") if t]
            if b == args.batches[0] and any(w[0] in (name, "all") and (w[1:] or ["dense"])[0] == label(method, p) for w in want):
                res["profile"] = profile_decode(name, graphdef, state, cfg, b, args)
                dims = site_dims(cfg)
                keep = ({s: 1 - float(np.mean(teal[s])) for s in SITES} if teal is not None else
                        {s: ks[s] / dims[s] for s in SITES} if ks else dict.fromkeys(SITES, 1.0))
                res["profile"]["site_bytes_per_layer"] = site_bytes_per_layer(
                    cfg, jnp.dtype(dtype).itemsize, keep, adapters=method.startswith("larosa"))
            prompt_ids = _prompt(cfg, b, args.prompt)
            max_len = -(-(args.prompt + args.new) // 64) * 64
            if b == 1 and method == "dense" and args.step_check in (name, "all"):
                res["single_step_ms"] = single_step_ms(graphdef, state, cfg, prompt_ids, max_len, dtype, args)
                print(f"{name}: one forward step per jit call (async dispatch): {res['single_step_ms']:.3f} ms", flush=True)
            want_v = [t.split(":") for t in args.variants_model.split(",") if t]
            if args.variants and any(w[0] in (name, "all") and (w[1:] or ["dense"])[0] == label(method, p) for w in want_v):
                res["variants"] = decode_variants(name, m, cfg, prompt_ids, max_len, dtype, args, args.variants)
            results.append(res)
            on_result(res)
            jax.clear_caches()
        del state
    del bases
    return results


def _prompt(cfg: ModelConfig, batch: int, n: int, seed: int = 0) -> jax.Array:
    rng = np.random.RandomState(seed)
    return jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, n)), jnp.int32)


def teal_calibration(model, tokens, held, p: float) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """TEAL's thresholds for this (random) model: the p-quantile of |x| at every site and layer over
    the prompt ``tokens`` (γ applied, as TEAL compares), and the sparsity they give on ``held``
    tokens, per site and layer (decode tokens see their own)."""
    cfg = model.config
    graphdef, state = nnx.split(model)

    @jax.jit
    def quantiles(state, tokens, thresholds):
        got, frac = {s: [] for s in SITES}, {s: [] for s in SITES}

        def capture(site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
            out, keep = dense_projection(site, layer, x, linears, plan, gain=gain, prologue=prologue, residual=residual,
                                         raw=raw)
            a = jnp.abs(keep.x.astype(jnp.float32))  # the row the linears read (γ applied)
            got[site].append(jnp.quantile(a.reshape(-1), p))
            frac[site].append(jnp.mean(a <= thresholds[SITES.index(site), layer]))
            return out, keep

        nnx.merge(graphdef, state)(tokens, proj=capture)
        return {s: jnp.stack(v) for s, v in got.items()}, {s: jnp.stack(v) for s, v in frac.items()}

    none = jnp.zeros((len(SITES), cfg.num_layers), jnp.float32)
    th, _ = quantiles(state, tokens, none)
    th = {s: np.asarray(v) for s, v in th.items()}
    _, frac = quantiles(state, held, jnp.stack([jnp.asarray(th[s]) for s in SITES]))
    return th, {s: np.asarray(v).round(4).tolist() for s, v in frac.items()}


def plan_for(kind: str, edits: str | None) -> DecodePlan:
    """The decode plan a config runs: every kernel for its decode ``kind`` (``plan.KINDS``) on a GPU (none
    elsewhere: --tiny on a CPU times the jnp twins), with ``--plan``'s edits."""
    return DecodePlan.default(kind).edit(edits or "").check(kind)


def with_plan(m, plan: DecodePlan):
    """(graphdef, state) of model ``m`` (a model, or one wrapped for tensor parallelism) under ``plan``."""
    inner = getattr(m, "inner", m)
    saved, inner.plan = inner.plan, plan
    try:
        return nnx.split(m)
    finally:
        inner.plan = saved


def time_decode(name: str, what: str, m, cfg: ModelConfig, batch: int, args) -> dict:
    """Median seconds of one ``decode`` call of ``args.new`` tokens for ``batch`` rows (after a warm-up)."""
    dtype = jnp.bfloat16
    prompt_ids = _prompt(cfg, batch, args.prompt)
    max_len = -(-(args.prompt + args.new) // 64) * 64
    graphdef, state = nnx.split(m)

    def measure():
        run = functools.partial(decode, graphdef, state, eos=NO_EOS, pad_id=jnp.asarray(0, jnp.int32),
                                sampling=SamplingConfig(), steps=args.new)
        t0 = time.perf_counter()
        ds = _fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)
        jax.block_until_ready(ds)
        t_prefill_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run(ds)  # warm-up: compiles and runs the same shapes
        jax.block_until_ready(out)
        t_warm = time.perf_counter() - t0
        assert int(out.step) == args.new, f"decoded {int(out.step)} tokens, expected {args.new}"
        first_tokens = np.asarray(out.tokens[0, :8]).tolist()
        del out
        times = []
        for _ in range(args.repeats):
            ds = _fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)
            jax.block_until_ready(ds)
            t0 = time.perf_counter()
            out = run(ds)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            assert int(out.step) == args.new
            del out
        return t_prefill_first, t_warm, first_tokens, times

    plan, pallas_error = getattr(m, "inner", m).plan, None
    try:
        t_prefill_first, t_warm, first_tokens, times = measure()
    except Exception as e:  # noqa: BLE001  (a kernel that does not build here: measure the jnp path, say so)
        pallas_error = f"{type(e).__name__}: {str(e)[:1500]}"
        print(f"{name} {what}: the plan's kernels failed ({pallas_error[:500]}); retrying without kernels", flush=True)
        plan = DecodePlan.reference()
        graphdef, state = with_plan(m, plan)
        jax.clear_caches()
        t_prefill_first, t_warm, first_tokens, times = measure()
    t = statistics.median(times)
    return {"cache_slots": max_len, "decode_seconds": times, "median_seconds": t, "tokens_per_s": args.new / t,
            "ms_per_token": t / args.new * 1e3, "first_prefill_seconds": t_prefill_first, "warmup_decode_seconds": t_warm,
            "first_tokens": first_tokens, "plan": plan.describe(), "pallas_error": pallas_error}


def single_step_ms(graphdef, state, cfg, prompt_ids, max_len, dtype, args) -> float:
    """Time per token when every step is its own jit call (no while_loop)."""

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def step(state, tok, cache):
        model = nnx.merge(graphdef, state)
        logits, cache = model(tok, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

    ds = _fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)
    tok, cache = jnp.zeros((1, 1), jnp.int32), ds.cache
    tok, cache = step(state, tok, cache)
    jax.block_until_ready(cache)
    n = min(args.new - 1, 64)
    t0 = time.perf_counter()
    for _ in range(n):
        tok, cache = step(state, tok, cache)
    jax.block_until_ready((tok, cache))
    return (time.perf_counter() - t0) / n * 1e3


def profile_decode(name, graphdef, state, cfg, batch, args) -> dict:
    """Trace one decode call and sum the GPU kernel time per kernel name (per decode step)."""
    dtype = jnp.bfloat16
    prompt_ids = _prompt(cfg, batch, args.prompt)
    max_len = -(-(args.prompt + args.new) // 64) * 64
    run = functools.partial(decode, graphdef, state, eos=NO_EOS, pad_id=jnp.asarray(0, jnp.int32),
                            sampling=SamplingConfig(), steps=args.new)
    jax.block_until_ready(run(_fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)))  # compile
    ds = _fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)
    jax.block_until_ready(ds)
    summary = kernel_profile(lambda: jax.block_until_ready(run(ds)), args.new, scopes=(*SITES, "attention"))
    print_profile(name, summary)
    return summary


# ----------------------------------------------------------------------------- diagnostics
def parse_variants(text: str | None, kinds, edits: str | None) -> list[str]:
    """``--variants``: ``;``-separated plan edits (each checked for every decode kind it will run with,
    after ``--plan``'s), or ``nograph`` (the config's plan, XLA command buffers off)."""
    out = [v.strip() for v in (text or "").split(";") if v.strip()]
    for v in out:
        if v == "nograph":
            continue
        for kind in kinds:
            try:
                plan_for(kind, edits).edit(v).check(kind)
            except PlanError as e:
                raise SystemExit(f"--variants {v!r} for a {kind} decode: {e}") from None
    return out


def decode_variants(name, m, cfg, prompt_ids, max_len, dtype, args, variants) -> dict:
    """The whole decode call under other plans (A/B against the config's): each variant a plan edit of
    the config's plan (e.g. ``adapter=tail``, ``*.gemv=masked``, ``kernels=off``), or ``nograph``
    (the same plan, XLA command buffers (CUDA graphs) off)."""
    base = getattr(m, "inner", m).plan
    opts_for = {"nograph": {"xla_gpu_enable_command_buffer": ""}}
    out = {}
    for v in variants:
        jax.clear_caches()
        inner = getattr(m, "inner", m)
        kind = decode_kind(inner.sparse, inner.base.adapters is not None)
        graphdef, state = with_plan(m, base if v == "nograph" else base.edit(v).check(kind))
        try:
            ds = _fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)
            kw = dict(sampling=SamplingConfig(), steps=args.new)
            pad = jnp.asarray(0, jnp.int32)
            lowered = decode.lower(graphdef, state, ds, NO_EOS, pad, **kw)
            opts = opts_for.get(v)
            c = lowered.compile(compiler_options=opts) if opts else lowered.compile()
            res = c(state, ds, NO_EOS, pad)
            jax.block_until_ready(res)
            toks = np.asarray(res.tokens[0, :8]).tolist()
            ts = []
            for _ in range(3):
                ds = _fresh_state(graphdef, state, cfg, prompt_ids, max_len, dtype, args.new)
                jax.block_until_ready(ds)
                t0 = time.perf_counter()
                jax.block_until_ready(c(state, ds, NO_EOS, pad))
                ts.append(time.perf_counter() - t0)
            ms = statistics.median(ts) / args.new * 1e3
            out[v] = {"ms_per_token": ms, "seconds": ts, "first_tokens": toks}
            print(f"{name} variant {v}: {ms:.3f} ms/token, first tokens {toks}", flush=True)
        except Exception as e:  # noqa: BLE001
            out[v] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
            print(f"{name} variant {v}: ERROR {out[v]['error']}", flush=True)
    jax.clear_caches()
    return out


# ----------------------------------------------------------------------------- output
_VARIANT_LABEL = {"kernels=off": "no kernels (jnp twins, XLA)", "nograph": "the plan, no CUDA graphs"}


def markdown(meta: dict, results: list[dict]) -> str:
    everything = results
    results = [r for r in results if r.get("method", "dense") == "dense" and r.get("batch", 1) == 1]
    lines = [
        "# Decode throughput",
        "",
        f"Device: {meta['device']}; jax {meta['jax']} (jaxlib {meta['jaxlib']}), flax {meta['flax']}; {meta['date']}.",
        f"Random bf16 weights, bf16 KV cache, prompt {meta['prompt']} tokens, {meta['new']} new tokens decoded by one "
        f"`lax.while_loop` jit (`larosa_jax.generate.decode`); median of {meta['repeats']} timed calls after a warm-up.",
        f"Roofline: (weights read per step incl. lm_head + mean live KV cache) / read bandwidth "
        f"{meta['bandwidth']['read_GBps']:.0f} GB/s (the best of several streaming reads in the same run: "
        f"{meta['bandwidth']['read_kernel']}; device-to-device copy {meta['bandwidth']['copy_GBps']:.0f} GB/s read + write).",
        f"Decode plan: every kernel for the method{' with `' + meta['plan_edits'] + '`' if meta.get('plan_edits') else ''} "
        "(each row's plan is in the JSON); the variant columns edit it.",
        "",
        "| model | weights GB/step | KV MB/step | tokens/s | ms/token | roofline ms/token | % of roofline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['weight_bytes_per_step'] / 1e9:.2f} | {r['kv_bytes_per_step_mean'] / 1e6:.0f} | "
            f"{r['tokens_per_s']:.1f} | {r['ms_per_token']:.3f} | {r['roofline_ms_per_token']:.3f} | "
            f"{r['pct_of_roofline']:.1f} |"
        )
    var = [r for r in everything if r.get("variants")]
    if var:
        names = sorted({v for r in var for v in r["variants"]})
        lines += ["", "Same decode call under other plans (plan edits; ms/token, % of roofline):", "",
                  "| model | config | batch | default (all kernels) | " + " | ".join(_VARIANT_LABEL.get(n, n) for n in names) + " |",
                  "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
        for r in var:
            cells = []
            for n in names:
                v = r["variants"].get(n, {})
                cells.append(f"{v['ms_per_token']:.3f} ({100 * r['roofline_ms_per_token'] / v['ms_per_token']:.1f}%)"
                             if "ms_per_token" in v else "error" if v else "")
            lines.append(f"| {r['model']} | {r.get('config', 'dense')} | {r.get('batch', 1)} | {r['ms_per_token']:.3f} "
                         f"({r['pct_of_roofline']:.1f}%) | "
                         + " | ".join(cells) + " |")
    sparse = [r for r in everything if r.get("method", "dense") != "dense" or r.get("batch", 1) != 1]
    if sparse:
        lines += ["", "Sparse decode (random bf16 weights; `larosa` = the fused model with d × d adapters, `topk` = no "
                  "rotation, no adapters, `teal` = TEAL's magnitude thresholds calibrated on the prompt, no selection; its realized "
                  "sparsity on a second prompt is listed below). Speed-up is against dense at the same batch in this run; ideal = dense bytes "
                  "per step / sparse bytes per step (kept weight rows, adapters, lm_head, KV cache), for per-token keep sets.", "",
                  "| model | config | effective sparsity | batch | ms/step | tokens/s | speed-up vs dense | ideal | % of roofline |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sparse:
            sp = r.get("speedup_vs_dense")
            lines.append(f"| {r['model']} | {r['config']} | {r['effective_sparsity']:.3f} | {r['batch']} | {r['ms_per_token']:.3f} | "
                         f"{r['batch'] * r['tokens_per_s']:.1f} | " + (f"{sp:.3f}x | {r['ideal_speedup']:.3f}x" if sp else " | ")
                         + f" | {r['pct_of_roofline']:.1f} |")
    teal = [r for r in everything if r.get("teal_realized")]
    if teal:
        lines += ["", "TEAL thresholds on a second random prompt (fraction of entries at or under the threshold; "
                  "mean, min and max over layers):", "", "| model | config | " + " | ".join(SITES) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in SITES) + " |"]
        for r in teal:
            fr = r["teal_realized"]
            lines.append(f"| {r['model']} | {r['config']} | " + " | ".join(
                f"{np.mean(fr[s]):.3f} ({min(fr[s]):.3f}-{max(fr[s]):.3f})" for s in SITES) + " |")
    prof = [r for r in everything if r.get("profile", {}).get("top")]
    for r in prof:
        pr = r["profile"]
        lines += ["", f"Where the time goes: {r['model']} {r['config']} batch {r['batch']} (jax.profiler trace of one decode "
                  f"call; per step: GPU span {pr['span_ms_per_step']:.3f} ms, busy {pr['busy_ms_per_step']:.3f} ms, "
                  f"{pr['kernels_per_step']:.0f} kernels). Top kernels:", "",
                  "| µs/step | calls/step | µs/call | kernel |", "| ---: | ---: | ---: | --- |"]
        for t in pr["top"][:15]:
            lines.append(f"| {t['us_per_step']:.1f} | {t['count_per_step']:.1f} | {t['us_per_call']:.2f} | `{t['kernel'][:90]}` |")
        lines += site_table(r, meta)
    lines.append("")
    cfgs = sorted({r["config"] for r in everything if r.get("config", "dense") != "dense"})
    lines.append("Reproduce: `python eval/bench_decode.py --models " + ",".join(dict.fromkeys(r["model"] for r in everything))
                 + f" --prompt {meta['prompt']} --new {meta['new']}"
                 + (f" --configs {','.join(cfgs)} --batch {meta.get('batches', '1')}" if cfgs else "") + " --out <prefix>`")
    return "\n".join(lines) + "\n"


def site_table(r: dict, meta: dict) -> list[str]:
    """Markdown rows: each site's kernels of one layer (the trace's time per step over the layers), the bytes it
    reads and the bandwidth that makes, against the run's best streaming read; none if the trace named no site."""
    pr, layers = r["profile"], r["layers"]
    scopes, nbytes = pr.get("scopes") or {}, pr.get("site_bytes_per_layer") or {}
    if not any(sc in scopes for sc in SITES):
        return []
    bw = meta["bandwidth"]["read_GBps"]
    nbytes = {**nbytes, "attention": r["kv_bytes_per_step_mean"] / layers}  # the live KV cache
    out = ["", f"The four sites and attention of one layer ({r['config']}, from the same trace; bytes: kept weight rows, "
           f"La RoSA's adapter in down; bandwidth against the run's read bandwidth {bw:.0f} GB/s):", "",
           "| site | kernels / layer | µs / layer | MB read / layer | GB/s | % of read bandwidth |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for sc in (*SITES, "attention", "None"):
        if sc not in scopes:
            continue
        k, us = scopes[sc]["kernels_per_step"] / layers, scopes[sc]["us_per_step"] / layers
        mb, gbs = nbytes.get(sc), None
        if mb is not None and us > 0:
            gbs = mb / (us * 1e-6) / 1e9
        out.append(f"| {sc if sc != 'None' else 'other (per step / layers)'} | {k:.1f} | {us:.1f} | "
                   + ("-" if mb is None else f"{mb / 1e6:.2f}") + " | " + ("-" if gbs is None else f"{gbs:.0f}")
                   + " | " + ("-" if gbs is None else f"{100 * gbs / bw:.0f}") + " |")
    return out


def plot(results: list[dict], path: str) -> None:
    """Speed-up over dense against effective sparsity, one line per (model, method, batch), with 1/(1-s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.get("speedup_vs_dense") and r["method"] != "dense"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    s = np.linspace(0, 0.8, 50)
    ax.plot(s, 1 / (1 - s), "k--", label="ideal 1/(1-s), weights only")
    for key in sorted({(r["model"], r["method"], r["batch"]) for r in rows}):
        pts = sorted((r["effective_sparsity"], r["speedup_vs_dense"]) for r in rows if (r["model"], r["method"], r["batch"]) == key)
        ax.plot(*zip(*([(0.0, 1.0)] + pts)), "o-", label=f"{key[0]} {key[1]} b={key[2]}")
    ax.set_xlabel("effective sparsity")
    ax.set_ylabel("decode speed-up over dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b,qwen2-7b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="path prefix for <prefix>.json and <prefix>.md")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke test")
    ap.add_argument("--bw-bytes", type=float, default=4e9, help="bytes per buffer of the copy-bandwidth test")
    ap.add_argument("--configs", default="", help="comma list of larosa@P / topk@P to decode besides dense")
    ap.add_argument("--batch", default="1", help="comma list of batch sizes")
    ap.add_argument("--mesh", default=None, metavar="data=D,model=M", help="tensor-parallel decode over the local devices")
    ap.add_argument("--profile", default=None,
                    help="comma list of MODEL[:CONFIG] (MODEL may be 'all', CONFIG defaults to dense) to trace one decode call of")
    ap.add_argument("--step-check", default=None, help="model name (or 'all'): also time one jit call per token")
    ap.add_argument("--plan", default=None, metavar="EDITS",
                    help="decode plan edits applied to every config, e.g. 'adapter=tail,*.gemv=masked' (larosa_jax/plan.py)")
    ap.add_argument("--variants", default=None, metavar="EDITS;EDITS",
                    help="';'-separated plan edits (or nograph) to time beside each chosen config's plan (decode A/B)")
    ap.add_argument("--variants-model", default="all",
                    help="comma list of MODEL[:CONFIG] (or 'all'; CONFIG defaults to dense) for --variants, at every --batch")
    ap.add_argument("--dump", action="store_true", help="dump XLA's HLO of the decode jit (to $OUT as a .tgz)")
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for n in names:
        if n not in HF_CONFIGS:
            ap.error(f"unknown model {n!r}; known: {', '.join(HF_CONFIGS)}")
    if args.tiny:
        args.bw_bytes = min(args.bw_bytes, 64e6)
    try:
        args.batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error(f"--batch {args.batch!r}: expected a comma list of integers")
    for n in names:  # every (model, config) must have valid k at every site before minutes of benchmarking
        cfg = ModelConfig.from_hf(tiny(HF_CONFIGS[n]) if args.tiny else HF_CONFIGS[n], source=n)
        for method, p in parse_configs(args.configs):
            if method in THRESHOLDS:  # thresholds, no k
                continue
            try:
                site_ks(cfg, sparse_config(cfg, method, p))
            except SparsityError as e:
                ap.error(f"--configs {label(method, p)} on {n}: no α_plain gives effective sparsity {p:g} with "
                         f"{'α_rot = 1' if method == 'larosa-a1' else 'the official α_rot'} ({e}); try larosa-a1@{p:g}")
    configs = parse_configs(args.configs)
    try:
        for m, _ in configs:
            plan_for(KIND[m], args.plan)
    except PlanError as e:
        ap.error(f"--plan {args.plan!r}: {e}")
    want_v = [t.split(":") for t in args.variants_model.split(",") if t]
    args.variants = parse_variants(args.variants, {KIND[m] for m, p in configs if any(
        (w[1:] or ["dense"])[0] == label(m, p) for w in want_v)}, args.plan)
    args.mesh = make_mesh(args.mesh) if args.mesh else None

    dev = jax.devices()[0]
    import flax
    import jaxlib

    meta = {
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "flax": flax.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "prompt": args.prompt, "new": args.new, "repeats": args.repeats, "tiny": args.tiny, "batches": args.batch,
        "configs": args.configs, "mesh": None if args.mesh is None else dict(args.mesh.shape),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "plan_edits": args.plan or "",
        "batch1_tiles": {"narrow": list(NARROW_TILE), "wide": list(WIDE_TILE), "narrow_up_to": NARROW},
    }
    print(json.dumps({k: meta[k] for k in ("device", "platform", "jax", "jaxlib", "flax", "python")}), flush=True)
    bw = {**copy_bandwidth(int(args.bw_bytes)), **read_bandwidth(int(args.bw_bytes))}
    meta["bandwidth"] = bw
    args.bandwidth = bw
    print(f"read bandwidth {bw['read_GBps']:.0f} GB/s ({bw['read_kernel']}; all: "
          + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in bw["reads"].items())
          + f"); copy {bw['copy_GBps']:.0f} GB/s (read+write)", flush=True)

    outs = []
    if args.out:
        outs.append(Path(args.out))
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / Path(args.out or "dense_decode").name)

    def write(doc, md):
        for o in outs:
            o.parent.mkdir(parents=True, exist_ok=True)
            for suffix, text in ((".json", json.dumps(doc, indent=1, default=str) + "\n"), (".md", md)):
                tmp = Path(str(o) + suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(Path(str(o) + suffix))  # atomic: a cut-off run never leaves half a file
            try:
                plot(doc["results"], str(o) + ".png")
            except Exception as e:  # noqa: BLE001  (a plot is not worth losing the numbers)
                print(f"plot failed: {e}")

    results = []

    def save(res):
        results.append(res)
        write({"meta": meta, "results": results}, markdown(meta, results))

    for n in names:
        hf = tiny(HF_CONFIGS[n]) if args.tiny else HF_CONFIGS[n]
        bench_model(n, hf, args, on_result=save)
        jax.clear_caches()
    doc = {"meta": meta, "results": results}
    md = markdown(meta, results)
    print()
    print(md)
    if DUMP_DIR and os.environ.get("OUT") and os.path.isdir(DUMP_DIR):
        with tarfile.open(os.path.join(os.environ["OUT"], "xla_dump_decode.tgz"), "w:gz") as tf:
            for f in sorted(glob.glob(os.path.join(DUMP_DIR, "*"))):
                if "after_optimizations" in f or "buffer-assignment" in f:
                    tf.add(f, arcname=os.path.basename(f))
    return doc


if __name__ == "__main__":
    main()
