"""Per-layer, per-site sparsity for the threshold selections: TEAL's block-wise greedy.

TEAL (Liu et al. 2024, §4.2) sparsifies each block on its own. Starting dense, every step raises the
sparsity of the one site whose step hurts the block's output least, each site's step sized so that the
block's effective (weight-read) sparsity rises by the same amount; the steps form a path, and a model at
sparsity p takes in every layer the row of its path nearest p. Here each block is fed the dense model's
input on held-out calibration text (teacher forcing, as :mod:`larosa_jax.layer_error`) and scored by
‖block(h) − dense(h)‖² over those tokens. The sites are the four this decode thresholds: q/k/v and gate/up
each share one input and one threshold in the fused kernels (TEAL's code thresholds q, k and v apart).
For La RoSA's fused model the path replaces the α split as well.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .sparsity import SITES, SparseConfig, SparsityError, TealProjection, effective_sparsity, site_params

STEP = 0.05  # a site's step is STEP·d²/(its weights), d the hidden size: TEAL's base step (0.025 for Llama-2-7B)


@dataclasses.dataclass(frozen=True)
class GreedyPath:
    """Per layer, the greedy's steps: ``sparsity[l]`` ``[steps + 1, site]`` (row 0 dense), ``effective[l]``
    ``[steps + 1]`` the block's effective sparsity and ``error[l]`` the block error of each row."""

    method: str
    sparsity: list[np.ndarray]
    effective: list[np.ndarray]
    error: list[np.ndarray]
    update: np.ndarray  # [L] ‖dense(h) − h‖² of each block: the scale of its errors

    def table(self, p: float) -> tuple[tuple[float, ...], ...]:
        """Every layer's row nearest effective sparsity ``p`` (TEAL's lookup); past a path's end, an error."""
        rows = []
        for l, eff in enumerate(self.effective):
            if p > eff[-1] + 1e-9:
                raise SparsityError(f"allocation: the greedy path reaches effective {eff[-1]:.3f} in layer {l}, "
                                    f"not p = {p:g}; run it to a higher --sparsity")
            rows.append(tuple(float(v) for v in self.sparsity[l][int(np.argmin(np.abs(eff - p)))]))
        return tuple(rows)

    def reaches(self, p: float) -> bool:
        """Whether every layer's path gets to effective sparsity ``p`` (so :meth:`table` can serve it)."""
        return all(eff[-1] >= p - 1e-9 for eff in self.effective)

    def to_dict(self) -> dict:
        """The path as each layer's choices (the site index of every step) and block errors (6 digits): its rows
        and effective sparsities follow from the model's step sizes (:meth:`from_dict`)."""
        return {"method": self.method, "step": STEP,
                "choices": ["".join(str(int(i)) for i in np.argmax(np.diff(s, axis=0), axis=1)) for s in self.sparsity],
                "error": [[float(f"{v:.6g}") for v in e] for e in self.error],
                "update": [float(f"{v:.6g}") for v in self.update]}

    @classmethod
    def from_dict(cls, d: dict, cfg) -> "GreedyPath":
        """The path :meth:`to_dict` wrote, its rows replayed step by step as the greedy made them (the same
        floats)."""
        choices = d.get("choices") if isinstance(d, dict) else None
        if (not isinstance(choices, list) or d.get("step") != STEP or d.get("method") not in ("teal", "larosa")
                or len(choices) != cfg.num_layers
                or any(not isinstance(c, str) or set(c) - set("0123") for c in choices)
                or [len(e) for e in d.get("error", [])] != [len(c) + 1 for c in choices]):
            raise SparsityError(f"a saved greedy path must hold its method (teal or larosa), step {STEP} and one choice "
                                f"string of site indices per layer ({cfg.num_layers}) with one more error each; "
                                f"got {str(d)[:120]}")
        steps = _site_steps(cfg)
        sparsity, effective = [], []
        for c in choices:
            row = np.zeros(len(SITES))
            rows, effs = [row], [0.0]
            for i in map(int, c):
                row = row.copy()
                row[i] += steps[i]
                rows.append(row)
                effs.append(effective_sparsity(cfg, dict(zip(SITES, row))))
            sparsity.append(np.array(rows))
            effective.append(np.array(effs))
        return cls(d["method"], sparsity, effective, [np.array(e, float) for e in d["error"]], np.array(d["update"], float))


def _site_steps(cfg) -> np.ndarray:
    w = site_params(cfg)
    return np.array([STEP * cfg.hidden_size ** 2 / w[s] for s in SITES])


@functools.partial(jax.jit, static_argnums=0)
def _dense_inputs(graphdef, state, tokens):
    """Each layer's dense input and output (teacher forcing), RoPE tables and slots of ``tokens``."""
    from .models.transformer import dense_projection, residual
    from .plan import DecodePlan

    base = nnx.merge(graphdef, state)
    cfg = base.config
    h, _, (rope, slots) = base.embed_and_context(tokens, None, None)
    ins, outs = [], []
    for layer, block in enumerate(base.layers):
        adapter = base.adapters[layer][...] if base.adapters is not None and layer < cfg.num_layers - 1 else None
        out, _ = block(h, layer, cfg, rope, None, slots, dense_projection, DecodePlan.reference(), adapter)
        ins.append(h)
        h = residual(out, base.dtype)
        outs.append(h)
    return jnp.stack(ins), jnp.stack(outs), rope, slots


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_error(graphdef, cfg, dtype, state, h, want, rope, slots, adapter, taus):
    """‖block(h) − want‖² with each site's entries at or below its threshold ``taus[site]`` dropped."""
    from .models.transformer import residual
    from .plan import DecodePlan

    block = nnx.merge(graphdef, state)
    proj = TealProjection({s: taus[i][None] for i, s in enumerate(SITES)})
    out, _ = block(h, 0, cfg, rope, None, slots, proj, DecodePlan.reference(), adapter)
    return jnp.sum(jnp.square(residual(out, dtype).astype(jnp.float32) - want.astype(jnp.float32)))


def greedy_path(model, stats, sc: SparseConfig, windows: np.ndarray, top: float, *, progress: bool = True) -> GreedyPath:
    """TEAL's greedy for each layer of ``sc``'s model (teal, or La RoSA fused with thresholds: the folded model,
    rotated thresholds) on ``windows`` (calibration text, never the test split), until each block's effective
    sparsity reaches ``top``."""
    from tqdm.auto import tqdm

    from .sparse_model import sparsify
    from .sparsity import site_thresholds

    if sc.method != "teal" and sc.select != "threshold":
        raise SparsityError(f"allocation needs thresholds (method teal, or larosa fused with select='threshold'), "
                            f"not {sc.method}/{sc.mode}/{sc.select}")
    if not 0.0 < top < 1.0:
        raise SparsityError(f"allocation at p={top:g}: must be in (0, 1)")
    base = sparsify(model, stats, dataclasses.replace(sc, layers=None)).base
    cfg, rotated = base.config, sc.method == "larosa"
    steps, w = _site_steps(cfg), site_params(cfg)
    ins, outs, rope, slots = _dense_inputs(*nnx.split(base), jnp.asarray(np.asarray(windows, np.int32)))
    graphdef, _ = nnx.split(base.layers[0])
    path = GreedyPath(sc.method, [], [], [], np.zeros(cfg.num_layers))
    for l in tqdm(range(cfg.num_layers), desc="allocation", unit="layer", disable=not progress):
        state = nnx.state(base.layers[l])
        adapter = base.adapters[l][...] if base.adapters is not None and l < cfg.num_layers - 1 else None
        kept = ins[l] if adapter is None else jnp.dot(ins[l].astype(jnp.float32), adapter.astype(jnp.float32))
        path.update[l] = float(jnp.sum(jnp.square(outs[l].astype(jnp.float32) - kept)))

        def error(row, l=l, state=state, adapter=adapter):
            th = site_thresholds(stats, row, rotated=rotated, weighted=sc.weighted)
            taus = jnp.asarray([th[s][l] for s in SITES], jnp.float32)
            return float(_block_error(graphdef, cfg, base.dtype, state, ins[l], outs[l], rope, slots, adapter, taus))

        row = np.zeros(len(SITES))
        rows, effs, errs = [row], [0.0], [0.0]
        while effs[-1] < top - 1e-9:
            cands = []
            for i in range(len(SITES)):
                if row[i] + steps[i] < 1.0:
                    cand = row.copy()
                    cand[i] += steps[i]
                    cands.append((error(cand), i, cand))
            if not cands:
                break
            err, _, row = min(cands, key=lambda c: (c[0], c[1]))
            rows.append(row)
            effs.append(effective_sparsity(cfg, dict(zip(SITES, row))))
            errs.append(err)
        path.sparsity.append(np.array(rows))
        path.effective.append(np.array(effs))
        path.error.append(np.array(errs))
    return path


def allocate(model, stats, sc: SparseConfig, windows: np.ndarray, *, path: GreedyPath | None = None,
             progress: bool = True) -> tuple[SparseConfig, dict]:
    """``sc`` with TEAL's greedy allocation at its sparsity (``path``: one made already, e.g. for several p),
    and a report: the per-layer rows and their block errors on ``windows`` (relative to the block's own update,
    as the layer error)."""
    if sc.sparsity == 0:
        raise SparsityError("allocation at p=0: nothing to allocate")
    if path is None:
        path = greedy_path(model, stats, sc, windows, sc.sparsity, progress=progress)
    elif path.method != sc.method:
        raise SparsityError(f"allocation: a greedy path of method {path.method}, not {sc.method}")
    table = path.table(sc.sparsity)
    picked = [float(path.error[l][int(np.argmin(np.abs(path.effective[l] - sc.sparsity)))]) for l in range(len(table))]
    report = {"layers": [list(r) for r in table], "block_error": [float(v) for v in np.sqrt(np.array(picked) / path.update)]}
    return dataclasses.replace(sc, layers=table), report
