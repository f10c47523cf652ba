"""Union of per-token Top-K keep sets over a batch of B decode rows, on real activations (SmolLM2-135M,
WikiText-2 test): what a batch-B sparse GEMV on the union must read, La RoSA (fused, rotated) vs Top-K."""
import json, sys, numpy as np, jax, jax.numpy as jnp
from larosa_jax import checkpoint, sparsity
from larosa_jax import pallas as ops
from larosa_jax.calibration import CalibrationStats
from larosa_jax.sparse_model import sparsify
from larosa_jax.sparsity import SparseConfig, SITES, site_params
from larosa_jax.data import load_text, tokenize

ckpt, rot, out = sys.argv[1], sys.argv[2], sys.argv[3]  # converted ckpt, fused-flavour rotations, JSON out
wiki = sys.argv[4] if len(sys.argv) > 4 else "../shared/data/wikitext-2-raw-v1/wiki.test.raw"
B, T = 8, 256
model = checkpoint.load(ckpt)
stats = CalibrationStats.load(rot)
tok = checkpoint.load_tokenizer(ckpt)
ids = tokenize(tok, open(wiki).read())
rng = np.random.default_rng(0)
starts = rng.choice(len(ids) - T, B, replace=False)
tokens = jnp.asarray(np.stack([ids[s:s + T] for s in starts]), jnp.int32)
cfg = model.config
w = site_params(cfg)
rec = []
orig = sparsity.kept_projection
def hook(x, keep, linears, residual=None, raw=False):
    rec.append(np.asarray(ops.keep_mask(x, keep.thr)))
    return orig(x, keep, linears, residual, raw)
sparsity.kept_projection = hook
res = {}
for method, mode in [("larosa", "fused"), ("topk", "faithful")]:
    for p in (0.25, 0.4, 0.5):
        rec.clear()
        sm = sparsify(model, stats, SparseConfig(method, mode, p))
        sm(tokens)
        assert len(rec) == 4 * cfg.num_layers, len(rec)
        row = {}
        for b in (1, 2, 4, 8):
            dens = {s: [] for s in SITES}
            rnd = {s: [] for s in SITES}
            for i, m in enumerate(rec):
                s = SITES[i % 4]
                m = m.reshape(B, T, -1)[:b]  # b rows, same positions: a batch-b decode step at every t
                u = m.any(axis=0).mean()
                dens[s].append(float(u))
                f = m[0].mean()
                rnd[s].append(float(1 - (1 - f) ** b))
            eff = sum(np.mean(dens[s]) * w[s] for s in SITES) / sum(w.values())
            effr = sum(np.mean(rnd[s]) * w[s] for s in SITES) / sum(w.values())
            row[b] = {"union_density": {s: float(np.mean(dens[s])) for s in SITES}, "effective_union_sparsity": 1 - eff,
                      "independent_sets_effective_sparsity": 1 - effr}
        res[f"{method}@{p}"] = row
        print(method, p, {b: (round(r["effective_union_sparsity"], 3), round(r["independent_sets_effective_sparsity"], 3)) for b, r in row.items()}, flush=True)
json.dump({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "data": f"WikiText-2 test, {B} windows of {T} tokens",
           "results": res}, open(out, "w"), indent=1)
