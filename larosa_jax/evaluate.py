"""Perplexity grids: every method × sparsity × (mode, α) on one set of windows, saved as it goes.

Results: ``<out>.json`` (rows + run metadata), ``<out>.md`` (table) and ``<out>.png`` (perplexity
against effective sparsity, one line per method), rewritten atomically after every row, so an
interrupted run keeps what it measured (``--resume`` continues it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np

from . import __version__, data
from .perplexity import window_nll
from .sparse_model import sparsify
from .sparsity import METHODS, MODES, SparseConfig, SparsityError


class ResultsExist(FileExistsError):
    pass


@dataclasses.dataclass(frozen=True)
class Variant:
    """One grid cell: a method, and for larosa a mode and an α label."""

    method: str
    mode: str = "faithful"
    alpha: str = "official"  # official | uniform | searched

    @property
    def label(self) -> str:
        if self.method == "larosa":
            return f"larosa {self.mode} ({self.alpha} α)"
        if self.method == "topk":
            return f"topk ({self.alpha} α)"
        return self.method


def variants(methods: list[str], modes: list[str], alphas: list[str]) -> list[Variant]:
    out = []
    for m in methods:
        if m not in METHODS:
            raise SparsityError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
        if m == "larosa":
            for mode in modes:
                if mode not in MODES:
                    raise SparsityError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
                out += [Variant(m, mode, a) for a in alphas]
        elif m == "topk":
            out += [Variant(m, "faithful", a) for a in alphas if a != "searched"]
        elif m != "dense":
            out.append(Variant(m))
    return out


def eval_windows(ids: np.ndarray, protocol: str, seqlen: int, samples: int, seed: int, source: str) -> np.ndarray:
    """``full``: all non-overlapping windows (the official code); ``random``: ``samples`` random windows (the paper)."""
    if protocol == "full":
        return data.split_windows(ids, seqlen, source=source)
    if protocol != "random":
        raise ValueError(f"--protocol {protocol!r}: expected 'full' or 'random'")
    if len(ids) < seqlen + 1:
        raise data.DataError(f"{source}: {len(ids)} tokens, shorter than one window of {seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=samples)
    return np.stack([ids[s : s + seqlen] for s in starts])


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "jax": jax.__version__,
        "larosa_jax": __version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# Perplexity: {m['model']}",
        "",
        f"{m['protocol']} protocol, {m['windows']} windows × {m['seqlen']} tokens ({m['tokens_scored']} scored) "
        f"of {m['data']}; calibration: {m.get('calibration', '-')}. Device {m['env']['device']}, "
        f"jax {m['env']['jax']}, {m['env']['date']}.",
        "",
        "| method | nominal p | effective | α (rot, plain) | ppl | Δ dense |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    dense = next((r["ppl"] for r in result["rows"] if r["method"] == "dense"), None)
    for r in result["rows"]:
        a = "-" if r["alpha_values"] is None else f"{r['alpha_values'][0]:.3f}, {r['alpha_values'][1]:.3f}"
        delta = "-" if dense is None else f"{r['ppl'] - dense:+.3f}"
        lines.append(f"| {r['label']} | {r['sparsity']:.2f} | {r['effective']:.3f} | {a} | {r['ppl']:.3f} | {delta} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [r for r in result["rows"] if r["method"] == "dense"]
    labels = sorted({r["label"] for r in result["rows"] if r["method"] != "dense"})
    for lab in labels:
        rs = sorted((r for r in result["rows"] if r["label"] == lab), key=lambda r: r["effective"])
        pts = [(0.0, dense[0]["ppl"])] + [(r["effective"], r["ppl"]) for r in rs] if dense else [(r["effective"], r["ppl"]) for r in rs]
        ax.plot(*zip(*pts), marker="o", label=lab)
    if dense:
        ax.axhline(dense[0]["ppl"], color="gray", ls=":", lw=1, label="dense")
    ax.set_xlabel("effective (parameter-weighted) sparsity")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{result['meta']['model']}: {result['meta']['data']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run_grid(model, stats, windows: np.ndarray, grid: list[tuple[Variant, float]], *, out: str | Path,
             meta: dict, alpha_lookup=None, batch_size: int = 1, resume: bool = False, overwrite: bool = False,
             progress: bool = True, mesh=None) -> dict:
    """Evaluate dense plus every (variant, p) in ``grid``; write json/md/png after each row (each batch
    of windows split over ``mesh``'s data axis when given)."""
    from tqdm.auto import tqdm

    out = Path(out)
    files = [out.with_suffix(s) for s in (".json", ".md", ".png")]
    rows: list[dict] = []
    if files[0].exists():
        if resume:
            rows = json.loads(files[0].read_text())["rows"]
        elif not overwrite:
            raise ResultsExist(f"{files[0]}: results exist (pass --overwrite to replace, or --resume to continue)")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["label"], r["sparsity"]) for r in rows}
    todo = [(Variant("dense"), 0.0)] + list(grid)
    result = {"meta": {**meta, "env": environment(), "windows": len(windows), "seqlen": int(windows.shape[1]),
                       "tokens_scored": int(len(windows) * (windows.shape[1] - 1))}, "rows": rows}
    bar = tqdm(todo, desc="ppl grid", unit="run", disable=not progress)
    for var, p in bar:
        if (var.label, p) in done:
            continue
        bar.set_postfix_str(f"{var.label} p={p}")
        if var.method == "dense":
            alpha = None
            sc = SparseConfig("dense")
        else:
            alpha = alpha_lookup(p, var.mode) if var.alpha == "searched" else var.alpha
            sc = SparseConfig(var.method, var.mode, p, alpha)
        m = sparsify(model, stats, sc)
        nll = window_nll(m, windows, batch_size=batch_size, progress=progress, desc=var.label, mesh=mesh)
        ppl = float(np.exp(nll.sum() / result["meta"]["tokens_scored"]))
        rows.append({
            "label": var.label, "method": var.method, "mode": var.mode if var.method == "larosa" else None,
            "alpha": var.alpha if var.method in ("larosa", "topk") else None,
            "alpha_values": list(sc.alphas()) if var.method in ("larosa", "topk") else None,
            "sparsity": p, "effective": m.effective_sparsity, "ppl": ppl,
            "rotations_flavour": None if stats is None or var.method in ("dense", "topk") else stats.flavour,
        })
        _atomic_write(files[0], json.dumps(result, indent=2))
        _atomic_write(files[1], markdown(result))
        plot(result, files[2])
    return result
