"""Sparse GEMV and Top-K selection kernels against the dense paths, at real model shapes.

One run builds random bf16 weights on the device, checks every kernel against jnp, then times each
op as ``--iters`` calls unrolled inside one jit (chained through optimization barriers, so none is
merged with or overlaps another; each output fully reduced, so XLA cannot shrink its own dot;
weights cycled over enough copies to defeat the 50 MB L2), median of ``--repeats``
timed runs after a warm-up. No ``while_loop``: on the GPU each of its iterations waits for the host
to read the loop condition, which would swamp kernels of a few microseconds. Rows per op:

* ``xla dense``: ``x @ W`` as XLA compiles it; ``pallas dense``: the batch-1 dense GEMV kernel;
* ``sparse s=…``: ``sparse_matvec`` on a precomputed keep set of sparsity s (Top-K of a Gaussian x):
  the gather kernel at batch 1 (masked tiles with ``--gemv masked``), XLA's GEMM on the masked rows
  above (``--sweep`` times both kernels' tiles);
* ``select+sparse s=…``: the Top-K selection kernel in front of it (the decode path);
* selection alone: the kernel (as the decode path calls it), ``lax.top_k`` and the jnp bisection twin.

    python eval/bench_kernels.py --out eval/results/kernels_h200     # GPU
    python eval/bench_kernels.py --sweep --out /tmp/sweep            # GPU: tile / warp / step choices
    python eval/bench_kernels.py --tiny                              # CPU smoke test (interpret mode)

Writes <out>.json, <out>.md and <out>.png (speed-up over XLA dense against sparsity, ideal 1/(1-s)).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT / "eval"))  # kernel_trace

from kernel_trace import kernel_profile  # noqa: E402  (eval/kernel_trace.py)
from larosa_jax import pallas as ops  # noqa: E402
from larosa_jax.pallas import select as sel  # noqa: E402
from larosa_jax.pallas import sparse_gemv as sg  # noqa: E402

SHAPES = {  # name: (D_in, D_out of each weight sharing the input)
    "llama2 q/k/v": (4096, (4096, 4096, 4096)),
    "llama2 o": (4096, (4096,)),
    "llama2 up": (4096, (11008,)),
    "llama2 gate/up": (4096, (11008, 11008)),
    "llama2 down": (11008, (4096,)),
    "llama3 q/k/v": (4096, (4096, 1024, 1024)),
    "llama3 gate/up": (4096, (14336, 14336)),
    "llama3 down": (14336, (4096,)),
    "qwen2 q/k/v": (3584, (3584, 512, 512)),
    "qwen2 gate/up": (3584, (18944, 18944)),
    "qwen2 down": (18944, (3584,)),
}
TINY = {"tiny up": (256, (384,)), "tiny q/k/v": (128, (128, 64, 64))}
SPARSITIES = (0.25, 0.5, 0.75, 0.9)
L2_BYTES = 50e6


def _k(s: float, d: int) -> int:
    return max(1, int(round((1 - s) * d)))


def chained(fn, iters: int):
    """One jit of ``iters`` calls of ``fn(i, *args)`` (a float32 scalar), chained: call i's operands pass
    through an optimization barrier together with call i - 1's result, so XLA can neither merge two
    calls into one matmul nor overlap them."""

    @jax.jit
    def many(*a):
        acc = jnp.zeros((), jnp.float32)
        for i in range(iters):
            a, acc = jax.lax.optimization_barrier((a, acc))
            acc = acc + fn(i, *a)
        return acc

    return many


def timed(fn, args, iters: int, repeats: int) -> float:
    """Seconds per call of ``fn(i, *args)``: wall time of :func:`chained`, median of ``repeats`` runs."""
    many = chained(fn, iters)
    jax.block_until_ready(many(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(many(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / iters


def traced(fn, args, iters: int) -> tuple[float, dict]:
    """The device's own time per call of ``fn(i, *args)`` (a trace of one :func:`chained` run): the busy
    span in µs, and µs per call by kernel name."""
    many = chained(fn, iters)
    prof = kernel_profile(lambda: jax.block_until_ready(many(*args)), iters)
    kern = {k["kernel"][:120]: round(k["us_per_step"], 3) for k in prof.get("top", [])}
    return prof.get("busy_ms_per_step", float("nan")) * 1e3, kern


def _probe(outs) -> jax.Array:
    """A scalar that depends on every output entry. (A single entry would let XLA shrink its own dot
    to one column: the first runs timed XLA's dense GEMV at 10-18 µs for 176 MB that way.)"""
    return sum(jnp.sum(o, dtype=jnp.float32) for o in outs)


def _weights(k, ns, tiny):
    nbytes = k * sum(ns) * 2
    copies = 1 if tiny else max(1, int(np.ceil(2 * L2_BYTES / nbytes)))
    keys = jax.random.split(jax.random.key(k + sum(ns)), copies * len(ns))
    return nbytes, [tuple((jax.random.normal(keys[c * len(ns) + j], (k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
                          for j, n in enumerate(ns)) for c in range(copies)]


def _keep(x, kk, gemv="gather"):
    """What the decode path hands the GEMV: the selection kernel's outputs for one row, threshold pairs above."""
    if x.shape[0] == 1:
        return sel.select_topk(x, kk, kernel=True, compact=gemv == "gather", window=True)
    return sel.KeepSet(sel.topk_threshold(x, kk, kernel=True, window=True))


def bench_shape(name, k, ns, rows, args, rng) -> list[dict]:
    nbytes, wsets = _weights(k, ns, args.tiny)
    copies = len(wsets)
    xs = jnp.asarray(rng.standard_normal((args.iters, rows, k)), jnp.bfloat16)
    none = (None,) * len(ns)
    out = []

    def record(op, s, fn, a, err=None):
        sec = timed(fn, a, args.iters, args.repeats)
        r = {"shape": name, "d_in": k, "d_out": list(ns), "tokens": rows, "op": op, "sparsity": s,
             "us": sec * 1e6, "weight_MB": nbytes / 1e6, "copies": copies, "rel_err": err}
        extra = ""
        if args.trace:
            r["device_busy_us"], r["kernels_us"] = traced(fn, a, args.iters)
            extra = f"  device busy {r['device_busy_us']:.2f} us: " + ", ".join(
                f"{v:.2f} {kn[:40]}" for kn, v in list(r["kernels_us"].items())[:3])
        out.append(r)
        print(f"{name:16s} b={rows} {op:14s} s={s!s:5s} {sec * 1e6:9.2f} us"
              + ("" if err is None else f"  rel err {err:.2e}") + extra, flush=True)

    def xla_dense(i, xs, wsets):
        return _probe([jnp.dot(xs[i], w, preferred_element_type=jnp.float32).astype(jnp.bfloat16) for w in wsets[i % copies]])

    record("xla dense", 0.0, xla_dense, (xs, wsets))
    if rows == 1:
        def pallas_dense(i, xs, wsets):
            return _probe(ops.matvec(xs[i], wsets[i % copies], none, kernel=True))

        record("pallas dense", 0.0, pallas_dense, (xs, wsets))

    for s in args.sparsities:
        kk = _k(s, k)
        # correctness at this sparsity, against the jnp twin in float32
        keep = _keep(xs[0], jnp.int32(kk), args.gemv)
        got = ops.sparse_matvec(xs[0], keep, wsets[0], none, gemv=args.gemv)
        ref_thr = sel.topk_threshold_reference(xs[0], kk)
        xk = ops.apply(xs[0], ref_thr).astype(jnp.float32)
        want = [jnp.dot(xk, w.astype(jnp.float32), precision="highest") for w in wsets[0]]
        err = max(float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w)) for g, w in zip(got, want))
        same = bool(jnp.all(ops.keep_mask(xs[0], keep.thr) == ops.keep_mask(xs[0], ref_thr)))
        if err > 1e-2 or not same:
            raise SystemExit(f"{name} b={rows} s={s}: kernel mismatch (rel err {err:.3g}, same keep set: {same})")
        keeps = [_keep(xs[i], jnp.int32(kk), args.gemv) for i in range(args.iters)]

        def sparse(i, xs, keeps, wsets):
            return _probe(ops.sparse_matvec(xs[i], keeps[i], wsets[i % copies], none, gemv=args.gemv))

        def select_sparse(i, xs, kk, wsets):
            return _probe(ops.sparse_matvec(xs[i], _keep(xs[i], kk, args.gemv), wsets[i % copies], none, gemv=args.gemv))

        record("sparse", s, sparse, (xs, keeps, wsets), err)
        record("select+sparse", s, select_sparse, (xs, jnp.int32(kk), wsets))
    return out


def bench_select(d, rows, args, rng) -> list[dict]:
    xs = jnp.asarray(rng.standard_normal((args.iters, rows, d)), jnp.bfloat16)
    kk = _k(0.5, d)
    out = []
    variants = {
        "select kernel": lambda i, xs: _keep(xs[i], jnp.int32(kk)).thr[..., 0].sum().astype(jnp.float32),
        "jnp bisection": lambda i, xs: sel.topk_threshold_reference(xs[i], kk)[..., 0].sum().astype(jnp.float32),
        "lax.top_k": lambda i, xs: jax.lax.top_k(jnp.abs(xs[i]).astype(jnp.float32), kk)[0][..., -1].sum(),
    }
    for op, fn in variants.items():
        sec = timed(fn, (xs,), args.iters, args.repeats)
        out.append({"shape": f"select D={d}", "d_in": d, "d_out": [], "tokens": rows, "op": op, "sparsity": 0.5,
                    "us": sec * 1e6})
        print(f"select D={d:6d} b={rows} {op:16s} {sec * 1e6:9.2f} us", flush=True)
    return out


def sweep(names, table, args, rng) -> list[dict]:
    """Tile / warp / step choices of the kernels at 50% (gather at batch 1, masked tiles at 1 and 4)."""
    out = []

    def rec(shape, op, rows, s, us, extra=""):
        out.append({"shape": shape, "tokens": rows, "op": op, "sparsity": s, "us": us})
        print(f"sweep {shape:16s} b={rows} s={s} {op:34s} {us:8.2f} us {extra}", flush=True)

    for n in names:
        k, ns = table[n]
        nbytes, wsets = _weights(k, ns, args.tiny)
        copies = len(wsets)
        for rows in args.sweep_batches:
            xs = jnp.asarray(rng.standard_normal((args.iters, rows, k)), jnp.bfloat16)
            kk = _k(0.5, k)
            thrs = [sel.topk_threshold(xs[i], kk, kernel=True) for i in range(args.iters)]
            tiles = [(64, 128, 4), (128, 128, 4), (128, 256, 4), (128, 128, 8)]
            for bm, bn, w in tiles[:1] if args.tiny else tiles:
                def f(i, xs, thrs, wsets, bm=bm, bn=bn, w=w):
                    return _probe(sg.sums(xs[i], thrs[i], wsets[i % copies], bm=bm, bn=bn, warps=w))
                us = timed(f, (xs, thrs, wsets), args.iters, args.repeats) * 1e6
                rec(n, f"masked bm={bm} bn={bn} w={w}", rows, 0.5, us, f"({nbytes / 2 / us / 1e3:.0f} GB/s of kept rows)")
            if rows != 1:
                continue
            keeps = [sel.select_kernel(xs[i], jnp.int32(kk)) for i in range(args.iters)]  # (packed, order)
            gtiles = [(32, 256, 4), (64, 128, 4), (64, 256, 4), (64, 512, 8), (128, 128, 4), (128, 256, 8), (32, 512, 4)]
            for bm, bn, w in gtiles[:1] if args.tiny else gtiles:
                def g(i, xs, keeps, wsets, bm=bm, bn=bn, w=w):
                    return _probe(sg.gather_sums(xs[i][0], keeps[i][1], keeps[i][0], wsets[i % copies], bm=bm, bn=bn, warps=w))
                us = timed(g, (xs, keeps, wsets), args.iters, args.repeats) * 1e6
                rec(n, f"gather bm={bm} bn={bn} w={w}", rows, 0.5, us, f"({nbytes / 2 / us / 1e3:.0f} GB/s of kept rows)")
    for d in sorted({table[n][0] for n in names}):
        xs = jnp.asarray(rng.standard_normal((args.iters, 1, d)), jnp.bfloat16)
        kk = _k(0.5, d)
        for w in ((4,) if args.tiny else (4, 8, 16, 32)):
            def f(i, xs, w=w):
                return sel.select_kernel(xs[i], jnp.int32(kk), warps=w)[0][0, 0].astype(jnp.float32)
            rec(f"select D={d}", f"select w={w}", 1, 0.5, timed(f, (xs,), args.iters, args.repeats) * 1e6)
    return out


def own_us(r) -> tuple[list[str], float]:
    """The kernels of a traced op that are its own work (XLA's GEMM/GEMV, the Pallas kernels, named
    after their Python functions), and their summed µs per call."""
    own = {k.split(" [")[0]: v for k, v in r["kernels_us"].items() if re.search(r"gemm|gemv|dot|^_", k)}
    return sorted(own), sum(own.values())


def markdown(meta, res) -> str:
    sps = sorted({r["sparsity"] for r in res if r["op"] == "sparse"})
    lines = ["# Sparse GEMV and Top-K selection kernels", "",
             f"Device: {meta['device']}; jax {meta['jax']}; {meta['date']}. Random bf16 weights `[D_in, D_out]`, "
             f"bf16 x; each op timed as {meta['iters']} calls unrolled in one jit (chained, distinct inputs, weights cycled over "
             "copies larger than L2), median of the timed runs. Speed-up is against XLA's dense `x @ W` at the same "
             "shape and batch; `select+sparse` includes the Top-K selection kernel (the decode path). Batch 1 uses the "
             f"{'gather kernel (compacted kept rows)' if meta['gemv'] == 'gather' else 'masked-tile kernel'}; at batch > 1 the dispatch takes XLA's GEMM on the masked rows (the masked-tile "
             "kernel on the union of the keep sets, timed by `--sweep`, was slower).", "",
             "| shape | tokens | XLA dense µs | Pallas dense µs | " + " | ".join(f"sparse {s}" for s in sps)
             + " | " + " | ".join(f"select+sparse {s}" for s in sps) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in range(2 * len(sps))) + " |"]
    keys = sorted({(r["shape"], r["tokens"]) for r in res if not r["shape"].startswith("select D")},
                  key=lambda t: (t[1], t[0]))
    for shape, b in keys:
        rs = [r for r in res if r["shape"] == shape and r["tokens"] == b]
        get = lambda op, s=0.0: next((r["us"] for r in rs if r["op"] == op and r["sparsity"] == s), None)  # noqa: E731
        base = get("xla dense")
        pd = get("pallas dense")
        cells = []
        for op in ("sparse", "select+sparse"):
            for s in sps:
                u = get(op, s)
                cells.append(f"{u:.1f} ({base / u:.2f}x)" if u else "")
        lines.append(f"| {shape} | {b} | {base:.1f} | {'' if pd is None else f'{pd:.1f}'} | " + " | ".join(cells) + " |")
    traced = [r for r in res if r.get("kernels_us") and not r["shape"].startswith("select D")]
    if traced:
        lines += ["", "Device time per call from a trace (`--trace`), µs: the op's own kernels only (the GEMM/GEMV, "
                  "or the Pallas kernels; not the probe's reduction or copies, which the wall times above include on "
                  "both sides). Speed-up against XLA's dense kernel:", "",
                  "| shape | tokens | op | sparsity | kernels | µs | speed-up |", "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
        for r in traced:
            base = next((own_us(q)[1] for q in traced if q["shape"] == r["shape"] and q["tokens"] == r["tokens"]
                         and q["op"] == "xla dense"), None)
            names, us = own_us(r)
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['op']} | {r['sparsity']} | {', '.join(names)} | {us:.2f} | "
                         + (f"{base / us:.2f}x |" if base else " |"))
    sel_rows = [r for r in res if r["shape"].startswith("select D")]
    if sel_rows:
        lines += ["", "Top-K selection alone (k = D/2), µs per call:", "", "| D | tokens | select kernel | jnp bisection | lax.top_k |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for d, b in sorted({(r["d_in"], r["tokens"]) for r in sel_rows}):
            g = {r["op"]: r["us"] for r in sel_rows if r["d_in"] == d and r["tokens"] == b}
            lines.append(f"| {d} | {b} | {g['select kernel']:.1f} | {g['jnp bisection']:.1f} | {g['lax.top_k']:.1f} |")
    lines += ["", "Reproduce: `python eval/bench_kernels.py --out <prefix>`", ""]
    return "\n".join(lines)


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["tokens"] for r in res if not r["shape"].startswith("select")})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), sharey=True, squeeze=False)
    xs = np.linspace(0, 0.9, 50)
    for ax, b in zip(axes[0], batches):
        ax.plot(xs, 1 / (1 - xs), "k--", label="ideal 1/(1-s)")
        for shape in sorted({r["shape"] for r in res if r["tokens"] == b and not r["shape"].startswith("select")}):
            rs = [r for r in res if r["shape"] == shape and r["tokens"] == b]
            base = next(r["us"] for r in rs if r["op"] == "xla dense")
            pts = sorted((r["sparsity"], base / r["us"]) for r in rs if r["op"] == "select+sparse")
            if pts:
                ax.plot(*zip(*pts), "o-", label=shape)
        ax.set_title(f"select + sparse GEMV, {b} token{'s' if b > 1 else ''}")
        ax.set_xlabel("activation sparsity s")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over XLA dense GEMV")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list of shape names (default: all)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--iters", type=int, default=32, help="calls unrolled per timed jit (each on its own input)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="path prefix for .json/.md/.png")
    ap.add_argument("--tiny", action="store_true", help="small shapes in interpret mode (CPU smoke test)")
    ap.add_argument("--sweep", action="store_true", help="only sweep tile/warp/step choices (picking the defaults)")
    ap.add_argument("--sweep-batches", default="1,4")
    ap.add_argument("--trace", action="store_true", help="also trace each op: the device's own time per call, by kernel")
    ap.add_argument("--gemv", default="gather", choices=["gather", "masked"],
                    help="the batch-1 sparse GEMV: gather (compacted kept rows, the Top-K decode path) or masked tiles")
    args = ap.parse_args(argv)
    if args.tiny:  # off a GPU the kernels run in interpret mode
        args.iters, args.repeats = 2, 1
    table = TINY if args.tiny else SHAPES
    names = list(table) if not args.shapes else [s.strip() for s in args.shapes.split(",")]
    for n in names:
        if n not in table:
            ap.error(f"unknown shape {n!r}; known: {', '.join(table)}")
    batches = [int(b) for b in args.batches.split(",")]
    args.sparsities = [float(v) for v in args.sparsities.split(",")]
    dev = jax.devices()[0]
    meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "iters": args.iters, "repeats": args.repeats, "tiny": args.tiny, "gemv": args.gemv,
            "tiles": {"masked": [sg.BM, sg.BN, sg.WARPS], "gather": [sg.GBM, sg.GBN, sg.GWARPS]}}
    print(json.dumps(meta), flush=True)
    outs = [Path(args.out)] if args.out else []
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / Path(args.out or "kernels").name)
    rng = np.random.default_rng(0)
    res = []

    def write(with_md=True):
        md = markdown(meta, res) if with_md else ""
        for o in outs:
            o.parent.mkdir(parents=True, exist_ok=True)
            files = [(".json", json.dumps({"meta": meta, "results": res}, indent=1) + "\n")] + ([(".md", md)] if with_md else [])
            for suffix, text in files:
                tmp = Path(str(o) + suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(Path(str(o) + suffix))
            if with_md:
                try:
                    plot(res, str(o) + ".png")
                except Exception as e:  # noqa: BLE001  (a plot is not worth losing the numbers)
                    print(f"plot failed: {e}")
        return md

    if args.sweep:
        args.sweep_batches = [int(b) for b in args.sweep_batches.split(",")]
        res = sweep(names, table, args, rng)
        write(with_md=False)
        return
    for b in batches:
        for n in names:
            k, ns = table[n]
            res += bench_shape(n, k, ns, b, args, rng)
            write()
    for d in sorted({table[n][0] for n in names}):
        for b in batches:
            res += bench_select(d, b, args, rng)
    print(write())


if __name__ == "__main__":
    main()
