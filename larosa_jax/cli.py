"""``larosa`` command line: convert | generate | calibrate | search | fuse | ppl | zeroshot | demo.

Errors the user can fix (bad paths, bad configs, bad values) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "assets"


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint (dir, hub id or .gguf) to a larosa checkpoint")
    p.add_argument("--model", required=True, help="local HF directory, hub id (owner/name) or .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
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
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    import jax

    from .checkpoint import load, load_tokenizer, read_config
    from .generate import generate
    from .parallel import TensorParallel, make_mesh

    spec = args.mesh or (f"model={len(jax.devices())}" if len(jax.devices()) > 1 else None)
    mesh = make_mesh(spec, cfg=read_config(args.ckpt)[0]) if spec else None
    model = load(args.ckpt, dtype=args.dtype, mesh=mesh)  # each device reads only its shard
    tok = load_tokenizer(args.ckpt)
    if mesh is not None:
        model = TensorParallel(model, mesh)
    stream = _Streamer(tok, args.prompt) if len(args.prompt) == 1 else None
    out = generate(
        model, args.prompt, tokenizer=tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, on_tokens=stream,
    )
    if stream is not None:
        print()
    else:
        for prompt, ids in zip(args.prompt, out):
            print(f"--- {prompt}{tok.decode(ids, skip_special_tokens=True)}")


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


def _windows(args, tok, split: str, *, skip: int = 0, samples: int | None = None):
    from . import data

    text, source = data.load_text(args.data, args.data_file, split=split)
    ids = data.tokenize(tok, text)
    win = data.calibration_windows(ids, samples or args.samples, args.seqlen, args.seed, skip=skip, source=source)
    return win, source


def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="La RoSA calibration: rotations Q_l and baseline thresholds")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--flavour", default="fused", choices=["faithful", "fused"])
    p.add_argument("--out", required=True, help="directory for rotations.safetensors")
    _add_data_args(p, 16, 2048)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> None:
    from .calibration import calibrate
    from .checkpoint import load, load_tokenizer

    model = load(args.ckpt)
    mesh = _mesh(args, model.config)
    win, source = _windows(args, load_tokenizer(args.ckpt), "train")
    stats = calibrate(model, win, flavour=args.flavour, batch_size=args.batch, data_source=source, seed=args.seed,
                      model_source=str(args.ckpt), mesh=mesh)
    path = stats.save(args.out)
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
    p.add_argument("--calib-samples", type=int, default=16, help="windows used by calibrate (held-out ones come after)")
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> None:
    from .calibration import CalibrationStats
    from .checkpoint import load, load_tokenizer
    from .search import search_alpha, store_alpha
    from .sparsity import SparseConfig

    for p in args.sparsity:  # refuse bad p before loading anything
        SparseConfig("larosa", args.mode, p)
    model = load(args.ckpt)
    mesh = _mesh(args, model.config)
    stats = CalibrationStats.load(args.rotations)
    stats.check_model(model, where=args.rotations)
    # the same seed and window order as calibration, skipping its windows: held-out, never test
    win, source = _windows(args, load_tokenizer(args.ckpt), "train", skip=args.calib_samples)
    for p in args.sparsity:
        res = search_alpha(model, stats, p, win, mode=args.mode, points=args.points, batch_size=args.batch, mesh=mesh)
        print(f"α search, larosa {args.mode}, p = {p:g}, {len(win)} held-out windows of {args.seqlen} from {source}")
        print(f"{'α_rot':>7} {'α_plain':>8} {'nominal p':>10} {'effective':>10} {'ppl':>9}")
        for r in res.table:
            mark = " *" if (r["alpha_rot"], r["alpha_plain"]) == res.best else ""
            print(f"{r['alpha_rot']:7.3f} {r['alpha_plain']:8.3f} {p:10.3f} {r['effective']:10.3f} {r['ppl']:9.3f}{mark}")
        print(f"best α = ({res.best[0]:.3f}, {res.best[1]:.3f}) stored in {store_alpha(args.rotations, res)}")


def _add_fuse(sub):
    p = sub.add_parser("fuse", help="fold rotations into the weights and save the fused (deployable) model")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rotations", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_fuse)


def cmd_fuse(args) -> None:
    from .calibration import CalibrationStats
    from .checkpoint import load, save
    from .fusion import fuse

    model = load(args.ckpt)
    stats = CalibrationStats.load(args.rotations)
    stats.check_model(model, where=args.rotations)
    meta = {f"rotations_{k}": v for k, v in stats.metadata.items()}
    out = save(fuse(model, stats.rotations), args.out, meta=meta, tokenizer_from=args.ckpt, overwrite=args.overwrite)
    print(f"wrote fused checkpoint {out}")


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
    p.add_argument("--out", required=True, help="results path without extension, e.g. eval/results/smollm2_ppl")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue a partial grid in --out")
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args) -> None:
    from . import data
    from .calibration import CalibrationStats
    from .checkpoint import load, load_tokenizer
    from .evaluate import eval_windows, run_grid, variants
    from .search import stored_alpha

    vs = variants(args.methods, args.mode, args.alpha)  # validate names before the slow parts
    model, tok = load(args.ckpt), load_tokenizer(args.ckpt)
    mesh = _mesh(args, model.config)
    stats = None
    if any(v.method in ("larosa", "teal", "cats") for v in vs):
        if args.rotations is None:
            raise ValueError("methods larosa, teal and cats need --rotations (from larosa calibrate)")
        stats = CalibrationStats.load(args.rotations)
        stats.check_model(model, where=args.rotations)
    text, source = data.load_text(args.data, args.data_file, split="test")
    ids = data.tokenize(tok, text)
    win = eval_windows(ids, args.protocol, args.seqlen, args.samples, args.seed, source)
    if args.limit:
        win = win[: args.limit]
    if args.seqlen > model.config.max_position_embeddings:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    meta = {"model": str(args.ckpt), "data": source, "protocol": args.protocol,
            "calibration": None if stats is None else f"{stats.metadata.get('data_source')} "
            f"({stats.metadata.get('samples')} x {stats.metadata.get('seqlen')}, flavour {stats.flavour})",
            "limit": args.limit}
    grid = [(v, p) for p in args.sparsity for v in vs]
    for v, p in grid:  # fail now, not an hour into the grid
        if v.alpha == "searched":
            stored_alpha(args.rotations, p, v.mode)
    res = run_grid(model, stats, win, grid, out=args.out, meta=meta, batch_size=args.batch, resume=args.resume, mesh=mesh,
                   overwrite=args.overwrite, alpha_lookup=lambda p, mode: stored_alpha(args.rotations, p, mode))
    from .evaluate import markdown

    print(markdown(res))
    print(f"wrote {args.out}.json, .md, .png")


def _add_demo(sub):
    p = sub.add_parser("demo", help="the whole pipeline on the bundled stories260K model and TinyStories text (CPU, ~1 min)")
    p.add_argument("--out", default="runs/demo", help="working directory (checkpoint, rotations)")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    """convert → calibrate → perplexity of dense / larosa / teal → a short sparse generation."""
    import time

    from . import data
    from .calibration import calibrate
    from .checkpoint import convert, load, load_tokenizer
    from .generate import generate
    from .perplexity import perplexity
    from .sparse_model import sparsify
    from .sparsity import SparseConfig

    t0 = time.time()
    out = Path(args.out)
    ckpt = convert(str(ASSETS / "stories260K"), out / "stories260K", dtype="float32", overwrite=True)
    model, tok = load(ckpt), load_tokenizer(ckpt)
    text_file = ASSETS / "tinystories-valid-head.txt"
    ids = data.tokenize(tok, text_file.read_text())
    seqlen, n_cal, n_eval = 256, 16, 32
    cal = data.calibration_windows(ids, n_cal, seqlen, seed=0, source=str(text_file))
    held = data.calibration_windows(ids, n_eval, seqlen, seed=0, skip=n_cal, source=str(text_file))
    stats = calibrate(model, cal, flavour="fused", batch_size=8, data_source=text_file.name, model_source=str(ckpt))
    stats.save(out / "rotations")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="larosa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    from .checkpoint import ConversionError
    from .config import ConfigError
    from .safetensors_io import CheckpointError

    try:
        args.func(args)
    except (ConversionError, ConfigError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("LAROSA_DEBUG"):
            raise
        print(f"larosa {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


from .zeroshot import add_parser as _add_zeroshot  # noqa: E402  (imports lm_eval only when run)

_COMMANDS = [_add_convert, _add_generate, _add_calibrate, _add_search, _add_fuse, _add_ppl, _add_demo, _add_zeroshot]

if __name__ == "__main__":
    sys.exit(main())
