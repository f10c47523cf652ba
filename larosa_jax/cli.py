"""``larosa`` command line: convert | generate | calibrate | search | fuse | ppl | frontier | tune | zeroshot | demo.

Errors the user can fix (bad paths, bad configs, bad values) print one line and exit 2. Every
numeric flag is range-checked before any work, then each command checks what depends on the model's
config (read from config.json alone), its outputs (:mod:`larosa_jax.outputs`) and its inputs before it
loads the model.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "assets"


class UsageError(ValueError):
    """A flag value outside its range, with the flag, the value and the allowed range."""


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


# flag dest → (lowest, highest) for integer flags; checked for every command that has the flag
INT_RANGES = {
    "samples": (1, 1 << 20), "seqlen": (2, 1 << 24), "batch": (1, 1 << 16), "seed": (0, 2**32 - 1),
    "max_new_tokens": (1, 1 << 20), "points": (1, 1000), "calib_samples": (1, 1 << 20), "limit": (1, 1 << 40),
    "max_length": (2, 1 << 24), "prompt_len": (1, 1 << 20), "new": (1, 1 << 20), "repeats": (1, 1000),
}
DTYPE_NAMES = ("bfloat16", "float32", "float16")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args) -> None:
    """Range checks of every numeric flag, before any work: one line naming flag, value and range."""
    for dest, (lo, hi) in INT_RANGES.items():
        v = getattr(args, dest, None)
        if v is not None and not lo <= v <= hi:
            extra = " (or leave it out for all)" if dest == "limit" else ""
            raise UsageError(f"{_flag(dest)} {v}: must be an integer in [{lo}, {hi}]{extra}")
    t = getattr(args, "temperature", None)
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise UsageError(f"--temperature {t}: must be a finite number >= 0 (0: greedy)")
    tp = getattr(args, "top_p", None)
    if tp is not None and not 0 < tp <= 1:
        raise UsageError(f"--top-p {tp}: must be in (0, 1]")
    sp = getattr(args, "sparsity", None)
    for p in (sp if isinstance(sp, list) else [sp] if isinstance(sp, float) else []):
        if not 0 <= p < 1:  # NaN fails too
            raise UsageError(f"--sparsity {p}: must be in [0, 1)")
    if isinstance(sp, list) and not sp:
        raise UsageError("--sparsity is empty: give one or more values in [0, 1)")
    dt = getattr(args, "dtype", None)
    if dt is not None and dt not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dt}: expected one of {', '.join(DTYPE_NAMES)}")


def checkpoint_config(ckpt):
    """The ModelConfig of a checkpoint from its config.json alone (validated; nothing allocated)."""
    from .checkpoint import read_config

    return read_config(ckpt)[0]


def _check_seqlen(args, cfg) -> None:
    if args.seqlen > cfg.max_position_embeddings:
        raise UsageError(f"--seqlen {args.seqlen}: must be in [2, {cfg.max_position_embeddings}] "
                         f"(the model's max_position_embeddings)")


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint (dir, hub id or .gguf) to a larosa checkpoint")
    p.add_argument("--model", required=True, help="local HF directory, hub id (owner/name) or .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", help=f"one of {', '.join(DTYPE_NAMES)}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> None:
    from .checkpoint import convert

    out = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a converted checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="cast weights on load (default: as stored)")
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="tensor-parallel decode; default with several devices: all of them on model")
    g = p.add_argument_group("sparse decoding (default: the config a fused checkpoint records, else dense)")
    g.add_argument("--sparse-config", default=None, metavar="JSON", help="a config saved by larosa tune --out")
    g.add_argument("--method", default=None, help="dense, topk, teal, cats or larosa")
    g.add_argument("--sparsity", type=float, default=None, help="nominal p in [0, 1)")
    g.add_argument("--mode", default="fused", choices=["faithful", "fused"], help="larosa mode (default %(default)s)")
    g.add_argument("--select", default="topk", choices=["topk", "threshold"],
                   help="larosa fused: per-token Top-K or calibrated thresholds (default %(default)s)")
    g.add_argument("--weighted", action="store_true",
                   help="weight-aware selection: rank, or threshold, |a_i|·‖W_i‖ (topk, larosa fused)")
    g.add_argument("--rotations", default=None, help="directory from larosa calibrate (larosa, teal, cats need it)")
    p.set_defaults(func=cmd_generate)


def _sparse_config(args):
    """The SparseConfig the generate flags ask for (None: dense), checked before the model loads."""
    from .sparsity import SparseConfig

    if args.sparse_config and args.method:
        raise UsageError("--sparse-config and --method exclude each other (the file holds the method)")
    if args.sparse_config:
        return SparseConfig.load(args.sparse_config)
    if args.method is None:
        if args.sparsity is not None:
            raise UsageError("--sparsity needs --method (e.g. --method larosa --rotations DIR)")
        return None
    if args.sparsity is None and args.method != "dense":
        raise UsageError(f"--method {args.method} needs --sparsity P")
    return SparseConfig(args.method, args.mode if args.method == "larosa" else "faithful", args.sparsity or 0.0,
                        select=args.select, weighted=args.weighted)


def cmd_generate(args) -> None:
    import jax

    from .calibration import CalibrationStats
    from .checkpoint import load, load_tokenizer, read_config
    from .generate import generate
    from .parallel import TensorParallel, make_mesh
    from .sparse_model import sparsify

    cfg = checkpoint_config(args.ckpt)
    if args.max_new_tokens >= cfg.max_position_embeddings:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be in [1, {cfg.max_position_embeddings - 1}] "
                         "(the model's max_position_embeddings, less one prompt token)")
    sc = _sparse_config(args)
    block = read_config(args.ckpt)[1].get("sparse") if sc is None else None
    if block is not None:
        from .sparse_model import read_record

        read_record(block, args.ckpt)  # a stale record fails before the weights load
    needs = sc is not None and sc.sparsity > 0 and (sc.method in ("teal", "cats") or sc.method == "larosa"
                                                     and (sc.mode == "faithful" or sc.select == "threshold"
                                                          or not read_config(args.ckpt)[1].get("fused")))
    if needs and args.rotations is None:
        raise UsageError(f"--method {sc.method} ({sc.mode}, {sc.select}) needs --rotations DIR (from larosa calibrate)")
    stats = CalibrationStats.load(args.rotations) if args.rotations and sc is not None else None
    spec = args.mesh or (f"model={len(jax.devices())}" if len(jax.devices()) > 1 else None)
    mesh = make_mesh(spec, cfg=cfg) if spec else None
    tok = load_tokenizer(args.ckpt)
    model = load(args.ckpt, dtype=args.dtype, mesh=mesh)  # each device reads only its shard
    if sc is not None:
        model = sparsify(model, stats, sc)
    elif block is not None:
        from .sparse_model import from_record

        model = from_record(model, block, args.ckpt)
        print(f"[the checkpoint's sparse config: {block['config']}]", flush=True)
    if mesh is not None:
        model = TensorParallel(model, mesh)
    stream = _Streamer(tok, args.prompt) if len(args.prompt) == 1 else None
    t = {}
    out = generate(
        model, args.prompt, tokenizer=tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, on_tokens=stream, timings=t,
    )
    if stream is not None:
        print()
    else:
        for prompt, ids in zip(args.prompt, out):
            print(f"--- {prompt}{tok.decode(ids, skip_special_tokens=True)}")
    eff = getattr(getattr(model, "inner", model), "effective_sparsity", 0.0)
    print(f"[prompt {t['prompt_tokens']} tokens {t['prompt_tokens'] / t['prefill_s']:.1f} tok/s, decode {t['new_tokens']} "
          f"tokens {t['new_tokens'] / t['decode_s']:.1f} tok/s (compiles included), effective sparsity {eff:.3f}, "
          f"{jax.devices()[0].platform}]")


class _Streamer:
    """Prints the new text of a single prompt as chunks of tokens arrive."""

    def __init__(self, tok, prompts):
        self.tok, self.shown = tok, ""
        print(prompts[0], end="", flush=True)

    def __call__(self, ids) -> None:
        text = self.tok.decode(ids[0].tolist(), skip_special_tokens=True)
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def _add_data_args(p, samples: int, seqlen: int):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="wikitext2", help="wikitext2 (through datasets; needs the hub)")
    g.add_argument("--data-file", default=None, help="local text file instead (offline)")
    g.add_argument("--samples", type=int, default=samples)
    g.add_argument("--seqlen", type=int, default=seqlen)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=1, help="windows per step (split over the mesh's data axis)")
    _add_mesh(p)


def _add_mesh(p):
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh; default: every local device on data (data-parallel windows)")


def _mesh(args, cfg):
    from .parallel import make_mesh

    return make_mesh(args.mesh, cfg=cfg)


def _text_ids(args, tok, split: str):
    """(token ids, source description) of ``--data`` / ``--data-file``."""
    from . import data

    text, source = data.load_text(args.data, args.data_file, split=split)
    return data.tokenize(tok, text), source


def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="La RoSA calibration: rotations Q_l and baseline thresholds")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--flavour", default="fused", choices=["faithful", "fused", "joint", "global", "identity"],
                   help="what Q_l diagonalises: faithful = the covariance of norm(h)·γ (the paper's simulation); fused = "
                        "of norm(h) (γ-free, foldable); joint = both rotated sites' covariances, γ-scaled and γ-free "
                        "(the fused model's best Q); global = one Q for all layers (no adapters); identity = Q = I (La RoSA's "
                        "γ-free selection and site split, no rotation). Default: %(default)s")
    p.add_argument("--out", required=True, help="directory for rotations.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing rotations directory (its alpha.json goes with it)")
    _add_data_args(p, 16, 2048)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> None:
    from . import data, outputs
    from .calibration import ROTATIONS, calibrate
    from .checkpoint import load, load_tokenizer

    cfg = checkpoint_config(args.ckpt)
    _check_seqlen(args, cfg)
    outputs.check_target(args.out, ROTATIONS, overwrite=args.overwrite, inputs=(args.ckpt,))
    mesh = _mesh(args, cfg)
    ids, source = _text_ids(args, load_tokenizer(args.ckpt), "train")
    win = data.calibration_windows(ids, args.samples, args.seqlen, args.seed, source=source)
    model = load(args.ckpt)
    stats = calibrate(model, win, flavour=args.flavour, batch_size=args.batch, data_source=source, seed=args.seed,
                      model_source=str(args.ckpt), mesh=mesh)
    stats.metadata["data_fingerprint"] = data.fingerprint(ids)  # search keeps its held-out windows off this text
    path = stats.save(args.out, overwrite=args.overwrite)
    ev = stats.eigenvalues
    print(f"wrote {path}: {len(ev)} layers, flavour {args.flavour}, {stats.metadata['tokens']} tokens from {source}, "
          f"{stats.metadata['seconds']} s; eigenvalue spread (max/median) per layer: "
          + " ".join(f"{e.max() / np.median(e):.0f}" for e in ev))


def _add_search(sub):
    p = sub.add_parser("search", help="α grid search (paper's Algorithm 1) on held-out calibration windows")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rotations", required=True, help="directory written by larosa calibrate")
    p.add_argument("--sparsity", type=_csv(float), required=True, help="one or more, e.g. 0.25,0.4,0.5")
    p.add_argument("--mode", default="faithful", choices=["faithful", "fused"])
    p.add_argument("--points", type=int, default=9, help="grid points over α_rot")
    _add_data_args(p, 4, 2048)
    p.add_argument("--calib-samples", type=int, default=None,
                   help="windows used by calibrate (default: as recorded in the rotations file)")
    p.set_defaults(func=cmd_search)


def _calibration_spans(stats, args, ids, source) -> list[tuple[int, int]]:
    """Token ranges the rotations were calibrated on, if that was this text (else none)."""
    from . import data

    meta = stats.metadata
    same = meta["data_fingerprint"] == data.fingerprint(ids) if "data_fingerprint" in meta else meta.get("data_source") == source
    if not same:
        return []
    recorded = meta.get("samples")
    if args.calib_samples is not None and recorded is not None and int(recorded) != args.calib_samples:
        raise UsageError(f"--calib-samples {args.calib_samples}: the rotations file records {recorded} calibration "
                         "windows; leave the flag out")
    n = args.calib_samples if recorded is None else int(recorded)
    if n is None or meta.get("seqlen") is None:
        raise UsageError(f"{args.rotations}: calibrated on this text, but records no samples/seqlen to keep the "
                         "held-out windows off; pass --calib-samples and calibrate again")
    return data.window_spans(len(ids), n, int(meta["seqlen"]), int(meta.get("seed", 0)))


def cmd_search(args) -> None:
    from . import data
    from .calibration import CalibrationStats
    from .checkpoint import load, load_tokenizer
    from .search import alpha_grid, check_alpha_file, search_alpha, store_alpha
    from .sparsity import SparseConfig

    for p in args.sparsity:  # refuse bad p before loading anything
        SparseConfig("larosa", args.mode, p)
    cfg = checkpoint_config(args.ckpt)
    _check_seqlen(args, cfg)
    for p in args.sparsity:
        alpha_grid(cfg, p, args.points)
    stats = CalibrationStats.load(args.rotations)
    check_alpha_file(args.rotations)
    mesh = _mesh(args, cfg)
    ids, source = _text_ids(args, load_tokenizer(args.ckpt), "train")
    # held-out windows, never the calibration text (nor test data)
    win = data.heldout_windows(ids, args.samples, args.seqlen, args.seed,
                               exclude=_calibration_spans(stats, args, ids, source), source=source)
    model = load(args.ckpt)
    stats.check_model(model, where=args.rotations)
    for p in args.sparsity:
        res = search_alpha(model, stats, p, win, mode=args.mode, points=args.points, batch_size=args.batch, mesh=mesh)
        print(f"α search, larosa {args.mode}, p = {p:g}, {len(win)} held-out windows of {args.seqlen} from {source}")
        print(f"{'α_rot':>7} {'α_plain':>8} {'nominal p':>10} {'effective':>10} {'ppl':>9}")
        for r in res.table:
            mark = " *" if (r["alpha_rot"], r["alpha_plain"]) == res.best else ""
            print(f"{r['alpha_rot']:7.3f} {r['alpha_plain']:8.3f} {p:10.3f} {r['effective']:10.3f} {r['ppl']:9.3f}{mark}")
        print(f"best α = ({res.best[0]:.3f}, {res.best[1]:.3f}) stored in {store_alpha(args.rotations, res)}")


def _add_allocate(sub):
    p = sub.add_parser("allocate", help="per-layer, per-site sparsities of a threshold method (teal, larosa "
                       "thresholds) at one effective sparsity by TEAL's block-wise greedy on held-out calibration "
                       "windows; saves a sparse config")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rotations", required=True, help="directory written by larosa calibrate")
    p.add_argument("--method", default="larosa", choices=["larosa", "teal"],
                   help="larosa: the fused model with thresholds on the rotated rows; teal")
    p.add_argument("--sparsity", type=float, required=True)
    _add_data_args(p, 2, 512)  # as frontier --alloc-samples / --alloc-seqlen
    p.add_argument("--calib-samples", type=int, default=None,
                   help="windows used by calibrate (default: as recorded in the rotations file)")
    p.add_argument("--out", required=True, help="sparse config JSON (sparsify, larosa generate --sparse-config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_allocate)


def cmd_allocate(args) -> None:
    import json

    from . import data, outputs
    from .allocation import STEP, allocate
    from .calibration import CalibrationStats
    from .checkpoint import load, load_tokenizer
    from .frontier import TUNED
    from .sparsity import SITES, SparseConfig, effective_sparsity_of

    sc = SparseConfig("teal", "faithful", args.sparsity) if args.method == "teal" else SparseConfig(
        "larosa", "fused", args.sparsity, select="threshold")
    if args.sparsity == 0:
        raise UsageError("--sparsity 0: nothing to allocate")
    cfg = checkpoint_config(args.ckpt)
    _check_seqlen(args, cfg)
    target = outputs.check_target(args.out, TUNED, overwrite=args.overwrite)
    stats = CalibrationStats.load(args.rotations)
    ids, source = _text_ids(args, load_tokenizer(args.ckpt), "train")
    win = data.heldout_windows(ids, args.samples, args.seqlen, args.seed,
                               exclude=_calibration_spans(stats, args, ids, source), source=source)
    model = load(args.ckpt)
    stats.check_model(model, where=args.rotations)
    sc, rep = allocate(model, stats, sc, win)
    t = np.asarray(rep["layers"])
    print(f"allocation (TEAL's block-wise greedy), {sc.method}{' (thresholds)' if sc.method == 'larosa' else ''}, "
          f"p = {sc.sparsity:g}, effective {effective_sparsity_of(cfg, sc):.3f}, {len(win)} held-out windows of "
          f"{args.seqlen} from {source}")
    for i, site in enumerate(SITES):
        print(f"  {site:>7}: sparsity {t[:, i].mean():.3f} on average, {t[:, i].min():.3f}-{t[:, i].max():.3f} over layers")
    err = np.asarray(rep["block_error"])
    print(f"block error on those windows (relative to each block's update): mean {err.mean():.4f}, max {err.max():.4f}")
    doc = {"sparse_config": sc.to_dict(), "rotations_flavour": stats.flavour,
           "allocation": {"rule": "teal-greedy", "step": STEP, "block_error": rep["block_error"]},
           "data": {"source": source, "windows": len(win), "seqlen": args.seqlen}}
    outputs.write_file(target, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {target}")


def _add_bench(sub):
    p = sub.add_parser("bench", help="decode tokens/s of a checkpoint on this machine: dense against sparse configs "
                       "of that checkpoint, in one run (json + md)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--configs", type=_csv(str), default=[], help="METHOD@P list besides dense (and the config a fused "
                   "checkpoint records), e.g. larosa@0.4,teal@0.5; a fused checkpoint takes larosa only")
    p.add_argument("--rotations", default=None, help="directory from larosa calibrate (teal, cats, larosa on a dense "
                   "checkpoint need it)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default %(default)s)")
    p.add_argument("--new", type=int, default=128, help="decoded tokens per run (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compile run; the median counts")
    p.add_argument("--out", default=None, help="results path without extension (writes OUT.json, OUT.md)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results")
    p.set_defaults(func=cmd_bench)


def _bench_configs(items: list[str], fused: bool, has_rotations: bool) -> list[tuple[str, object]]:
    """(label, SparseConfig) per --configs item, checked before the model loads."""
    from .sparsity import METHODS, SparseConfig

    out = []
    for item in items:
        m, _, p = item.partition("@")
        try:
            pv = float(p)
        except ValueError:
            pv = -1.0
        if m not in METHODS or m == "dense" or not 0 < pv < 1:
            raise UsageError(f"--configs {item!r}: expected METHOD@P with METHOD one of "
                             f"{', '.join(x for x in METHODS if x != 'dense')} and 0 < P < 1")
        if fused and m != "larosa":
            raise UsageError(f"--configs {item}: a fused checkpoint decodes larosa (or dense) only")
        if m in ("teal", "cats") or (m == "larosa" and not fused):
            if not has_rotations:
                raise UsageError(f"--configs {item}: needs --rotations DIR (from larosa calibrate)")
        out.append((item, SparseConfig(m, "fused" if m == "larosa" else "faithful", pv)))
    return out


def cmd_bench(args) -> None:
    import datetime
    import json
    import statistics

    import jax

    from . import outputs
    from .calibration import CalibrationStats
    from .checkpoint import load, load_tokenizer, read_config
    from .evaluate import check_results
    from .generate import generate
    from .sparse_model import from_record, read_record, sparsify

    cfg, meta = read_config(args.ckpt)
    block = meta.get("sparse")
    if block is not None:
        read_record(block, args.ckpt)
    configs = _bench_configs(args.configs, bool(meta.get("fused")), args.rotations is not None)
    if args.prompt_len + args.new > cfg.max_position_embeddings:
        raise UsageError(f"--prompt-len {args.prompt_len} + --new {args.new}: at most the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    files = check_results(args.out, overwrite=args.overwrite, resume=False, exts=(".json", ".md")) if args.out else []
    stats = CalibrationStats.load(args.rotations) if args.rotations else None
    tok = load_tokenizer(args.ckpt)
    base = load(args.ckpt)
    if stats is not None and not meta.get("fused"):
        stats.check_model(base, where=args.rotations)
    ids = tok("Once upon a time, " * (args.prompt_len // 2 + 1))["input_ids"]
    prompt = [(ids * (args.prompt_len // max(len(ids), 1) + 1))[: args.prompt_len]]
    platform = jax.devices()[0].platform
    if platform == "cpu":
        print("on a CPU: these speeds check the command, not the method (the kernels run on GPUs)", flush=True)
    models = [("dense", base)]
    if block is not None:
        models.append((f"recorded ({block['config']['method']}@{block['config']['sparsity']:g})",
                       from_record(base, block, args.ckpt)))
    models += [(label, sparsify(base, stats, sc)) for label, sc in configs]
    rows = []
    for label, m in models:
        times = []
        for i in range(args.repeats + 1):  # the first run compiles
            t = {}
            generate(m, prompt, max_new_tokens=args.new, eos_token_ids=[], timings=t)
            if i:
                times.append((t["prefill_s"], t["decode_s"]))
        pre, dec = statistics.median(x for x, _ in times), statistics.median(y for _, y in times)
        rows.append({"config": label, "effective_sparsity": float(getattr(m, "effective_sparsity", 0.0)),
                     "prefill_tokens_per_s": args.prompt_len / pre, "decode_tokens_per_s": args.new / dec,
                     "ms_per_token": dec / args.new * 1e3, "decode_seconds": [y for _, y in times]})
        print(f"{label}: {rows[-1]['ms_per_token']:.3f} ms/token, effective sparsity "
              f"{rows[-1]['effective_sparsity']:.3f}", flush=True)
    for r in rows:
        r["speedup_vs_dense"] = rows[0]["ms_per_token"] / r["ms_per_token"]
    env = {"device": getattr(jax.devices()[0], "device_kind", platform), "platform": platform, "jax": jax.__version__,
           "ckpt": str(args.ckpt), "prompt_len": args.prompt_len, "new": args.new, "repeats": args.repeats,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    md = [f"# Decode speed of {args.ckpt}", "",
          f"{env['device']} ({platform}), jax {env['jax']}, {env['date']}; batch 1, {args.prompt_len}-token prompt, "
          f"{args.new} tokens per run, median of {args.repeats} after a compile run (whole generate calls: launch "
          "and host overheads included).", "",
          "| config | effective sparsity | ms/token | decode tok/s | prefill tok/s | speed-up vs dense |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['config']} | {r['effective_sparsity']:.3f} | {r['ms_per_token']:.3f} | {r['decode_tokens_per_s']:.1f} | "
           f"{r['prefill_tokens_per_s']:.1f} | {r['speedup_vs_dense']:.2f}x |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    if files:
        outputs.write_file(files[0], json.dumps({"meta": env, "rows": rows}, indent=1) + "\n")
        outputs.write_file(files[1], text)
        print(f"wrote {files[0]}, {files[1]}")


def _add_fuse(sub):
    p = sub.add_parser("fuse", help="fold rotations into the weights and save the fused (deployable) model")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rotations", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("the sparse config the checkpoint records (larosa generate and larosa_jax.load use it)")
    g.add_argument("--sparsity", type=float, default=None, help="nominal p (default: record none; decode dense "
                   "unless told)")
    g.add_argument("--select", default="topk", choices=["topk", "threshold"],
                   help="per-token Top-K or calibrated thresholds, stored with the checkpoint (default %(default)s)")
    g.add_argument("--weighted", action="store_true", help="weight-aware selection (Top-K or thresholds on |a_i|·‖W_i‖)")
    g.add_argument("--sparse-config", default=None, metavar="JSON",
                   help="a La RoSA fused config saved by larosa tune or larosa allocate (instead of the flags)")
    p.set_defaults(func=cmd_fuse)


def cmd_fuse(args) -> None:
    from . import outputs
    from .calibration import CalibrationStats, rotations_dir
    from .checkpoint import CHECKPOINT, load, save
    from .fusion import fuse

    from .sparse_model import record
    from .sparsity import SparseConfig

    sc = None
    if args.sparse_config and args.sparsity is not None:
        raise UsageError("--sparse-config and --sparsity exclude each other (the file holds p)")
    if args.sparse_config:
        sc = SparseConfig.load(args.sparse_config)
        if (sc.method, sc.mode) != ("larosa", "fused"):
            raise UsageError(f"--sparse-config {args.sparse_config}: a fused checkpoint records La RoSA fused configs, "
                             f"not {sc.method}/{sc.mode}")
    elif args.sparsity is not None:
        sc = SparseConfig("larosa", "fused", args.sparsity, select=args.select, weighted=args.weighted)
    checkpoint_config(args.ckpt)
    outputs.check_target(args.out, CHECKPOINT, overwrite=args.overwrite,
                         inputs=(args.ckpt, rotations_dir(args.rotations)))
    stats = CalibrationStats.load(args.rotations)
    model = load(args.ckpt)
    stats.check_model(model, where=args.rotations)
    meta = {f"rotations_{k}": v for k, v in stats.metadata.items()}
    fused = fuse(model, stats.rotations)
    if sc is not None:
        meta["sparse"] = record(fused, stats, sc)
    out = save(fused, args.out, meta=meta, tokenizer_from=args.ckpt, overwrite=args.overwrite)
    print(f"wrote fused checkpoint {out}" + ("" if sc is None else f" (records {sc.to_dict()})"))


def _add_ppl(sub):
    p = sub.add_parser("ppl", help="perplexity grid over methods × sparsities; writes json + md + png")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rotations", default=None, help="directory from larosa calibrate (larosa, teal, cats need it)")
    p.add_argument("--methods", type=_csv(str), default=["dense", "larosa", "teal", "cats", "topk"])
    p.add_argument("--sparsity", type=_csv(float), default=[0.25, 0.4, 0.5])
    p.add_argument("--mode", type=_csv(str), default=["faithful"], help="larosa modes, e.g. faithful,fused")
    p.add_argument("--alpha", type=_csv(str), default=["official"], help="official, uniform, searched (comma list)")
    p.add_argument("--protocol", default="full", choices=["full", "random"])
    p.add_argument("--samples", type=int, default=128, help="windows for --protocol random")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--data-file", default=None, help="local text file (offline), e.g. wiki.test.raw")
    p.add_argument("--batch", type=int, default=1, help="windows per step (split over the mesh's data axis)")
    _add_mesh(p)
    p.add_argument("--out", required=True, help="results path without extension, e.g. eval/results/smollm2_ppl "
                   "(writes OUT.json, OUT.md, OUT.png)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results (kept until the new grid is done)")
    p.add_argument("--resume", action="store_true", help="continue a partial grid in --out (same settings only)")
    p.set_defaults(func=cmd_ppl)


def _test_windows(args):
    """``(windows, token ids, source, tokenizer)``: the test split of ``--data`` / ``--data-file`` cut into
    evaluation windows by ``--protocol``, ``--seqlen``, ``--samples``, ``--seed`` and ``--limit`` (ppl and
    frontier score the same way)."""
    from .checkpoint import load_tokenizer
    from .evaluate import eval_windows

    tok = load_tokenizer(args.ckpt)
    ids, source = _text_ids(args, tok, "test")
    win = eval_windows(ids, args.protocol, args.seqlen, args.samples, args.seed, source)
    return (win if args.limit is None else win[: args.limit]), ids, source, tok


def cmd_ppl(args) -> None:
    from . import data
    from .calibration import CalibrationStats, fingerprint, rotations_fingerprint
    from .checkpoint import load
    from .evaluate import check_results, markdown, run_grid, uses_rotations, variants
    from .search import stored_alpha
    from .sparsity import SparseConfig, effective_sparsity_of

    vs = variants(args.methods, args.mode, args.alpha)  # validate names before the slow parts
    cfg = checkpoint_config(args.ckpt)
    _check_seqlen(args, cfg)
    files = check_results(args.out, overwrite=args.overwrite, resume=args.resume)
    needs = any(uses_rotations(v.method) for v in vs)
    if needs and args.rotations is None:
        raise ValueError("methods larosa, teal and cats need --rotations (from larosa calibrate)")
    stats = CalibrationStats.load(args.rotations) if needs else None
    rot_id = rotations_fingerprint(args.rotations) if needs else None
    grid = [(v, p) for p in args.sparsity for v in vs]
    alphas = {}
    for v, p in grid:  # every cell's p and α, before the first row (and before the model loads)
        if v.alpha == "searched":
            alphas[(p, v.mode)] = stored_alpha(args.rotations, p, v.mode, rot_id)
        effective_sparsity_of(cfg, SparseConfig(v.method, v.mode, p, alphas.get((p, v.mode), v.alpha)))
    mesh = _mesh(args, cfg)
    win, ids, source, tok = _test_windows(args)
    model = load(args.ckpt)
    if stats is not None:
        stats.check_model(model, where=args.rotations)
    meta = {"model": str(args.ckpt), "data": source, "protocol": args.protocol,
            "calibration": None if stats is None else f"{stats.metadata.get('data_source')} "
            f"({stats.metadata.get('samples')} x {stats.metadata.get('seqlen')}, flavour {stats.flavour})",
            "limit": args.limit}
    # what makes rows comparable: --resume refuses a file whose rows were measured otherwise
    settings = {"model_fingerprint": fingerprint(model), "data_fingerprint": data.fingerprint(ids),
                "protocol": args.protocol, "limit": args.limit,
                "samples": args.samples if args.protocol == "random" else None,
                "seed": args.seed if args.protocol == "random" else None}
    res = run_grid(model, stats, win, grid, out=args.out, meta=meta, batch_size=args.batch, resume=args.resume, mesh=mesh,
                   overwrite=args.overwrite, alpha_lookup=lambda p, mode: alphas[(p, mode)], settings=settings,
                   rotations_id=rot_id)
    print(markdown(res))
    print(f"wrote {', '.join(str(f) for f in files)}")


# what a measuring frontier run uses when not given (None in argparse, so that --from can refuse them)
FRONTIER_DEFAULTS = {"sparsity": [0.2, 0.3, 0.4, 0.5, 0.6], "protocol": "full", "samples": 128, "seed": 0,
                     "seqlen": 2048, "data": "wikitext2", "batch": 1, "alloc_samples": 2, "alloc_seqlen": 512}


def _dflt(flag: str) -> str:
    v = FRONTIER_DEFAULTS[flag]
    return "default " + (",".join(map(str, v)) if isinstance(v, list) else str(v))


def _add_frontier(sub):
    from .frontier import RECIPES

    p = sub.add_parser("frontier", help="perplexity × decode speed of sparsity recipes: which gives the best text at a "
                       "given speed (json + md + png)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="the checkpoint to measure")
    src.add_argument("--from", dest="from_", metavar="JSON", action="append",
                     help="an earlier frontier's OUT.json (e.g. measured without --speeds): attach --speeds to its rows, "
                     "no model runs (perplexity does not depend on the GPU); repeat to join runs of other recipes on "
                     "the same checkpoint and windows")
    p.add_argument("--rotations", action="append", default=[], metavar="FLAVOUR=DIR",
                   help="a calibration per flavour the recipes need (repeat), e.g. joint=rot/joint global=rot/global")
    p.add_argument("--recipes", type=_csv(str), default=None,
                   help=f"comma list of {', '.join(RECIPES)} (default: all; with --from, all of that file's)")
    p.add_argument("--sparsity", type=_csv(float), default=None, help=f"nominal p ({_dflt('sparsity')})")
    p.add_argument("--speeds", action="append", default=[], metavar="JSON",
                   help="eval/bench_decode.py results of one device with every recipe's decode (repeat for several "
                   "files); without it, perplexity and layer error against effective sparsity only")
    p.add_argument("--shape", default="llama2-7b", help="the model shape whose decode speed to read (default %(default)s)")
    p.add_argument("--protocol", default=None, choices=["full", "random"], help=_dflt("protocol"))
    p.add_argument("--samples", type=int, default=None, help=f"windows for --protocol random ({_dflt('samples')})")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows (quick runs; a full "
                   "WikiText-2 test pass of SmolLM2 per row takes tens of minutes on a CPU, seconds on a GPU)")
    p.add_argument("--seed", type=int, default=None, help=_dflt("seed"))
    p.add_argument("--seqlen", type=int, default=None, help=_dflt("seqlen"))
    p.add_argument("--data", default=None, help=_dflt("data"))
    p.add_argument("--data-file", default=None, help="local text file (offline), e.g. wiki.test.raw")
    p.add_argument("--batch", type=int, default=None, help=f"windows per step ({_dflt('batch')})")
    p.add_argument("--alloc-data-file", default=None, help="calibration text for the recipes that allocate (*-alloc): "
                   "held-out windows of it, off the rotations' own calibration windows (e.g. wiki.valid.raw)")
    p.add_argument("--alloc-samples", type=int, default=None, help=f"held-out windows for the allocation ({_dflt('alloc_samples')})")
    p.add_argument("--alloc-seqlen", type=int, default=None, help=f"their length in tokens ({_dflt('alloc_seqlen')})")
    p.add_argument("--no-layer-errors", dest="layer_errors", action="store_false",
                   help="skip the per-layer teacher-forced error on the first window")
    p.add_argument("--out", required=True, help="results path without extension (writes OUT.json, OUT.md, OUT.png)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results (kept until the new run is done)")
    p.add_argument("--resume", action="store_true", help="continue a partial run in --out (same settings only)")
    p.set_defaults(func=cmd_frontier)


def _rotation_args(items) -> dict:
    from .calibration import FLAVOURS

    out = {}
    for item in items:
        fl, eq, path = item.partition("=")
        if not eq or fl not in FLAVOURS or not path:
            raise UsageError(f"--rotations {item!r}: expected FLAVOUR=DIR with FLAVOUR one of {', '.join(FLAVOURS)}")
        out[fl] = path
    return out


def cmd_frontier(args) -> None:
    from . import data, frontier
    from .calibration import CalibrationStats, fingerprint, rotations_fingerprint
    from .checkpoint import load
    from .evaluate import check_results

    if args.from_ is not None:
        return _frontier_pair(args)
    for flag, value in FRONTIER_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.recipes is None:
        args.recipes = list(frontier.RECIPES)
    rot_paths = _rotation_args(args.rotations)
    cfg = checkpoint_config(args.ckpt)
    _check_seqlen(args, cfg)
    speeds = frontier.load_speeds(args.speeds, args.shape) if args.speeds else None
    cells = frontier.check_recipes(args.recipes, args.sparsity, cfg, rot_paths, speeds)
    alloc = [n for n in args.recipes if frontier.RECIPES[n].allocate]
    if alloc and args.alloc_data_file is None:
        raise UsageError(f"--recipes {','.join(alloc)}: allocating recipes need --alloc-data-file (calibration text, "
                         "e.g. wiki.valid.raw)")
    if args.alloc_samples < 1:
        raise UsageError(f"--alloc-samples {args.alloc_samples}: must be >= 1")
    if not 1 < args.alloc_seqlen <= cfg.max_position_embeddings:
        raise UsageError(f"--alloc-seqlen {args.alloc_seqlen}: must be in 2..{cfg.max_position_embeddings} (the model's "
                         "context)")
    if alloc and not Path(args.alloc_data_file).is_file():
        raise UsageError(f"--alloc-data-file {args.alloc_data_file}: file not found")
    check_results(args.out, overwrite=args.overwrite, resume=args.resume)
    stats = {fl: CalibrationStats.load(p) for fl, p in rot_paths.items()}
    for fl, st in stats.items():
        if st.flavour != fl:
            raise UsageError(f"--rotations {fl}={rot_paths[fl]}: that calibration is of the {st.flavour} flavour")
    win, ids, source, tok = _test_windows(args)
    model = load(args.ckpt)
    for fl, st in stats.items():
        st.check_model(model, where=rot_paths[fl])
    settings = {"model_fingerprint": fingerprint(model), "data_fingerprint": data.fingerprint(ids),
                "protocol": args.protocol, "limit": args.limit,
                "rotations": {fl: rotations_fingerprint(p) for fl, p in sorted(rot_paths.items())}}
    meta = {"model": str(args.ckpt), "data": source,
            "calibration": {fl: f"{st.metadata.get('data_source')} ({st.metadata.get('samples')} x "
                                f"{st.metadata.get('seqlen')})" for fl, st in stats.items()}}
    alloc_win = None
    if alloc:
        st0 = next(iter(stats.values()))
        a_text, a_source = data.load_text("wikitext2", args.alloc_data_file, split="train")
        a_ids = data.tokenize(tok, a_text)
        a_args = argparse.Namespace(calib_samples=None, rotations=next(iter(rot_paths.values())))
        alloc_win = data.heldout_windows(a_ids, args.alloc_samples, args.alloc_seqlen, args.seed, source=a_source,
                                         exclude=_calibration_spans(st0, a_args, a_ids, a_source))
        settings["allocation"] = {"data_fingerprint": data.fingerprint(a_ids), "samples": args.alloc_samples,
                                  "seqlen": args.alloc_seqlen}
    res = frontier.run(model, stats, win, cells, speeds, out=args.out, meta=meta, settings=settings,
                       batch_size=args.batch, resume=args.resume, overwrite=args.overwrite, layer_errors=args.layer_errors,
                       alloc_windows=alloc_win)
    print(frontier.markdown(res))


def _frontier_pair(args) -> None:
    from . import frontier
    from .config import ConfigError, read_json
    from .evaluate import check_results

    measuring = [flag for flag, on in (("--rotations", args.rotations), ("--resume", args.resume),
                                       ("--data-file", args.data_file), ("--limit", args.limit is not None),
                                       ("--alloc-data-file", args.alloc_data_file),
                                       ("--no-layer-errors", not args.layer_errors))
                 if on] + [_flag(f) for f in FRONTIER_DEFAULTS if getattr(args, f) is not None]
    names = ", ".join(args.from_)
    if measuring:
        raise UsageError(f"--from {names}: {', '.join(measuring)} measure a checkpoint; with --from nothing is "
                         "measured (give --ckpt instead)")
    if not args.speeds:
        raise UsageError(f"--from {names}: give --speeds JSON (bench_decode results) to attach")
    try:
        quality = frontier.merge([(f, read_json(Path(f), "larosa frontier results")) for f in args.from_])
    except ConfigError as e:
        raise UsageError(str(e)) from None
    res = frontier.pair(quality, frontier.load_speeds(args.speeds, args.shape), args.recipes, source=names)
    files = check_results(args.out, overwrite=args.overwrite, resume=False)
    frontier.write(res, files)
    print(frontier.markdown(res))
    print(f"wrote {', '.join(str(f) for f in files)}")


def _add_tune(sub):
    p = sub.add_parser("tune", help="the best sparse config for a speed or quality target, from a frontier's results")
    p.add_argument("--frontier", required=True, help="OUT.json of larosa frontier")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-speedup", type=float, help="lowest perplexity at a decode speed-up of at least S")
    g.add_argument("--max-ppl-increase", type=float, help="fastest within X perplexity of dense")
    p.add_argument("--ckpt", default=None, help="check that the frontier was measured on this checkpoint")
    p.add_argument("--out", default=None, help="save the pick as a sparse config JSON (sparsify and generate read it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> None:
    import json

    from . import frontier, outputs
    from .config import read_json

    for flag in ("target_speedup", "max_ppl_increase"):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"{_flag(flag)} {v}: must be a finite number > 0")
    res = read_json(Path(args.frontier), "larosa frontier results")
    if not isinstance(res.get("rows"), list) or "speeds" not in res.get("meta", {}):
        raise UsageError(f"{args.frontier}: not a larosa frontier results file (needs meta.speeds and rows)")
    if res["meta"]["speeds"] is None:
        raise UsageError(f"{args.frontier}: measured without --speeds (quality only); larosa tune picks by speed, so "
                         "rerun larosa frontier with a bench_decode JSON")
    if args.ckpt is not None:
        from .calibration import fingerprint
        from .checkpoint import load

        want = res["meta"].get("settings", {}).get("model_fingerprint")
        if fingerprint(load(args.ckpt)) != want:
            raise UsageError(f"{args.frontier}: measured on another model ({want}), not {args.ckpt}")
    row = frontier.pick(res, target_speedup=args.target_speedup, max_ppl_increase=args.max_ppl_increase)
    doc = frontier.tuned_config(row, str(args.frontier), res["meta"])
    print(f"{row['recipe']} at p={row['sparsity']:g}: effective sparsity {row['effective']:.3f}, ppl {row['ppl']:.3f}, "
          f"{row['ms_per_token']:.3f} ms/token ({row['speedup']:.2f}x dense) at {doc['speeds']['shape']} on "
          f"{doc['speeds']['device']}")
    fl = doc["rotations_flavour"]
    print(json.dumps(doc["sparse_config"]) + ("" if not fl else " (rotations: any calibration, for its quantiles)"
                                               if fl == "any" else f" (rotations: the {fl} flavour)"))
    if args.out:
        target = outputs.check_target(args.out, frontier.TUNED, overwrite=args.overwrite)
        outputs.write_file(target, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {target}")


def _add_demo(sub):
    p = sub.add_parser("demo", help="the whole pipeline on the bundled stories260K model and TinyStories text (CPU, ~1 min)")
    p.add_argument("--out", default="runs/demo", help="working directory (OUT/stories260K, OUT/rotations)")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint and rotations of an earlier demo")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    """convert → calibrate → perplexity of dense / larosa / teal → a short sparse generation."""
    import time

    from . import data, outputs
    from .calibration import ROTATIONS, calibrate
    from .checkpoint import CHECKPOINT, convert, load, load_tokenizer
    from .config import ModelConfig
    from .generate import generate
    from .perplexity import perplexity
    from .sparse_model import sparsify
    from .sparsity import SparseConfig, effective_sparsity_of

    t0 = time.time()
    out = Path(args.out)
    cfg = ModelConfig.from_hf(ASSETS / "stories260K")
    for method, mode in (("larosa", "fused"), ("topk", "faithful")):  # the α = 1 rows keep k in [1, D]
        effective_sparsity_of(cfg, SparseConfig(method, mode, args.sparsity, "uniform"))
    if out.exists() and not out.is_dir():
        raise outputs.OutputError(f"--out {out}: is a file, not a directory")
    for sub, kind in (("stories260K", CHECKPOINT), ("rotations", ROTATIONS)):  # both before any work
        outputs.check_target(out / sub, kind, overwrite=args.overwrite)
    ckpt = convert(str(ASSETS / "stories260K"), out / "stories260K", dtype="float32", overwrite=args.overwrite)
    model, tok = load(ckpt), load_tokenizer(ckpt)
    text_file = ASSETS / "tinystories-valid-head.txt"
    ids = data.tokenize(tok, text_file.read_text())
    seqlen, n_cal, n_eval = 256, 16, 32
    cal = data.calibration_windows(ids, n_cal, seqlen, seed=0, source=str(text_file))
    held = data.calibration_windows(ids, n_eval, seqlen, seed=0, skip=n_cal, source=str(text_file))
    stats = calibrate(model, cal, flavour="fused", batch_size=8, data_source=text_file.name, model_source=str(ckpt))
    stats.save(out / "rotations", overwrite=args.overwrite)
    p = args.sparsity
    rows = []
    for name, sc in (
        ("dense", SparseConfig("dense")),
        # α = 1 on every site: all three sparse rows skip the same share of weights (effective = p)
        ("larosa fused (α = 1)", SparseConfig("larosa", "fused", p, "uniform")),
        ("topk (α = 1)", SparseConfig("topk", "faithful", p, "uniform")),
        ("teal", SparseConfig("teal", "faithful", p)),
    ):
        m = sparsify(model, stats, sc)
        rows.append((name, sc.sparsity, m.effective_sparsity, perplexity(m, held, batch_size=8)))
    sparse = sparsify(model, stats, SparseConfig("larosa", "fused", p, "uniform"))
    prompt = "Once upon a time"
    text = tok.decode(generate(sparse, [prompt], tokenizer=tok, max_new_tokens=48)[0], skip_special_tokens=True)
    print(f"\nstories260K, {n_eval} held-out TinyStories windows of {seqlen} tokens (calibration: {n_cal} others)")
    print(f"{'method':<28}{'nominal p':>10}{'effective':>10}{'ppl':>9}{'Δ dense':>9}")
    for name, nom, eff, ppl in rows:
        print(f"{name:<28}{nom:>10.2f}{eff:>10.3f}{ppl:>9.3f}{ppl - rows[0][3]:>+9.3f}")
    print(f"\nlarosa fused at p={p}: {prompt}{text}")
    print(f"\ndone in {time.time() - t0:.0f} s; checkpoint and rotations in {out}")


def parser() -> argparse.ArgumentParser:
    """The ``larosa`` command line: one sub-command per step."""
    p = argparse.ArgumentParser(prog="larosa", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM unwinds like ^C, so staged outputs are removed on the way out (SIGKILL: see outputs.sweep)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        check_args(args)
        args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:  # ConfigError, CheckpointError, ... are ValueErrors
        if os.environ.get("LAROSA_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"larosa {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


from .zeroshot import add_parser as _add_zeroshot  # noqa: E402  (imports lm_eval only when run)

_COMMANDS = [_add_convert, _add_generate, _add_bench, _add_calibrate, _add_search, _add_allocate, _add_fuse, _add_ppl, _add_frontier, _add_tune,
             _add_demo, _add_zeroshot]

if __name__ == "__main__":
    sys.exit(main())
