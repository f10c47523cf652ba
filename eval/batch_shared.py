"""Perplexity when the B rows of a decode batch share one keep set, against per-token keep sets.

A batch-B sparse GEMV must read every weight row any of its B tokens keeps, and on real activations
that union is nearly dense at B = 4 (``batch_union.py``). One keep set shared by the batch (at each
site and position, the Top-K of the B rows' summed |x|, with each row's own k) would read only k rows
for all B tokens. This measures its price in perplexity on real text: B text windows at the same
positions stand for the B rows of a decode step (La RoSA fused, Top-K without rotation).

    python eval/batch_shared.py CKPT ROTATIONS --text wiki.test.raw --out eval/results/batch_shared_smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batch_union import load_real_text, real_text_args  # noqa: E402

from larosa_jax import pallas as ops  # noqa: E402
from larosa_jax import perplexity as ppl  # noqa: E402
from larosa_jax import sparsity  # noqa: E402
from larosa_jax.sparse_model import sparsify  # noqa: E402
from larosa_jax.sparsity import SparseConfig  # noqa: E402


@contextlib.contextmanager
def shared_keep_sets(b: int):
    """Within the block, each sparse projection on ``[rows, T, D]`` keeps one set per position for every
    group of ``b`` consecutive rows: the Top-K of the group's summed |x|, k being what each row keeps on
    its own. (b = 1: unchanged.) The projection is restored after."""
    orig = sparsity.kept_projection

    def hook(x, keep, linears, residual=None, raw=False, **gemv):
        if b == 1:
            return orig(x, keep, linears, residual, raw, **gemv)
        if x.ndim != 3 or x.shape[0] % b:
            raise ValueError(f"shared keep sets: input {tuple(x.shape)}, expected [rows, T, D] with rows divisible by {b}")
        k = jnp.sum(ops.keep_mask(x[:1, :1], keep.thr[:1, :1]), dtype=jnp.int32)  # every row keeps k
        xg = x.reshape(x.shape[0] // b, b, *x.shape[1:])
        score = jnp.sum(jnp.abs(xg.astype(jnp.float32)), axis=1)  # [groups, T, D]
        shared = ops.keep_mask(score, ops.topk_threshold(score, k))[:, None]
        xs = jnp.where(shared, xg, jnp.zeros((), x.dtype)).reshape(x.shape)
        everything = jnp.broadcast_to(jnp.asarray([-1, 0], jnp.int32), (*x.shape[:-1], 2))  # bits > -1: all kept
        return orig(xs, ops.KeepSet(everything), linears, residual, raw, **gemv)

    sparsity.kept_projection = hook
    try:
        yield
    finally:
        sparsity.kept_projection = orig


def perplexity(model, tokens) -> float:
    """The project's perplexity over the windows ``tokens [rows, T]``, all in one batch and run eagerly: the
    hook of :func:`shared_keep_sets` is read as the model runs, and a jit cache would keep the first one."""
    with jax.disable_jit():
        return ppl.perplexity(model, np.asarray(tokens), batch_size=len(tokens))


def markdown(doc: dict) -> str:
    bs = doc["batches"]
    lines = [f"# Keep sets shared by a decode batch: perplexity ({doc['model']}, CPU)", "",
             f"Date: {doc['date']}. {doc['data']}. Each batch of B rows (B windows at the same positions, as the rows of "
             "a batch-B decode step) keeps at every site and position one set: the Top-K of the rows' summed |x|, "
             "with each row's own k. B = 1 is the method itself (per-token keep sets). Official α (0.8p / 1.2p).", "",
             f"Dense: {doc['dense']:.3f}.", "",
             "| config | " + " | ".join(f"B={b}" for b in bs) + " |", "| --- |" + " ---: |" * len(bs)]
    for name, row in doc["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(b)]:.3f}" if str(b) in row else "" for b in bs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_text_args(ap, 16, "windows (batch rows), divisible by every B")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes B sharing one keep set")
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    ap.add_argument("--resume", action="store_true", help="keep the results already in OUT.json (same model, text and batches)")
    args = ap.parse_args(argv)
    try:
        bs = [int(v) for v in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: expected a comma list of integers")
    if any(b < 1 or args.rows % b for b in bs):
        ap.error(f"--batches {args.batches}: each B must be positive and divide --rows {args.rows}")
    model, stats, tokens, ps = load_real_text(ap, args)
    doc = {"model": Path(args.ckpt).name, "data": f"{Path(args.text).name}, {args.rows} windows of {args.seqlen} tokens",
           "date": time.strftime("%Y-%m-%d"), "batches": bs, "results": {}}
    if args.resume and os.path.exists(args.out + ".json"):
        old = json.loads(Path(args.out + ".json").read_text())
        if {k: old.get(k) for k in ("model", "data", "batches")} != {k: doc[k] for k in ("model", "data", "batches")}:
            ap.error(f"--resume: {args.out}.json holds another run ({old.get('model')}, {old.get('data')}, B {old.get('batches')})")
        doc = old
    if "dense" not in doc:
        doc["dense"] = perplexity(model, tokens)
    print(f"dense {doc['dense']:.3f}", flush=True)

    def save():
        for ext, text in ((".json", json.dumps(doc, indent=1)), (".md", markdown(doc))):
            with open(args.out + ext + ".tmp", "w") as f:
                f.write(text)
            os.replace(args.out + ext + ".tmp", args.out + ext)  # atomic: a failed run keeps what it had

    for method, mode in [("larosa", "fused"), ("topk", "faithful")]:
        for p in ps:
            row = doc["results"].setdefault(f"{method}@{p}", {})
            if all(str(b) in row for b in bs):
                continue
            sparse = sparsify(model, stats, SparseConfig(method, mode, p))
            for b in bs:
                if str(b) in row:
                    continue
                with shared_keep_sets(b):
                    row[str(b)] = perplexity(sparse, tokens)
                print(f"{method}@{p} B={b} {row[str(b)]:.3f}", flush=True)
                save()
    save()
    return doc


if __name__ == "__main__":
    main()
