"""Perplexity grids: every method × sparsity × (mode, α) on one set of windows, saved as it goes.

Results: ``<out>.json`` (rows + run metadata), ``<out>.md`` (table) and ``<out>.png`` (perplexity
against effective sparsity, one line per method; ``<out>`` is the user's path as given, a ``.json``
ending dropped), rewritten atomically after every row, so an interrupted run keeps what it measured
(``--resume`` continues it, refusing a file written with other settings). ``--overwrite`` keeps the
old results until the new grid is complete (:mod:`larosa_jax.outputs`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path

import jax
import numpy as np

from . import __version__, data, outputs
from .config import ConfigError, read_json
from .perplexity import window_nll
from .sparse_model import sparsify
from .sparsity import METHODS, MODES, SparseConfig, SparsityError, effective_sparsity_of


class ResultsExist(FileExistsError):
    pass


class ResultsError(ValueError):
    """A results file that cannot be resumed or replaced, with the file and the reason."""


def _recognise_json(path: Path) -> bool:
    try:
        raw = read_json(path)
    except (ConfigError, OSError):
        return False
    return isinstance(raw.get("meta"), dict) and isinstance(raw.get("rows"), list)


def _recognise_md(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(64).startswith((b"# Perplexity: ", b"# Zero-shot accuracy: ", "# Speed–quality frontier: ".encode(),
                                          b"# Quality against sparsity: ", b"# Decode speed of "))
    except OSError:
        return False


def _recognise_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


RESULT_KINDS = {
    ".json": outputs.Kind("larosa results file (json)", False, _recognise_json),
    ".md": outputs.Kind("larosa results table (md)", False, _recognise_md),
    ".png": outputs.Kind("larosa results plot (png)", False, _recognise_png),
}


def results_files(out: str | Path, exts: tuple[str, ...] = (".json", ".md", ".png")) -> list[Path]:
    """``<out>.json`` etc., keeping the user's name exactly (``grid_p0.4`` → ``grid_p0.4.json``;
    an ``out`` ending in ``.json`` names the json itself)."""
    out = Path(out)
    if out.name.endswith(".json") and len(out.name) > 5:
        out = out.with_name(out.name[:-5])
    if not out.name or out.name in (".", ".."):
        raise ResultsError(f"--out {out}: expected a results path without extension, e.g. eval/results/NAME")
    return [out.with_name(out.name + e) for e in exts]


def check_results(out: str | Path, *, overwrite: bool, resume: bool,
                  exts: tuple[str, ...] = (".json", ".md", ".png")) -> list[Path]:
    """Before any work: the results files may be written (absent; or ours and ``--overwrite`` /
    ``--resume``; never a foreign file). Returns them, json first."""
    if overwrite and resume:
        raise ResultsError("--overwrite and --resume exclude each other (replace the results, or continue them)")
    files = results_files(out, exts)
    if resume and files[0].is_file():
        try:
            read_json(files[0], "larosa results file")
        except ConfigError as e:
            raise ResultsError(f"{e}; --resume cannot continue it") from None
    if files[0].is_file() and not (overwrite or resume):
        raise ResultsExist(f"{files[0]}: results exist (pass --overwrite to replace, or --resume to continue)")
    for f, ext in zip(files, exts):
        outputs.check_target(f, RESULT_KINDS[ext], overwrite=overwrite or resume)
    if resume and not files[0].exists() and any(f.exists() for f in files[1:]):
        raise ResultsError(f"{files[0]}: missing beside {', '.join(str(f) for f in files[1:] if f.exists())}; "
                           "nothing to resume (use --overwrite to start afresh)")
    return files


def resume_rows(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier run, if it was made with the same ``settings`` (else a one-line error)."""
    try:
        raw = read_json(path, "larosa results file")
    except ConfigError as e:
        raise ResultsError(str(e)) from None
    meta, rows = raw.get("meta"), raw.get("rows")
    if not isinstance(meta, dict) or not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("label"), str) and isinstance(r.get("sparsity"), (int, float))
            for r in rows):
        raise ResultsError(f"{path}: not a larosa results file (needs 'meta' and 'rows' with label and sparsity)")
    have = meta.get("settings")
    if not isinstance(have, dict):
        raise ResultsError(f"{path}: records no run settings (written by an older larosa), so --resume cannot check "
                           "that its rows match this run; use --overwrite or another --out")
    diff = [k for k in sorted(set(have) | set(settings)) if have.get(k) != settings.get(k)]
    if diff:
        what = "; ".join(f"{k} {have.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:3])
        raise ResultsError(f"{path}: written with other settings ({what}); --resume would mix their rows: "
                           "use the same settings, another --out, or --overwrite")
    return rows


def check_resumed_row(path: Path, row: dict, rotations: str | None, alphas) -> None:
    """A row the grid would skip must have been measured with the same rotations and α."""
    if row.get("rotations") != rotations:
        raise ResultsError(f"{path}: row {row['label']!r} p={row['sparsity']:g} was measured with rotations "
                           f"{row.get('rotations')}, this run uses {rotations}; use another --out or --overwrite")
    have = row.get("alpha_values")
    if (have is None) != (alphas is None) or alphas is not None and (
            not isinstance(have, list) or len(have) != 2 or any(abs(a - b) > 1e-12 for a, b in zip(have, alphas))):
        raise ResultsError(f"{path}: row {row['label']!r} p={row['sparsity']:g} was measured with α {have}, this run "
                           f"uses {None if alphas is None else list(alphas)}; use another --out or --overwrite")


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
    outputs.write_file(path, text)


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
    with outputs.staged_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def uses_rotations(method: str) -> bool:
    return method in ("larosa", "teal", "cats")


def run_grid(model, stats, windows: np.ndarray, grid: list[tuple[Variant, float]], *, out: str | Path,
             meta: dict, alpha_lookup=None, batch_size: int = 1, resume: bool = False, overwrite: bool = False,
             progress: bool = True, mesh=None, settings: dict | None = None, rotations_id: str | None = None) -> dict:
    """Evaluate dense plus every (variant, p) in ``grid``; write json/md/png after each row (each batch
    of windows split over ``mesh``'s data axis when given).

    Every cell's sparsity and α are checked before the first row. ``settings`` (model, data, protocol,
    seqlen, limit: what makes rows comparable) are stored in the json and must match for ``resume``;
    rows of methods with rotations record ``rotations_id``. With ``overwrite`` the old files stay until
    the new grid is complete."""
    from tqdm.auto import tqdm

    files = check_results(out, overwrite=overwrite, resume=resume)
    settings = {**(settings or {}), "seqlen": int(windows.shape[1]), "windows": int(len(windows))}
    todo = []
    for var, p in [(Variant("dense"), 0.0)] + list(grid):  # every cell checked before the first row
        if var.method == "dense":
            sc = SparseConfig("dense")
        else:
            alpha = alpha_lookup(p, var.mode) if var.alpha == "searched" else var.alpha
            sc = SparseConfig(var.method, var.mode, p, alpha)
            effective_sparsity_of(model.config, sc)  # k in [1, D] at every site
        if uses_rotations(var.method) and stats is None:
            raise SparsityError(f"method {var.method} needs rotations (larosa calibrate)")
        todo.append((var, p, sc))
    rows: list[dict] = resume_rows(files[0], settings) if resume and files[0].exists() else []
    done = {(r["label"], r["sparsity"]): r for r in rows}
    for var, p, sc in todo:
        if (var.label, p) in done:
            alphas = list(sc.alphas()) if var.method in ("larosa", "topk") else None
            check_resumed_row(files[0], done[(var.label, p)], rotations_id if uses_rotations(var.method) else None, alphas)
    result = {"meta": {**meta, "settings": settings, "env": environment(), "windows": len(windows),
                       "seqlen": int(windows.shape[1]), "tokens_scored": int(len(windows) * (windows.shape[1] - 1))},
              "rows": rows}
    bar = tqdm(todo, desc="ppl grid", unit="run", disable=not progress)
    with outputs.results_files(files, resume=resume) as targets:  # --overwrite: the old files stay until the end
        for var, p, sc in bar:
            if (var.label, p) in done:
                continue
            bar.set_postfix_str(f"{var.label} p={p}")
            m = sparsify(model, stats, sc)
            nll = window_nll(m, windows, batch_size=batch_size, progress=progress, desc=var.label, mesh=mesh)
            ppl = float(np.exp(nll.sum() / result["meta"]["tokens_scored"]))
            rows.append({
                "label": var.label, "method": var.method, "mode": var.mode if var.method == "larosa" else None,
                "alpha": var.alpha if var.method in ("larosa", "topk") else None,
                "alpha_values": list(sc.alphas()) if var.method in ("larosa", "topk") else None,
                "sparsity": p, "effective": m.effective_sparsity, "ppl": ppl,
                "rotations_flavour": None if stats is None or not uses_rotations(var.method) else stats.flavour,
                "rotations": rotations_id if uses_rotations(var.method) else None,
            })
            _atomic_write(targets[0], json.dumps(result, indent=2))
            _atomic_write(targets[1], markdown(result))
            plot(result, targets[2])
    return result
