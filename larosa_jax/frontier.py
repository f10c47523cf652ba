"""The speed–quality frontier: for one real checkpoint, perplexity of each recipe × sparsity on the
same windows, paired with its decode ms/token at a named model shape read from a committed GPU
decode benchmark (``eval/bench_decode.py`` JSON; nothing is timed here), so that the question "at the
speed I want, which method gives the best text?" has a table and a plot. Without a benchmark file the
run is the quality half alone: perplexity and per-layer error against effective sparsity.

A *recipe* is a deployable way to sparsify (plus reference lines): the method, its selection, the
rotations flavour it needs and the benchmark config whose kernels it runs (``RECIPES``). A recipe
whose decode has no kernel of its own borrows a benchmark's at equal effective sparsity and is marked
``estimated`` (the faithful simulation, CATS); the Pareto set is taken over the others.

Output: ``OUT.json`` (rows, speeds and their source), ``OUT.md`` (table, Pareto rows in bold),
``OUT.png`` (perplexity against speed-up and against ms/token, one line per recipe), rewritten after
every row; ``--resume`` continues a run with the same settings (reusing the greedy paths of the allocating
recipes, kept in the JSON). :func:`pick` answers "the best
recipe for this target" from such a file (``larosa tune``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from . import outputs
from .config import ConfigError, read_json
# jax-heavy modules (sparsity, evaluate) are imported where used: the CLI reads RECIPES for its help text


class FrontierError(ValueError):
    """A frontier that cannot be made or read: a speed file without the needed entry, mixed devices, an
    unreachable target."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One line of the frontier: how to build the SparseConfig at sparsity p, the rotations flavour it
    needs (None: none; "any": the plain sites' quantiles of any calibration), and the benchmark method
    whose decode it runs."""

    method: str
    mode: str = "faithful"
    select: str = "topk"
    flavour: str | None = None
    speed: str = "dense"
    estimated: bool = False  # no kernel of its own: the speed of ``speed`` at equal effective sparsity
    weighted: bool = False
    allocate: bool = False  # per-layer, per-site sparsities (larosa_jax.allocation) on held-out calibration windows
    about: str = ""

    def config(self, p: float):
        """The SparseConfig at nominal sparsity ``p``."""
        from .sparsity import SparseConfig

        if self.method == "dense":
            return SparseConfig("dense")
        return SparseConfig(self.method, self.mode, p, "official", select=self.select, weighted=self.weighted)


RECIPES = {
    "dense": Recipe("dense", about="no sparsity"),
    "teal": Recipe("teal", flavour="any", speed="teal", about="TEAL: calibrated magnitude thresholds, no rotation"),
    "cats": Recipe("cats", flavour="any", speed="teal", estimated=True,
                   about="CATS: |SiLU(gate)| threshold on the MLP (speed: TEAL's kernels at equal effective sparsity)"),
    "topk": Recipe("topk", speed="topk", about="per-token Top-K without rotation (official α)"),
    "larosa-faithful": Recipe("larosa", "faithful", flavour="faithful", speed="larosa", estimated=True,
                              about="La RoSA's simulation, the paper's reference (not deployable; speed: the fused "
                                    "model's at equal effective sparsity)"),
    "larosa-fused": Recipe("larosa", "fused", flavour="fused", speed="larosa",
                           about="deployable La RoSA: γ-free Q of the attention input, Top-K, adapters"),
    "larosa-fused-faithfulq": Recipe("larosa", "fused", flavour="faithful", speed="larosa",
                                     about="deployable La RoSA with the faithful Q (of norm(h)·γ) folded in, Top-K"),
    "larosa-joint": Recipe("larosa", "fused", flavour="joint", speed="larosa",
                           about="deployable La RoSA, Q of both rotated sites (joint flavour), Top-K, adapters"),
    "larosa-joint-wa": Recipe("larosa", "fused", flavour="joint", speed="larosa", weighted=True,
                              about="joint Q, weight-aware Top-K (|a_i|·‖W_i‖, folded), adapters"),
    "larosa-joint-thr": Recipe("larosa", "fused", "threshold", flavour="joint", speed="larosa-thr",
                               about="joint Q, calibrated thresholds on the rotated rows, adapters"),
    "teal-alloc": Recipe("teal", flavour="any", speed="teal", allocate=True,
                         about="TEAL with its block-wise greedy: per-layer, per-site sparsities on calibration text"),
    "larosa-global": Recipe("larosa", "fused", flavour="global", speed="topk",
                            about="one global Q (no adapters), Top-K: Top-K's cost"),
    "larosa-global-thr": Recipe("larosa", "fused", "threshold", flavour="global", speed="teal",
                                about="one global Q (no adapters), calibrated thresholds: TEAL's cost"),
    "larosa-identity-thr": Recipe("larosa", "fused", "threshold", flavour="identity", speed="teal",
                                  about="Q = I: La RoSA's γ-free thresholds and site split without a rotation; TEAL's cost"),
    "larosa-global-thr-alloc": Recipe("larosa", "fused", "threshold", flavour="global", speed="teal", allocate=True,
                                      about="larosa-global-thr with TEAL's block-wise greedy in place of the α split"),
    "larosa-identity-thr-alloc": Recipe("larosa", "fused", "threshold", flavour="identity", speed="teal", allocate=True,
                                        about="larosa-identity-thr with TEAL's block-wise greedy in place of the α split"),
    "larosa-global-thr-wa": Recipe("larosa", "fused", "threshold", flavour="global", speed="teal", weighted=True,
                                   about="larosa-global-thr on |a|·s (s: weight-row norms, folded): TEAL's cost"),
    "larosa-identity-thr-wa": Recipe("larosa", "fused", "threshold", flavour="identity", speed="teal", weighted=True,
                                     about="larosa-identity-thr on |a|·s (s: weight-row norms, folded): TEAL's cost"),
}


# ----------------------------------------------------------------------------- speeds
DENSE_SPREAD = 1.02  # the most the dense rows of one run's bench files may differ (one H100: 6.237 / 6.238)


def load_speeds(paths: list[str | Path], shape: str) -> dict:
    """Batch-1 decode speeds of ``shape`` from bench_decode JSON files of one run (one device, dense rows
    within 2%): ``{"dense": ms, "curves": {bench method: [(effective sparsity, ms/token), ...]}, "device",
    "sources"}``."""
    if not paths:
        raise FrontierError("--speeds: name at least one bench_decode JSON (e.g. eval/results/decode_h100.json)")
    devices, curves, dense, sources = set(), {}, [], []
    for path in paths:
        try:
            doc = read_json(Path(path), "bench_decode results")
        except ConfigError as e:
            raise FrontierError(str(e)) from None
        meta, rows = doc.get("meta"), doc.get("results")
        if not isinstance(meta, dict) or not isinstance(rows, list) or "device" not in meta:
            raise FrontierError(f"{path}: not a bench_decode results file (needs meta.device and results)")
        devices.add(meta["device"])
        sources.append({"file": str(path), "device": meta["device"], "jax": meta.get("jax"), "date": meta.get("date")})
        for r in rows:
            if r.get("model") != shape or r.get("batch", 1) != 1 or "ms_per_token" not in r:
                continue
            if r.get("method") == "dense":
                dense.append((r["ms_per_token"], str(path)))
            else:
                curves.setdefault(r["method"], []).append((float(r["effective_sparsity"]), float(r["ms_per_token"])))
    if len(devices) > 1:
        raise FrontierError(f"--speeds: files from several devices ({', '.join(sorted(devices))}); one frontier takes "
                            "the timings of one device")
    if not dense:
        raise FrontierError(f"--speeds: no dense batch-1 row for shape {shape!r} in {', '.join(map(str, paths))}")
    lo, hi = min(dense), max(dense)
    if hi[0] > DENSE_SPREAD * lo[0]:  # another decode plan or another machine: their speed-ups do not compare
        raise FrontierError(f"--speeds: dense {lo[0]:.3f} ms/token in {lo[1]} but {hi[0]:.3f} in {hi[1]}; one "
                            "frontier takes the timings of one run (its files' dense within 2%)")
    return {"dense": float(np.median([d for d, _ in dense])), "curves": {m: sorted(set(v)) for m, v in curves.items()},
            "device": devices.pop(), "sources": sources, "shape": shape}


def ms_per_token(speeds: dict | None, method: str, effective: float) -> float | None:
    """Decode ms/token of bench ``method`` at ``effective`` sparsity: linear between measured points, never
    beyond them (an error naming the file's range)."""
    if speeds is None:
        return None
    if method == "dense" or effective == 0.0:
        return speeds["dense"]
    pts = speeds["curves"].get(method)
    files = ", ".join(s["file"] for s in speeds["sources"])
    if not pts:
        raise FrontierError(f"{files}: no batch-1 {method!r} rows for shape {speeds['shape']!r} (bench_decode "
                            f"--configs {method}@P); have {', '.join(sorted(speeds['curves'])) or 'none'}")
    xs, ys = zip(*pts)
    if not xs[0] - 1e-3 <= effective <= xs[-1] + 1e-3:
        raise FrontierError(f"{files}: {method!r} measured at effective sparsity {xs[0]:.3f}-{xs[-1]:.3f} for "
                            f"{speeds['shape']!r}; {effective:.3f} is outside (bench it there)")
    return float(np.interp(effective, xs, ys))


# ----------------------------------------------------------------------------- Pareto and pick
def pareto(rows: list[dict]) -> list[dict]:
    """Rows no other deployable row beats on both speed-up (≥) and perplexity (≤, one strictly better); none
    without speeds."""
    cand = [r for r in rows if not r.get("estimated") and r.get("speedup") is not None]
    return [r for r in cand if not any(
        o["speedup"] >= r["speedup"] and o["ppl"] <= r["ppl"] and (o["speedup"] > r["speedup"] or o["ppl"] < r["ppl"])
        for o in cand)]


def pick(result: dict, *, target_speedup: float | None = None, max_ppl_increase: float | None = None) -> dict:
    """The deployable row that best meets one target: the lowest perplexity at speed-up ≥ ``target_speedup``,
    or the fastest within ``max_ppl_increase`` of dense; a target no row reaches is an error naming the
    best there is."""
    if (target_speedup is None) == (max_ppl_increase is None):
        raise FrontierError("give one target: --target-speedup S or --max-ppl-increase X")
    if any(r.get("speedup") is None for r in result["rows"]):
        raise FrontierError("that frontier was measured without --speeds (quality only): rerun larosa frontier with a "
                            "bench_decode JSON to pick by speed")
    rows = [r for r in result["rows"] if not r.get("estimated") and r["recipe"] != "dense"]
    dense = next((r["ppl"] for r in result["rows"] if r["recipe"] == "dense"), None)
    if not rows:
        raise FrontierError("the frontier holds no deployable sparse rows")
    if target_speedup is not None:
        ok = [r for r in rows if r["speedup"] >= target_speedup]
        if not ok:
            best = max(rows, key=lambda r: r["speedup"])
            raise FrontierError(f"no committed config reaches {target_speedup:g}x; the fastest is {best['recipe']} at "
                                f"p={best['sparsity']:g}: {best['speedup']:.3f}x (ppl {best['ppl']:.3f})")
        return min(ok, key=lambda r: (r["ppl"], -r["speedup"]))
    if dense is None:
        raise FrontierError("--max-ppl-increase needs the frontier's dense row")
    ok = [r for r in rows if r["ppl"] - dense <= max_ppl_increase]
    if not ok:
        best = min(rows, key=lambda r: r["ppl"])
        raise FrontierError(f"no committed config stays within +{max_ppl_increase:g} ppl of dense ({dense:.3f}); the "
                            f"closest is {best['recipe']} at p={best['sparsity']:g}: {best['ppl']:.3f} "
                            f"(+{best['ppl'] - dense:.3f})")
    return max(ok, key=lambda r: (r["speedup"], -r["ppl"]))


def versus(rows: list[dict], ref: str = "teal") -> list[dict]:
    """Each other recipe against ``ref`` at equal speed-up: ``ref``'s perplexity interpolated (linearly in speed-up,
    dense as its 1.0x point) at each row's speed-up inside ``ref``'s measured range; per recipe the speed-up
    range compared and the smallest and largest gap ppl − ref (negative: better text than ``ref``)."""
    curve = sorted((r["speedup"], r["ppl"]) for r in rows if r.get("speedup") is not None
                   and r["recipe"] in (ref, "dense"))
    if len(curve) < 2:
        return []
    xs, ys = zip(*curve)
    out = []
    for name in dict.fromkeys(r["recipe"] for r in rows if r["recipe"] not in (ref, "dense")):
        pts = sorted((r["speedup"], r["ppl"] - float(np.interp(r["speedup"], xs, ys))) for r in rows
                     if r["recipe"] == name and r.get("speedup") is not None and xs[0] <= r["speedup"] <= xs[-1])
        if pts:
            gaps = [g for _, g in pts]
            out.append({"recipe": name, "from": pts[0][0], "to": pts[-1][0], "rows": len(pts),
                        "below": sum(g < 0 for g in gaps), "worst": max(gaps), "best": min(gaps),
                        "estimated": RECIPES[name].estimated})
    return out


def tuned_config(row: dict, source: str, meta: dict) -> dict:
    """What ``larosa tune`` saves for a frontier row: its SparseConfig (``SparseConfig.load`` reads it), the
    rotations flavour it needs and what was measured."""
    rec = RECIPES[row["recipe"]]
    sc = rec.config(row["sparsity"])
    if row.get("layers"):  # an allocating recipe: the table that was measured
        sc = dataclasses.replace(sc, layers=tuple(tuple(r) for r in row["layers"]))
    return {"sparse_config": sc.to_dict(), "rotations_flavour": rec.flavour,
            "frontier": source, "measured": {k: row[k] for k in ("recipe", "sparsity", "effective", "ppl",
                                                                  "ms_per_token", "speedup")},
            "speeds": {k: meta["speeds"][k] for k in ("device", "shape")}}


def _is_tuned(path: Path) -> bool:
    try:
        return isinstance(read_json(path).get("sparse_config"), dict)
    except (ConfigError, OSError):
        return False


TUNED = outputs.Kind("sparse config (json from larosa tune)", False, _is_tuned)


# ----------------------------------------------------------------------------- pairing
def _check_quality(quality, source: str) -> list[dict]:
    rows = quality.get("rows") if isinstance(quality, dict) else None
    if not isinstance(rows, list) or not isinstance(quality.get("meta"), dict) or not all(
            isinstance(r, dict) and r.get("recipe") in RECIPES and isinstance(r.get("effective"), (int, float))
            for r in rows):
        raise FrontierError(f"{source or 'quality'}: not a larosa frontier results file (meta and rows of known recipes)")
    return rows


# what makes two quality runs' perplexities comparable: the same model, text, windows and protocol
SAME = ("model_fingerprint", "data_fingerprint", "protocol", "limit")


def merge(qualities: list[tuple[str, dict]]) -> dict:
    """One quality result from runs of other recipes on the same checkpoint and windows (e.g. recipes added in a
    later session): their rows side by side, the dense row of the first file that has one; a setting that differs,
    a dense perplexity that differs (other windows or numerics) or a (recipe, p) measured twice is refused."""
    (src0, q0), rest = qualities[0], qualities[1:]
    rows = list(_check_quality(q0, src0))
    seen = {(r["recipe"], r["sparsity"]): src0 for r in rows}
    dense0 = next((r["ppl"] for r in rows if r["recipe"] == "dense"), None)
    meta = dict(q0["meta"])
    for src, q in rest:
        qrows = _check_quality(q, src)
        a, b = q0["meta"], q["meta"]
        for key in SAME:
            if a.get("settings", {}).get(key) != b.get("settings", {}).get(key):
                raise FrontierError(f"--from {src}: {key} {b.get('settings', {}).get(key)!r} differs from {src0}'s "
                                    f"{a.get('settings', {}).get(key)!r}; merged runs must score the same model on the "
                                    "same windows")
        if (a.get("seqlen"), a.get("windows")) != (b.get("seqlen"), b.get("windows")):
            raise FrontierError(f"--from {src}: {b.get('windows')} windows of {b.get('seqlen')} tokens, {src0} has "
                                f"{a.get('windows')} of {a.get('seqlen')}")
        for r in qrows:
            key = (r["recipe"], r["sparsity"])
            if r["recipe"] == "dense" and dense0 is not None:
                if abs(r["ppl"] / dense0 - 1) > 1e-4:
                    raise FrontierError(f"--from {src}: dense perplexity {r['ppl']:.4f}, {src0} has {dense0:.4f}; not "
                                        "the same windows or numerics")
                continue
            if r["recipe"] == "dense":
                dense0 = r["ppl"]
            if key in seen:
                raise FrontierError(f"--from {src}: {r['recipe']} p={r['sparsity']:g} is also in {seen[key]}; give "
                                    "each (recipe, p) once (--recipes picks rows)")
            seen[key] = src
            rows.append(r)
    meta["merged"] = [{"file": src, "env": q["meta"].get("env"), "settings": q["meta"].get("settings")}
                      for src, q in qualities] if rest else None
    return {"meta": meta, "rows": rows}


def pair(quality: dict, speeds: dict, recipes: list[str] | None = None, *, source: str = "") -> dict:
    """A measured frontier (``run``'s result, with or without speeds, or :func:`merge` of several) with the
    decode speeds of ``speeds`` attached: perplexity does not depend on the GPU, so one quality run serves every
    device's bench file. ``recipes``: the rows to keep (default all; dense always); every kept row's speed must
    be benchmarked."""
    rows = _check_quality(quality, source)
    have = list(dict.fromkeys(r["recipe"] for r in rows))
    want = have if recipes is None else list(recipes)
    missing = [n for n in want if n not in have]
    if missing:
        raise FrontierError(f"--recipes {','.join(missing)}: not in {source or 'the quality file'} (it has "
                            f"{', '.join(have)})")
    out = []
    for r in rows:
        if r["recipe"] != "dense" and r["recipe"] not in want:
            continue
        ms = ms_per_token(speeds, RECIPES[r["recipe"]].speed, float(r["effective"]))
        out.append({**r, "ms_per_token": ms, "speedup": speeds["dense"] / ms, "speed_from": RECIPES[r["recipe"]].speed})
    meta = dict(quality["meta"])
    meta["speeds"] = speeds
    meta["settings"] = {**meta.get("settings", {}), "speeds": [s["file"] for s in speeds["sources"]],
                        "shape": speeds["shape"]}
    meta["paired_from"] = source
    return {"meta": meta, "rows": out}


def write(result: dict, files: list[Path]) -> None:
    """OUT.json, OUT.md, OUT.png of a frontier result (each written atomically)."""
    outputs.write_file(files[0], json.dumps(result, indent=1))
    outputs.write_file(files[1], markdown(result))
    plot(result, files[2])


# ----------------------------------------------------------------------------- the run
def check_recipes(names: list[str], sparsities: list[float], cfg, rotations: dict,
                  speeds: dict | None) -> list[tuple[str, float]]:
    """Every (recipe, p) cell, checked before any work: known recipe, its rotations given, valid k, and its
    speed inside the benchmark's measured range."""
    from .sparsity import SparsityError, effective_sparsity_of

    cells = [("dense", 0.0)]
    for name in names:
        if name not in RECIPES:
            raise FrontierError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
        rec = RECIPES[name]
        if rec.flavour not in (None, "any") and rec.flavour not in rotations:
            raise FrontierError(f"recipe {name} needs rotations of the {rec.flavour} flavour: --rotations "
                                f"{rec.flavour}=DIR (larosa calibrate --flavour {rec.flavour}); given: "
                                f"{', '.join(rotations) or 'none'}")
        if rec.flavour == "any" and not rotations:
            raise FrontierError(f"recipe {name} needs a calibration (--rotations FLAVOUR=DIR)")
        if name == "dense":
            continue
        for p in sparsities:
            try:
                eff = effective_sparsity_of(cfg, rec.config(p))
            except SparsityError as e:
                raise FrontierError(f"recipe {name} at p={p:g}: {e}") from None
            ms_per_token(speeds, rec.speed, eff)
            cells.append((name, p))
    return cells


def markdown(result: dict) -> str:
    m = result["meta"]
    sp = m["speeds"]
    head = (f"Perplexity: {m['windows']} windows × {m['seqlen']} tokens of {m['data']} (the same windows for every row; "
            f"device {m['env']['device']}, jax {m['env']['jax']}, {m['env']['date']}); layer error: the mean over layers "
            "of the per-layer teacher-forced error on the first window; realized: the effective sparsity calibrated "
            "thresholds gave on that window (Top-K keeps exactly its k; speeds are read at the nominal effective).")
    if m.get("merged"):
        head += " Rows joined from " + "; ".join(
            f"`{x['file']}` ({(x.get('env') or {}).get('device', '?')}, {(x.get('env') or {}).get('date', '?')})"
            for x in m["merged"]) + " (the same checkpoint and windows; dense from the first that has it)."
    if m.get("paired_from"):
        head += f" Speeds attached afterwards to the rows of `{m['paired_from']}` (larosa frontier --from)."
    if sp is None:
        lines = [f"# Quality against sparsity: {m['model']}", "", head + " No decode speeds (run without --speeds).", "",
                 "| recipe | p | effective | realized | ppl | Δ dense | layer error (mean) |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines = [f"# Speed–quality frontier: {m['model']}", "",
                 head + f" Decode speed: batch 1 at the {sp['shape']} shape on {sp['device']} ("
                 + "; ".join(f"`{s['file']}`, jax {s['jax']}, {s['date']}" for s in sp["sources"])
                 + f"), dense {sp['dense']:.3f} ms/token, interpolated in effective sparsity between benchmarked points. "
                 "Rows marked * borrow another decode's speed (no kernel of their own); **bold**: the Pareto set of the "
                 "others.", "",
                 "| recipe | p | effective | realized | ppl | Δ dense | ms/token | speed-up | layer error (mean) |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense = next((r["ppl"] for r in result["rows"] if r["recipe"] == "dense"), None)
    front = {(r["recipe"], r["sparsity"]) for r in pareto(result["rows"])}
    for r in sorted(result["rows"], key=lambda r: (r["recipe"] != "dense", r["recipe"], r["sparsity"])):
        name = r["recipe"] + ("*" if r.get("estimated") else "")
        if (r["recipe"], r["sparsity"]) in front:
            name = f"**{name}**"
        le = r.get("layer_error_mean")
        delta = "" if dense is None else f"{r['ppl'] - dense:+.3f}"
        speed = "" if sp is None else f"{r['ms_per_token']:.3f} | {r['speedup']:.3f}x | "
        real = "" if r.get("realized") is None else f"{r['realized']:.3f}"
        lines.append(f"| {name} | {r['sparsity']:.2f} | {r['effective']:.3f} | {real} | {r['ppl']:.3f} | {delta} | {speed}"
                     f"{'' if le is None else f'{le:.4f}'} |")
    for ref, who in (("teal", "TEAL"), ("teal-alloc", "TEAL with its greedy allocation (`teal-alloc`)")):
        vs = versus(result["rows"], ref) if sp is not None else []
        if vs:
            lines += ["", f"Against {who} at equal speed-up ({ref}'s perplexity interpolated in speed-up at each row's; "
                      f"gap = ppl − {ref}'s, negative is better text):", "",
                      f"| recipe | speed-ups compared | rows below {ref} | worst gap | best gap |",
                      "| --- | --- | ---: | ---: | ---: |"]
            lines += [f"| {v['recipe']}{'*' if v['estimated'] else ''} | {v['from']:.2f}x–{v['to']:.2f}x | {v['below']} of "
                      f"{v['rows']} | {v['worst']:+.3f} | {v['best']:+.3f} |" for v in vs]
    lines += ["", "Recipes:", ""] + [f"- `{n}`: {RECIPES[n].about}" for n in dict.fromkeys(r["recipe"] for r in result["rows"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sp = result["meta"]["speeds"]
    dense = next((r for r in rows if r["recipe"] == "dense"), None)
    front = pareto(rows)
    panels = ((("speedup", "decode speed-up over dense", "ppl", "perplexity"), ("ms_per_token", "ms/token", "ppl", "perplexity"))
              if sp is not None else (("effective", "effective sparsity", "ppl", "perplexity"),
                                      ("effective", "effective sparsity", "layer_error_mean", "mean per-layer error")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (key, xlabel, ykey, ylabel) in zip(axes, panels):
        for name in dict.fromkeys(r["recipe"] for r in rows if r["recipe"] != "dense"):
            rs = sorted((r for r in rows if r["recipe"] == name and r.get(ykey) is not None), key=lambda r: r[key])
            est = RECIPES[name].estimated and sp is not None
            ax.plot([r[key] for r in rs], [r[ykey] for r in rs], "o--" if est else "o-", ms=4,
                    label=name + (" (speed estimated)" if est else ""))
        if front:
            ax.scatter([r[key] for r in front], [r["ppl"] for r in front], s=110, facecolors="none", edgecolors="k",
                       label="Pareto set", zorder=5)
        if dense is not None and ykey == "ppl":
            ax.scatter([dense[key]], [dense["ppl"]], marker="*", s=120, c="k", label="dense", zorder=6)
        if ykey == "ppl":
            ax.set_yscale("log")  # perplexity grows steeply at high sparsity; log keeps the low end readable
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if sp is not None:
        axes[1].invert_xaxis()
    axes[0].legend(fontsize=7)
    where = "no decode speeds" if sp is None else f"speed at {sp['shape']} on {sp['device']}"
    fig.suptitle(f"{result['meta']['model']}: ppl on {result['meta']['data']}; {where}", fontsize=9)
    fig.tight_layout()
    with outputs.staged_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run(model, stats: dict, windows: np.ndarray, cells: list[tuple[str, float]], speeds: dict | None, *, out, meta: dict,
        settings: dict, batch_size: int = 1, resume: bool = False, overwrite: bool = False, layer_errors: bool = True,
        progress: bool = True, mesh=None, alloc_windows: np.ndarray | None = None) -> dict:
    """Perplexity (and the per-layer teacher-forced error on the first window) of every (recipe, p) cell,
    written after each row. ``stats``: CalibrationStats by flavour; ``speeds``: :func:`load_speeds`, or None
    for the quality half alone; ``alloc_windows``: held-out calibration windows for the recipes that allocate."""
    from tqdm.auto import tqdm

    from . import layer_error
    from .allocation import GreedyPath, allocate, greedy_path
    from .evaluate import check_results, environment, resume_rows
    from .perplexity import window_nll
    from .sparse_model import realized_sparsity, sparsify
    from .sparsity import SparsityError

    files = check_results(out, overwrite=overwrite, resume=resume)
    settings = {**settings, "seqlen": int(windows.shape[1]), "windows": int(len(windows)),
                "speeds": None if speeds is None else [s["file"] for s in speeds["sources"]],
                "shape": None if speeds is None else speeds["shape"]}
    rows = resume_rows(files[0], settings) if resume and files[0].exists() else []
    saved = json.loads(files[0].read_text())["meta"].get("greedy_paths", {}) if rows else {}
    try:  # one greedy path serves every p of a recipe: a resumed run's, where it reaches
        paths = {n: GreedyPath.from_dict(d, model.config) for n, d in saved.items()}
    except (SparsityError, TypeError, ValueError) as e:
        raise FrontierError(f"{files[0]}: meta.greedy_paths: {e}") from None
    done = {(r["recipe"], r["sparsity"]) for r in rows}
    tokens = int(len(windows) * (windows.shape[1] - 1))
    result = {"meta": {**meta, "settings": settings, "env": environment(), "windows": len(windows),
                       "seqlen": int(windows.shape[1]), "tokens_scored": tokens, "speeds": speeds,
                       "greedy_paths": saved}, "rows": rows}
    bar = tqdm(cells, desc="frontier", unit="run", disable=not progress)
    with outputs.results_files(files, resume=resume) as targets:  # --overwrite: the old files stay until the end
        for name, p in bar:
            if (name, p) in done:
                continue
            bar.set_postfix_str(f"{name} p={p:g}")
            rec = RECIPES[name]
            st = None if rec.flavour is None else stats[rec.flavour] if rec.flavour != "any" else next(iter(stats.values()))
            sc = rec.config(p)
            if rec.allocate:
                if alloc_windows is None:
                    raise FrontierError(f"recipe {name} allocates: it needs held-out calibration windows (--alloc-data-file)")
                top = max(q for n, q in cells if n == name)
                if name not in paths or not paths[name].reaches(top):
                    paths[name] = greedy_path(model, st, sc, alloc_windows, top, progress=progress)
                    saved[name] = paths[name].to_dict()
                sc, _ = allocate(model, st, sc, alloc_windows, path=paths[name])
            m = sparsify(model, st, sc)
            nll = window_nll(m, windows, batch_size=batch_size, progress=progress, desc=name, mesh=mesh)
            ms = ms_per_token(speeds, rec.speed, m.effective_sparsity)
            le = layer_error.layer_errors(m, windows[:1]) if layer_errors else None
            real = realized_sparsity(m, windows[:1])
            rows.append({"label": name, "recipe": name, "sparsity": p, "effective": m.effective_sparsity,
                         "realized": None if real is None else real["effective"],
                         "ppl": float(np.exp(nll.sum() / tokens)), "ms_per_token": ms,
                         "speedup": None if ms is None else speeds["dense"] / ms,
                         "speed_from": rec.speed, "estimated": rec.estimated, "layers": sc.layers and [list(r) for r in sc.layers],
                         "layer_error_mean": None if le is None else float(le.mean()),
                         "layer_error": None if le is None else [round(float(v), 6) for v in le]})
            write(result, targets)
    return result
