"""α search, the paper's Algorithm 1: grid over α_rot; α_plain keeps effective sparsity at p.

With k = α(1 − p)D the skipped fraction of a site is 1 − α(1 − p), so effective sparsity equals p
exactly when W_rot·α_rot + W_plain·α_plain = W (W_* = weights behind rotated / plain inputs), for
every p. Integer k moves the realised value by at most 1/D per site; it is reported beside p.
The objective is perplexity on held-out calibration windows, never on test data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .calibration import ALPHA_FILE, rotations_dir, rotations_fingerprint, rotations_path
from .config import ModelConfig
from .perplexity import perplexity
from .sparse_model import sparsify
from .sparsity import SITE_TYPE, SITES, SparseConfig, SparsityError, effective_sparsity_of, site_ks, site_params


def alpha_plain_for(cfg: ModelConfig, alpha_rot: float) -> float:
    w = site_params(cfg)
    w_rot = sum(w[s] for s in SITES if SITE_TYPE[s] == "rot")
    w_plain = sum(w[s] for s in SITES if SITE_TYPE[s] == "plain")
    return (w_rot + w_plain - w_rot * alpha_rot) / w_plain


def alpha_grid(cfg: ModelConfig, p: float, points: int = 9, lo: float = 0.85, cap: float = 1.4) -> list[tuple[float, float]]:
    """Valid (α_rot, α_plain) pairs on an even grid of α_rot between ``lo`` and the largest α_rot
    that still leaves α_plain a k ≥ 1 and α_rot a k ≤ D."""
    SparseConfig("topk", "faithful", p)  # validates p before any arithmetic on it

    def valid(a: float) -> bool:
        try:
            site_ks(cfg, SparseConfig("topk", "faithful", p, (a, alpha_plain_for(cfg, a))))
            return True
        except SparsityError:
            return False

    scan = np.linspace(lo, 1.0 / (1.0 - p), 400)
    ok = [float(a) for a in scan if valid(float(a))]
    if not ok:
        raise SparsityError(f"no α_rot in [{lo}, {1.0 / (1.0 - p):.3g}] keeps every k in [1, D] at p={p}")
    lo, hi = ok[0], min(ok[-1], cap)  # both ends valid: α_plain may leave [1, D] at either end
    return [(float(a), alpha_plain_for(cfg, float(a))) for a in np.linspace(lo, max(hi, lo), points)]


@dataclasses.dataclass
class SearchResult:
    sparsity: float
    mode: str
    table: list[dict]  # one row per grid point
    best: tuple[float, float]

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "mode": self.mode, "best": list(self.best), "table": self.table}


def search_alpha(model, stats, p: float, windows: np.ndarray, *, mode: str = "faithful", points: int = 9,
                 batch_size: int = 1, progress: bool = True, mesh=None) -> SearchResult:
    from tqdm.auto import tqdm

    cfg = model.config
    rows = []
    for a_rot, a_plain in tqdm(alpha_grid(cfg, p, points), desc=f"α search p={p}", unit="α", disable=not progress):
        sc = SparseConfig("larosa", mode, p, (a_rot, a_plain))
        ppl = perplexity(sparsify(model, stats, sc), windows, batch_size=batch_size, mesh=mesh)
        rows.append({"alpha_rot": a_rot, "alpha_plain": a_plain, "effective": effective_sparsity_of(cfg, sc), "ppl": ppl})
    best = min(rows, key=lambda r: r["ppl"])
    return SearchResult(p, mode, rows, (best["alpha_rot"], best["alpha_plain"]))


def _alpha_data(path: Path) -> dict:
    from .config import ConfigError, read_json

    try:
        return read_json(path, "alpha.json from larosa search")
    except ConfigError as e:
        raise SparsityError(str(e)) from None


def check_alpha_file(rotations: str | Path) -> Path:
    """The alpha.json beside ``rotations`` must be readable before a search is spent on it."""
    from .outputs import sweep

    path = rotations_dir(rotations) / ALPHA_FILE
    sweep(path)  # temporaries of a search killed while writing it
    if path.exists():
        _alpha_data(path)
    return path


def store_alpha(rotations_dir_: str | Path, result: SearchResult) -> Path:
    """Record the winner in ``<rotations dir>/alpha.json`` under its sparsity and mode, tied to the
    rotations it was searched on (their :func:`rotations_fingerprint`); entries searched on other
    rotations are dropped. Written atomically."""
    from .outputs import note, write_file

    path = check_alpha_file(rotations_dir_)
    fp = rotations_fingerprint(rotations_dir_)
    data = _alpha_data(path) if path.exists() else {}
    if data and data.get("rotations_fingerprint") != fp:
        note(f"{path}: dropping α searched on other rotations (fingerprint {data.get('rotations_fingerprint')}, "
             f"these are {fp})")
        data = {}
    data["rotations_fingerprint"] = fp
    data.setdefault(f"{result.sparsity:g}", {})[result.mode] = result.to_dict()
    write_file(path, json.dumps(data, indent=2))
    return path


def stored_alpha(rotations: str | Path, p: float, mode: str, fingerprint: str | None = None) -> tuple[float, float]:
    """The searched (α_rot, α_plain) for ``p`` and ``mode``; refused unless alpha.json was searched on
    exactly these rotations (``fingerprint``: theirs, if already known)."""
    path = rotations_dir(rotations) / ALPHA_FILE
    rerun = f"run larosa search --sparsity {p:g} --mode {mode} --rotations {rotations_dir(rotations)}"
    if not path.exists():
        raise SparsityError(f"{path}: no searched α for sparsity {p:g} mode {mode}; {rerun}")
    data = _alpha_data(path)
    fp = fingerprint or rotations_fingerprint(rotations)
    have = data.get("rotations_fingerprint")
    if have is None:
        raise SparsityError(f"{path}: not tied to a rotations file (no rotations_fingerprint: copied in, or written "
                            f"by an older larosa), so it may be stale for these rotations ({fp}); {rerun}")
    if have != fp:
        raise SparsityError(f"{path}: stale α, searched on other rotations (fingerprint {have}; "
                            f"{rotations_path(rotations)} is {fp}); {rerun}")
    try:
        best = data[f"{p:g}"][mode]["best"]
    except (KeyError, TypeError):
        raise SparsityError(f"{path}: no searched α for sparsity {p:g} mode {mode}; {rerun}") from None
    ok = isinstance(best, list) and len(best) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and np.isfinite(a) and a > 0 for a in best)
    if not ok:
        raise SparsityError(f"{path}: entry {p:g}/{mode} has best={best!r}, expected two finite α > 0")
    return float(best[0]), float(best[1])
