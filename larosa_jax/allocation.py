"""Per-layer sparsity allocation for the threshold selections (TEAL's block-wise greedy idea).

A uniform p drops as much in a layer that barely notices as in one that does. For a config ``sc``
(teal, or La RoSA fused with thresholds) at sparsity p this finds one scale r_l per layer, mean 1 (so
the effective sparsity is unchanged), minimising the summed relative perturbation of the residual
stream Σ_l ‖sparse_l − dense_l‖² / ‖dense_l‖², each layer fed the dense model's input on held-out
calibration text (the teacher-forced sums of :mod:`larosa_jax.layer_error`). Teacher forcing makes the
cost separable: one pass per candidate scale measures every layer at once, and a small dynamic
programme over the layers then picks the exact optimum on the grid of scales (where greedy steps
would only approximate it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .sparsity import SparseConfig, SparsityError, site_sparsities

STEP = 0.05  # grid of scales: multiples of STEP in [LOW, HIGH]
LOW, HIGH = 0.5, 1.5


def scales_for(cfg, sc: SparseConfig) -> np.ndarray:
    """The candidate scales of ``sc``: multiples of STEP from LOW up to HIGH, or less where a site would drop
    95% of its entries."""
    top = max(site_sparsities(cfg, sc).values()) if sc.method == "larosa" else sc.sparsity
    hi = min(HIGH, 0.95 / top)
    units = np.arange(round(LOW / STEP), int(np.floor(hi / STEP + 1e-9)) + 1)
    if units.size == 0 or units[-1] * STEP < 1.0:
        raise SparsityError(f"allocation at p={sc.sparsity}: no room above the uniform sparsity (a site drops {top:.3g})")
    return units * STEP


def cost_table(model, stats, sc: SparseConfig, windows: np.ndarray, scales: np.ndarray, *, batch_size: int = 1,
               progress: bool = True) -> np.ndarray:
    """``[L, len(scales)]``: layer l's ‖sparse − dense‖² / ‖dense‖² with every layer at sparsity r·p."""
    from tqdm.auto import tqdm

    from .layer_error import layer_sums
    from .sparse_model import sparsify

    cols = []
    for r in tqdm(scales, desc="allocation", unit="scale", disable=not progress):
        m = sparsify(model, stats, dataclasses.replace(sc, sparsity=float(sc.sparsity * r), layers=None))
        num, _, out = layer_sums(m, windows, batch_size)
        cols.append(num / out)
    return np.stack(cols, axis=1)


def solve(cost: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The scale per layer minimising Σ_l cost[l, j_l] with mean scale exactly 1 (scales on the STEP grid)."""
    units = np.round(scales / STEP).astype(int)
    n_layers = cost.shape[0]
    target = n_layers * round(1.0 / STEP)
    inf = np.inf
    best = np.full(target + 1, inf)
    best[0] = 0.0
    choice = np.zeros((n_layers, target + 1), int)
    for layer in range(n_layers):
        nxt = np.full(target + 1, inf)
        for j, u in enumerate(units):
            if u > target:
                continue
            cand = np.full(target + 1, inf)
            cand[u:] = best[: target + 1 - u] + cost[layer, j]
            better = cand < nxt
            nxt[better], choice[layer, better] = cand[better], j
        best = nxt
    if not np.isfinite(best[target]):
        raise SparsityError("allocation: no choice of scales has mean 1 on this grid")
    picks, total = [], target
    for layer in range(n_layers - 1, -1, -1):
        j = choice[layer, total]
        picks.append(j)
        total -= units[j]
    return scales[np.array(picks[::-1])]


def allocate(model, stats, sc: SparseConfig, windows: np.ndarray, *, batch_size: int = 1,
             progress: bool = True) -> tuple[SparseConfig, dict]:
    """``sc`` with the allocation that minimises the stream perturbation on ``windows`` (calibration text,
    never the test split), and a report: the scales, the cost table and the uniform and allocated costs."""
    if sc.method != "teal" and sc.select != "threshold":
        raise SparsityError(f"allocation needs thresholds (method teal, or larosa fused with select='threshold'), "
                            f"not {sc.method}/{sc.mode}/{sc.select}")
    if sc.sparsity == 0:
        raise SparsityError("allocation at p=0: nothing to allocate")
    base = dataclasses.replace(sc, layers=None)
    scales = scales_for(model.config, base)
    cost = cost_table(model, stats, base, windows, scales, batch_size=batch_size, progress=progress)
    r = solve(cost, scales)
    one = int(np.argmin(np.abs(scales - 1.0)))
    picked = cost[np.arange(len(r)), np.searchsorted(scales, r - 1e-9)]
    report = {"scales": [float(v) for v in scales], "layers": [float(v) for v in r], "cost": cost.tolist(),
              "uniform_cost": float(cost[:, one].sum()), "allocated_cost": float(picked.sum())}
    return dataclasses.replace(sc, layers=tuple(float(v) for v in r)), report
