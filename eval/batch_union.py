"""Union of per-token Top-K keep sets over a batch of B decode rows, on real activations.

A batch-B sparse GEMV on the union reads every weight row any of the B tokens keeps. This runs
B windows of a text through the sparse model (La RoSA fused, Top-K without rotation), records
each site's keep masks and reports the parameter-weighted fraction of rows that no row of the
batch keeps, next to what B independent keep sets of the same size would leave.

    python eval/batch_union.py CKPT ROTATIONS --text wiki.test.raw --out eval/results/batch_union_smollm2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from larosa_jax import checkpoint, sparsity
from larosa_jax import pallas as ops
from larosa_jax.calibration import CalibrationStats
from larosa_jax.data import tokenize
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SITES, SparseConfig, site_params


@contextlib.contextmanager
def record_sites(what=lambda x, keep: np.asarray(ops.keep_mask(x, keep.thr))):
    """Within the block, each sparse projection also appends ``what(row, keep set)`` to the list yielded
    (by default the keep mask; site order qkv, o, gate_up, down); the projection is restored after."""
    rec, orig = [], sparsity.kept_projection

    def hook(x, keep, linears, residual=None, raw=False, **gemv):
        rec.append(what(x, keep))
        return orig(x, keep, linears, residual, raw, **gemv)

    sparsity.kept_projection = hook
    try:
        yield rec
    finally:
        sparsity.kept_projection = orig


def union_stats(rec, cfg, rows: int, t: int, batches=(1, 2, 4, 8)) -> dict:
    w = site_params(cfg)
    total = sum(w.values())
    out = {}
    for b in batches:
        dens, indep = {s: [] for s in SITES}, {s: [] for s in SITES}
        for i, m in enumerate(rec):
            m = m.reshape(rows, t, -1)[:b]  # b rows at the same positions: a batch-b decode step at every t
            dens[SITES[i % 4]].append(float(m.any(axis=0).mean()))
            indep[SITES[i % 4]].append(float(1 - (1 - m[0].mean()) ** b))
        out[b] = {"union_density": {s: float(np.mean(dens[s])) for s in SITES},
                  "effective_union_sparsity": 1 - sum(np.mean(dens[s]) * w[s] for s in SITES) / total,
                  "independent_sets_effective_sparsity": 1 - sum(np.mean(indep[s]) * w[s] for s in SITES) / total}
    return out


def real_text_args(ap: argparse.ArgumentParser, rows: int, rows_help: str) -> None:
    """The arguments of a run of real text through a checkpoint and its rotations (this script, select_window.py)."""
    ap.add_argument("ckpt", help="converted checkpoint (larosa convert)")
    ap.add_argument("rotations", help="fused-flavour rotations (larosa calibrate --flavour fused)")
    ap.add_argument("--text", default="../shared/data/wikitext-2-raw-v1/wiki.test.raw", help="raw text file")
    ap.add_argument("--rows", type=int, default=rows, help=rows_help)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--sparsity", default="0.25,0.4,0.5")


def load_real_text(ap: argparse.ArgumentParser, args) -> tuple:
    """(model, rotations, tokens [rows, seqlen] from random windows of the text, sparsities); bad input ends
    in ``ap.error`` naming the argument."""
    if not Path(args.text).is_file():
        ap.error(f"--text {args.text}: no such file")
    try:
        ps = [float(v) for v in args.sparsity.split(",")]
    except ValueError:
        ap.error(f"--sparsity {args.sparsity!r}: expected a comma list of numbers")
    model = checkpoint.load(args.ckpt)
    stats = CalibrationStats.load(args.rotations)
    ids = tokenize(checkpoint.load_tokenizer(args.ckpt), Path(args.text).read_text())
    if len(ids) < args.rows * args.seqlen:
        ap.error(f"--text {args.text}: {len(ids)} tokens, need {args.rows} × {args.seqlen}")
    starts = np.random.default_rng(0).choice(len(ids) - args.seqlen, args.rows, replace=False)
    return model, stats, jnp.asarray(np.stack([ids[s:s + args.seqlen] for s in starts]), jnp.int32), ps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_text_args(ap, 8, "windows (batch rows), at least the largest batch reported")
    ap.add_argument("--out", required=True, help="JSON output")
    args = ap.parse_args(argv)
    if args.rows < 8:
        ap.error(f"--rows {args.rows}: batches up to 8 are reported, need at least 8 rows")
    model, stats, tokens, ps = load_real_text(ap, args)
    res = {}
    with record_sites() as rec:
        for method, mode in [("larosa", "fused"), ("topk", "faithful")]:
            for p in ps:
                rec.clear()
                sparsify(model, stats, SparseConfig(method, mode, p))(tokens)
                assert len(rec) == 4 * model.config.num_layers, len(rec)
                res[f"{method}@{p}"] = row = union_stats(rec, model.config, args.rows, args.seqlen)
                print(method, p, {b: round(r["effective_union_sparsity"], 3) for b, r in row.items()}, flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": Path(args.ckpt).name, "data": f"{Path(args.text).name}, {args.rows} windows of {args.seqlen} tokens",
                   "results": res}, f, indent=1)
    os.replace(tmp, args.out)  # atomic: a failed run leaves the old file


if __name__ == "__main__":
    main()
