"""How often the Top-K search window (kernel option ``window``) holds the k-th magnitude on real activations.

The selection kernel guesses each row's k-th largest |x| from its mean |x| and bisects only inside a
window of 2^8 bf16 codes around the guess; when the k-th magnitude lies outside (one count tells), it
bisects the top bits too, as without a window. The result is exact either way; only the speed depends
on the hit rate. Random-weight benchmarks feed the kernel near-Gaussian rows, so this runs real text
through a real checkpoint (La RoSA fused, Top-K without rotation) and reports, per site and sparsity,
the fraction of token rows whose k-th magnitude falls inside the window (``ops.window_hits``, the jnp
twin of the kernel's own check).

    python eval/select_window.py CKPT ROTATIONS --text wiki.test.raw --out eval/results/select_window_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from larosa_jax import pallas as ops
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SITES, SparseConfig, site_dims, site_ks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_union import load_real_text, real_text_args, record_sites  # noqa: E402


def hit_rates(model, stats, tokens, configs) -> dict:
    cfg = model.config
    out = {}
    for method, mode, p in configs:
        sc = SparseConfig(method, mode, p)
        ks, dims = site_ks(cfg, sc), site_dims(cfg)
        with record_sites(lambda x, keep: x) as rec:
            sparsify(model, stats, sc)(tokens)
        hits = {s: [] for s in SITES}
        for i, x in enumerate(rec):
            s = SITES[i % len(SITES)]
            hits[s].append(np.asarray(ops.window_hits(x.reshape(-1, x.shape[-1]), ks[s])))
        out[f"{method}@{p:g}"] = {s: {"k": ks[s], "d": dims[s], "hit_rate": float(np.concatenate(hits[s]).mean()),
                                      "worst_layer": float(min(h.mean() for h in hits[s]))} for s in SITES}
        print(method, p, {s: round(v["hit_rate"], 4) for s, v in out[f"{method}@{p:g}"].items()}, flush=True)
    return out


def markdown(doc) -> str:
    lines = ["# Top-K search window: hit rate on real activations", "",
             f"Model {doc['model']}; text {doc['data']}; {doc['rows']} token rows per site and layer; {doc['calibration']}. "
             "A hit is a row whose "
             "k-th largest |x| (bf16) lies inside the kernel's window, so its search skips the top bits; a miss costs "
             "the full bisection (the answer is exact either way). Official α; k per site in brackets. "
             "Cell: hit rate over every token and layer (worst layer).", "",
             "| config | " + " | ".join(SITES) + " |", "| --- | " + " | ".join("---:" for _ in SITES) + " |"]
    for name, row in doc["results"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[s]['hit_rate']:.3f} ({row[s]['worst_layer']:.3f}) [k={row[s]['k']}/{row[s]['d']}]" for s in SITES) + " |")
    lines += ["", f"Reproduce: `{doc['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_text_args(ap, 4, "windows of text")
    ap.add_argument("--out", required=True, help="path prefix for <prefix>.json and <prefix>.md")
    args = ap.parse_args(argv)
    model, stats, tokens, ps = load_real_text(ap, args)
    configs = [(m, mode, p) for m, mode in (("larosa", "fused"), ("topk", "faithful")) for p in ps]
    md = stats.metadata
    doc = {"model": Path(args.ckpt).name, "data": f"{Path(args.text).name}, {args.rows} windows of {args.seqlen} tokens",
           "calibration": f"{md.get('flavour')} rotations from {md.get('samples')} × {md.get('seqlen')} tokens of "
                          f"{md.get('data_source')}",
           "rows": args.rows * args.seqlen,
           "command": "python eval/select_window.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": hit_rates(model, stats, tokens, configs)}
    for suffix, text in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", markdown(doc))):
        tmp = args.out + suffix + ".tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, args.out + suffix)  # atomic: a failed run leaves the old file
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
