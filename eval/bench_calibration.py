"""Calibration time on the device: random bf16 weights at a real model shape, N × T random tokens.

    python eval/bench_calibration.py --model llama2-7b --samples 16 --seqlen 2048 --batch 8 \
        --out eval/results/calibration_h100
    python eval/bench_calibration.py --tiny        # CPU smoke test

Times the whole ``larosa_jax.calibration.calibrate`` call (layer-by-layer streaming, H accumulation,
quantiles, eigh; a first call on a 1-layer model of the same width compiles the step and eigh),
and reports the eigh share and peak device memory where the backend reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from larosa_jax.calibration import calibrate  # noqa: E402
from larosa_jax.config import ModelConfig  # noqa: E402
from larosa_jax.evaluate import environment  # noqa: E402
from larosa_jax.models.random_init import random_model  # noqa: E402
from larosa_jax.parallel import make_mesh  # noqa: E402

SHAPES = {
    "llama2-13b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "llama2-7b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "tiny": {"architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 200,
             "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 300,
             "max_position_embeddings": 256},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b", choices=list(SHAPES))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--flavour", default="fused")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--mesh", default=None, metavar="data=D", help="data-parallel calibration (default: one device)")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.samples, args.seqlen, args.batch = "tiny", 4, 64, 2
    cfg = ModelConfig.from_hf(SHAPES[args.model], source=args.model)
    t0 = time.time()
    model = random_model(cfg, jnp.bfloat16)
    jax.block_until_ready(nnx.state(model))
    t_build = time.time() - t0
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.samples, args.seqlen), dtype=np.int32)

    # warm-up: same width, one layer — compiles the block step, the embedding gather and eigh
    small = dataclasses.replace(cfg, num_layers=1)
    mesh = make_mesh(args.mesh, cfg=cfg) if args.mesh else None
    calibrate(random_model(small, jnp.bfloat16), windows, flavour=args.flavour, batch_size=args.batch, progress=False,
              mesh=mesh)

    t0 = time.time()
    stats = calibrate(model, windows, flavour=args.flavour, batch_size=args.batch, mesh=mesh)
    total = time.time() - t0
    q = stats.rotations
    orth = float(max(np.abs(qi.T @ qi - np.eye(cfg.hidden_size)).max() for qi in q))
    mem = {}
    try:
        mem = {k: int(v) for k, v in jax.devices()[0].memory_stats().items() if "peak" in k or "limit" in k}
    except Exception:  # noqa: BLE001 (CPU backends report nothing)
        pass
    res = {
        "model": args.model, "layers": cfg.num_layers, "hidden": cfg.hidden_size, "dtype": "bfloat16",
        "mesh": args.mesh or "one device", "samples": args.samples, "seqlen": args.seqlen, "tokens": args.samples * args.seqlen, "batch": args.batch,
        "flavour": args.flavour, "seconds_total": total, "seconds_eigh": float(stats.metadata["eigh_seconds"]),
        "seconds_build_weights": t_build, "max_orthogonality_error": orth, "memory": mem, "env": environment(),
    }
    print(json.dumps(res, indent=2))
    md = (f"# Calibration time\n\n{res['env']['device']}, jax {res['env']['jax']}, {res['env']['date']}.\n\n"
          f"| model shape | mesh | tokens | batch | flavour | total s | eigh s | max ‖QᵀQ−I‖ | peak device memory |\n"
          f"| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |\n"
          f"| {args.model} (random bf16) | {res['mesh']} | {res['tokens']} ({args.samples} × {args.seqlen}) | {args.batch} | "
          f"{args.flavour} | {total:.1f} | {res['seconds_eigh']:.1f} | {orth:.1e} | "
          f"{mem.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB |\n")
    for d in filter(None, [args.out and str(Path(args.out).parent), os.environ.get("OUT")]):
        Path(d).mkdir(parents=True, exist_ok=True)
        stem = Path(args.out).name if args.out else "calibration"
        (Path(d) / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (Path(d) / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
