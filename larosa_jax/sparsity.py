"""Activation sparsity: Top-K, α → k, effective sparsity, and the sparse projections of every method.

Per token vector a of width D keep the k entries of largest |a|. Activation types: ``rot`` (q/k/v
input and gate/up input; rotated by La RoSA) and ``plain`` (o_proj and down_proj inputs). With the
official α (the paper's public code) a site of type t keeps k = int((1 − s_t)·D), s_rot = 0.8p and
s_plain = 1.2p, computed as that code computes it; with explicit α, k = round(α_t·(1 − p)·D).
Effective sparsity is the parameter-weighted fraction of weight rows a decode step skips.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import pallas as ops
from .config import ModelConfig
from .models.transformer import _List, Linear, project, site_row, threshold_projection
from .plan import DecodePlan

Array = jax.Array
METHODS = ("dense", "topk", "teal", "cats", "larosa")
SELECTS = ("topk", "threshold")
MODES = ("faithful", "fused")
SITES = ("qkv", "o", "gate_up", "down")
SITE_TYPE = {"qkv": "rot", "gate_up": "rot", "o": "plain", "down": "plain"}


class SparsityError(ValueError):
    """Invalid sparsity settings, with the allowed range."""


# ----------------------------------------------------------------------------- config and k
@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """What to sparsify and how much.

    ``alpha``: ``(α_rot, α_plain)``, or ``"official"`` — the paper's public code, sparsity 0.8p on
    rotated and 1.2p on plain inputs (k = int((1 − s)·D), as it computes it; α_rot = (1 − 0.8p)/(1 − p)
    and α_plain = (1 − 1.2p)/(1 − p) up to that rounding) — or ``"uniform"`` (α = 1 everywhere). Used
    by ``larosa`` and ``topk``; ``teal``/``cats`` apply p uniformly through calibrated thresholds.

    ``select``: how La RoSA's fused model keeps entries — ``topk`` (exactly k per token) or ``threshold``
    (calibrated per layer and site like TEAL's, on the rotated rows at q/k/v and gate/up, at the sites'
    sparsities as α gives them: no search at decode, and each token keeps what it needs).

    ``weighted``: Top-K ranks entry i by |a_i|·s_i, s_i the norm of the weight row it multiplies
    (:func:`larosa_jax.fusion.weight_aware`, folded into the weights: the decode is unchanged); with
    ``select='threshold'`` the thresholds are calibrated on |a_i|·s_i instead (q/k/v, gate/up, down).

    ``layers``: an allocation, one row per layer of the fraction each site drops (``SITES`` order), in place
    of p's uniform split (:func:`larosa_jax.allocation.allocate`: TEAL's block-wise greedy); the effective
    sparsity is the table's. Threshold selections only (teal; larosa fused with select='threshold'): their
    thresholds are per layer and site already, so the decode is unchanged.
    """

    method: str = "larosa"
    mode: str = "faithful"
    sparsity: float = 0.0
    alpha: tuple[float, float] | str = "official"
    select: str = "topk"
    weighted: bool = False
    layers: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise SparsityError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise SparsityError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise SparsityError(f"sparsity={self.sparsity}: must be in [0, 1)")
        if isinstance(self.alpha, str) and self.alpha not in ("official", "uniform"):
            raise SparsityError(f"alpha={self.alpha!r}: expected (α_rot, α_plain), 'official' or 'uniform'")
        if self.select not in SELECTS:
            raise SparsityError(f"unknown select {self.select!r}; valid: {', '.join(SELECTS)}")
        if self.weighted and (self.method not in ("topk", "larosa") or (self.method, self.mode) == ("larosa", "faithful")):
            raise SparsityError("weighted=True is weight-aware selection of methods topk and larosa (mode fused); "
                                f"TEAL, CATS and the simulations have no weighted form, not {self.method}/{self.mode}/"
                                f"{self.select}")
        if self.select == "threshold" and (self.method, self.mode) != ("larosa", "fused"):
            raise SparsityError(f"select='threshold' is La RoSA's fused model (method larosa, mode fused), not "
                                f"{self.method}/{self.mode}; TEAL is method teal")
        if self.layers is not None:
            if self.method != "teal" and self.select != "threshold":
                raise SparsityError(f"layers (a per-layer allocation) needs thresholds: method teal, or larosa fused "
                                    f"with select='threshold', not {self.method}/{self.mode}/{self.select}")
            try:
                rows = tuple(tuple(float(v) for v in row) for row in self.layers)
            except (TypeError, ValueError):
                rows = ()
            bad = [i for i, row in enumerate(rows) if len(row) != len(SITES) or not all(0.0 <= v < 1.0 for v in row)]
            if not rows or bad:
                where = f" (layer {bad[0]}: {list(self.layers)[bad[0]]!r})" if bad else ""
                raise SparsityError(f"layers: one row per layer of {len(SITES)} site sparsities in [0, 1) "
                                    f"({', '.join(SITES)}){where}")
            object.__setattr__(self, "layers", rows)

    def to_dict(self) -> dict:
        d = {"method": self.method, "mode": self.mode, "sparsity": self.sparsity,
             "alpha": self.alpha if isinstance(self.alpha, str) else list(self.alpha), "select": self.select,
             "weighted": self.weighted}
        if self.layers is not None:
            d["layers"] = [list(row) for row in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "sparse config") -> "SparseConfig":
        """The config ``to_dict`` wrote; unknown or missing keys are an error naming them."""
        if not isinstance(d, dict):
            raise SparsityError(f"{where}: expected an object with method, mode, sparsity, alpha, select")
        keys = {"method", "mode", "sparsity", "alpha", "select", "weighted", "layers"}
        if set(d) - keys or "method" not in d:
            raise SparsityError(f"{where}: keys {sorted(d)}; expected method (required), mode, sparsity, alpha, select, "
                                "weighted, layers")
        alpha = d.get("alpha", "official")
        if isinstance(alpha, list):
            if len(alpha) != 2 or not all(isinstance(a, (int, float)) for a in alpha):
                raise SparsityError(f"{where}: alpha={alpha!r}; expected [α_rot, α_plain], 'official' or 'uniform'")
            alpha = (float(alpha[0]), float(alpha[1]))
        sp = d.get("sparsity", 0.0)
        if not isinstance(sp, (int, float)):
            raise SparsityError(f"{where}: sparsity={sp!r}; expected a number in [0, 1)")
        layers = d.get("layers")
        if layers is not None and not (isinstance(layers, list) and all(
                isinstance(row, list) and all(isinstance(v, (int, float)) for v in row) for row in layers)):
            raise SparsityError(f"{where}: layers={str(layers)[:60]}; expected one list of {len(SITES)} site sparsities "
                                f"({', '.join(SITES)}) per layer (larosa allocate writes it)")
        return cls(d["method"], d.get("mode", "faithful"), float(sp), alpha, d.get("select", "topk"),
                   bool(d.get("weighted", False)), None if layers is None else tuple(layers))

    @classmethod
    def load(cls, path) -> "SparseConfig":
        """The config in a JSON file: ``larosa tune --out``'s (its ``sparse_config``) or a bare ``to_dict``."""
        from pathlib import Path

        from .config import ConfigError, read_json

        try:
            raw = read_json(Path(path), "sparse config")
        except ConfigError as e:
            raise SparsityError(str(e)) from None
        return cls.from_dict(raw.get("sparse_config", raw), where=str(path))

    def alphas(self) -> tuple[float, float]:
        p = self.sparsity
        if self.alpha == "official":
            return ((1 - 0.8 * p) / (1 - p), (1 - 1.2 * p) / (1 - p))
        if self.alpha == "uniform":
            return (1.0, 1.0)
        return tuple(float(a) for a in self.alpha)  # type: ignore[return-value]


def site_dims(cfg: ModelConfig) -> dict[str, int]:
    """Input width D of each site."""
    return {"qkv": cfg.hidden_size, "o": cfg.q_dim, "gate_up": cfg.hidden_size, "down": cfg.intermediate_size}


def site_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights read behind each site (per layer): the rows a sparse input lets us skip."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": d * (cfg.q_dim + 2 * cfg.kv_dim), "o": cfg.q_dim * d, "gate_up": 2 * d * f, "down": f * d}


OFFICIAL_SCALE = {"rot": 0.8, "plain": 1.2}  # the public code's per-type sparsity: config.sparse_level * 0.8 / 1.2


def official_k(p: float, dim: int, kind: str, *, what: str = "") -> int:
    """k of the public code: s = p * 0.8 (rot) or p * 1.2 (plain), k = int((1 - s) * D) (truncated),
    in its float arithmetic; a p that leaves no entry is an error naming the allowed range."""
    k = int((1 - p * OFFICIAL_SCALE[kind]) * dim)
    if k < 1:
        raise SparsityError(f"{what}the official α at p={p} keeps k={k} of D={dim} ({kind} sparsity "
                            f"{OFFICIAL_SCALE[kind]}p); p must be below {1 / OFFICIAL_SCALE[kind]:.4g}")
    return k


def k_for(alpha: float, p: float, dim: int, *, what: str = "") -> int:
    """k = round(α · (1 − p) · D) for explicit α (the searched α keep this rounding); an α that leaves k
    outside [1, D] is an error naming the allowed α range."""
    k = int(round(alpha * (1.0 - p) * dim))
    if k < 1 or k > dim:
        lo, hi = 1.0 / ((1 - p) * dim), 1.0 / (1 - p)
        raise SparsityError(
            f"{what}α={alpha:.4g} at p={p} gives k={k} of D={dim}; α must lie in [{lo:.4g}, {hi:.4g}]"
        )
    return k


def site_ks(cfg: ModelConfig, sc: SparseConfig) -> dict[str, int]:
    """k per site for the Top-K methods (larosa, topk)."""
    dims = site_dims(cfg)
    if sc.alpha == "official":
        return {s: official_k(sc.sparsity, dims[s], SITE_TYPE[s], what=f"{s}: ") for s in SITES}
    a_rot, a_plain = sc.alphas()
    return {s: k_for(a_rot if SITE_TYPE[s] == "rot" else a_plain, sc.sparsity, dims[s], what=f"{s}: ") for s in SITES}


def effective_sparsity(cfg: ModelConfig, site_sparsity: dict[str, float]) -> float:
    """Parameter-weighted sparsity Σ_W s_W·|W| / Σ_W |W| over the seven projections."""
    w = site_params(cfg)
    return sum(site_sparsity.get(s, 0.0) * w[s] for s in SITES) / sum(w.values())


def site_sparsities(cfg: ModelConfig, sc: SparseConfig) -> dict[str, float]:
    """The fraction of entries each site drops: 1 − k/D of the Top-K ks (what La RoSA's thresholds aim at too)."""
    dims, ks = site_dims(cfg), site_ks(cfg, sc)
    return {s: 1.0 - ks[s] / dims[s] for s in SITES}


def effective_sparsity_of(cfg: ModelConfig, sc: SparseConfig) -> float:
    """Effective sparsity a config asks for (thresholds aim at p on their sites: teal all, cats gate/up→down)."""
    p = sc.sparsity
    if sc.method == "dense" or p == 0:
        return 0.0
    if sc.layers is not None:
        return float(np.mean([effective_sparsity(cfg, dict(zip(SITES, row))) for row in sc.layers]))
    if sc.method == "teal":
        return effective_sparsity(cfg, {s: p for s in SITES})
    if sc.method == "cats":  # gate stays dense; up columns and down rows of masked entries are skipped
        f, d = cfg.intermediate_size, cfg.hidden_size
        w = site_params(cfg)
        return p * 2 * f * d / sum(w.values())
    return effective_sparsity(cfg, site_sparsities(cfg, sc))


# ----------------------------------------------------------------------------- Top-K
# Exact per-token Top-K (ties: lower index first) lives with its GPU kernel in pallas/select.py;
# k may be traced, so one compiled model serves every α and p (the α search and the grids).
topk = ops.topk


def threshold(x: Array, t: Array) -> Array:
    """TEAL/CATS magnitude threshold: zero entries with |x| <= t."""
    return ops.apply(x, ops.magnitude_threshold(x, t))


def width(linears: Sequence[Linear]) -> int:
    """Total output width of linears sharing one input: the selection kernel zero-fills the sparse
    GEMV's accumulator of that size on its spare programs (no separate fill per launch)."""
    return sum(lin.kernel.shape[1] for lin in linears)


def gemv_options(plan: DecodePlan, site: str) -> dict:
    """The sparse GEMV's choices at ``site`` under ``plan`` (``ops.sparse_matvec``'s keywords)."""
    sp = plan.site(site)
    return {"gemv": sp.gemv, "tail": plan.adapter in ("side", "tail"), "tile": sp.tile}


def kept_projection(x: Array, keep: ops.KeepSet, linears: Sequence[Linear], residual=None, raw: bool = False,
                    **gemv) -> tuple[Array, ...]:
    """Outputs of ``linears`` on x restricted to its keep set (plus ``r @ A`` for a ``residual``):
    at decode on GPU the sparse GEMV reads only the kept weight rows (``gemv``: :func:`gemv_options`).
    ``raw``: one float32 output, unrounded, for a selection prologue or ``ops.decode_step`` to read
    (``ops.sparse_matvec``)."""
    ws = tuple(lin.kernel[...] for lin in linears)
    bs = tuple(None if lin.bias is None else lin.bias[...] for lin in linears)
    return ops.sparse_matvec(x, keep, ws, bs, residual, raw, **gemv)


def select_options(plan: DecodePlan, site: str) -> dict:
    """The Top-K selection's choices at ``site`` under ``plan`` (``ops.select_topk``'s keywords)."""
    sp = plan.site(site)
    return {"kernel": sp.select, "compact": sp.gemv == "gather", "window": plan.window, "prologue_kernel": sp.prologue}


# ----------------------------------------------------------------------------- projections
# Each is a projection hook of the decoder (``models.transformer.Projection``):
# ``proj(site, layer, x, linears, plan, *, gain, prologue, residual, side, raw) -> (outputs, keep)``.
class Stat(nnx.Variable):
    """Calibrated, non-trainable state carried by a sparse projection (rotations, thresholds)."""


def _ks(ks: dict[str, int]) -> Stat:
    # state, not static: changing k must not recompile the model
    return Stat(jnp.asarray([ks[s] for s in SITES], jnp.int32))


class TopKProjection(nnx.Module):
    """Plain Top-K at every site (the ``topk`` baseline, and La RoSA's fused mode on folded weights).

    ``gains=False`` for a fused model, whose RMSNorm gains are folded into the weights (all ones):
    skipping the multiply by ones saves two small kernels per layer at decode.

    The selection sees the site's prologue, so on GPU its kernel computes the norm on the row it
    reads anyway, from the previous GEMV's float32 accumulator. At the fused model's down site the
    sparse GEMV adds the down output onto the residual adapter's r_mid·A in float32 (made beside the
    down selection with ``side``; see ``pallas/sparse_gemv.py`` for the alternatives).
    """

    def __init__(self, ks: dict[str, int], gains: bool = True):
        self.ks = _ks(ks)
        self.gains = gains

    def __call__(self, site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        gain = gain if self.gains else None
        if prologue is None:
            x = x if gain is None else gain * x
        elif gain is not None:
            prologue = dataclasses.replace(prologue, gain=gain)
        n = 0 if side is not None and residual is not None else width(linears)  # the side sum starts the GEMV
        keep = ops.select_topk(x, self.ks[SITES.index(site)], n, side=side, prologue=prologue, **select_options(plan, site))
        row = x if keep.x is None else keep.x
        return kept_projection(row, keep, linears, residual, raw, **gemv_options(plan, site)), keep


class RotatedTopKProjection(nnx.Module):
    """La RoSA faithful mode (simulation): x̂ = TopK(x·Q_l)·Q_lᵀ at qkv/gate_up, plain Top-K at o/down.

    With ``gamma_free`` (rotations of the fused flavour) the rotation acts on norm(h) and γ is applied
    after, x̂ = (TopK(norm(h)·Q_l)·Q_lᵀ)·γ — the same function as the fused, folded model.
    """

    def __init__(self, ks: dict[str, int], rotations: Array, gamma_free: bool):
        self.ks = _ks(ks)
        self.rotations = Stat(jnp.asarray(rotations))  # [L, d, d]
        self.gamma_free = gamma_free

    def __call__(self, site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        k = self.ks[SITES.index(site)]
        if SITE_TYPE[site] == "plain":
            row, h = site_row(x, None, prologue)
            keep = ops.select_topk(row, k, width(linears), **select_options(plan, site))
            return kept_projection(row, keep, linears, residual, raw, **gemv_options(plan, site)), keep
        row, h = site_row(x, None if self.gamma_free else gain, prologue)
        ct = jnp.promote_types(row.dtype, jnp.float32)  # select in >= fp32: near-ties must not flip
        q = self.rotations[layer].astype(ct)
        a = jnp.dot(row.astype(ct), q)
        a = ops.apply(a, ops.select_topk(a, k).thr)
        xh = jnp.dot(a, q.T).astype(row.dtype)
        if self.gamma_free and gain is not None:
            xh = gain * xh
        outs = project(xh, linears, kernel=plan.gemv)
        return ops.combine_outputs(outs, residual, raw), ops.KeepSet(None, x=row, h=h)


class TealProjection(nnx.Module):
    """TEAL: per-layer, per-site magnitude thresholds (calibration quantiles at p).

    At batch-1 decode on GPU no selection searches: the sparse GEMV compares each entry with the
    threshold as it reads the row, and the norms happen in a search-free launch of the selection
    kernel."""

    def __init__(self, thresholds: dict[str, Array]):
        self.thresholds = Stat(jnp.stack([jnp.asarray(thresholds[s], jnp.float32) for s in SITES]))  # [site, L]
        # each threshold's pair for bf16 rows, one array per (layer, site): made per site at decode, or
        # sliced from one stacked array, each pair would cost its own small XLA launch per step
        bf16_row = jnp.zeros((1, 1), jnp.bfloat16)
        self.pairs = _List([Stat(ops.magnitude_threshold(bf16_row, t)) for t in self.thresholds[...].T.reshape(-1)])
        self.observe = False  # static: sow each site's dropped share (sparse_model.realized_sparsity), never at decode

    def __call__(self, site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        i = SITES.index(site)
        bf16 = (x.dtype if prologue is None else prologue.dtype) == jnp.bfloat16
        outs, keep = threshold_projection(site, x, linears, plan, self.thresholds[i, layer], gain=gain,
                                          pairs=self.pairs[layer * len(SITES) + i][...] if bf16 else None,
                                          prologue=prologue, residual=residual, raw=raw)
        if self.observe:
            self.sow(nnx.Intermediate, f"dropped_{site}", jnp.mean((ops.apply(keep.x, keep.thr) == 0).astype(jnp.float32)))
        return outs, keep


class CatsProjection(nnx.Module):
    """CATS: zero MLP activations where |SiLU(gate)| is under the layer's threshold.

    The down input is SiLU(g)·u, so zeroing u where |SiLU(g)| is small zeroes exactly those
    entries (and is what lets a kernel skip the matching up columns and down rows).
    """

    def __init__(self, thresholds: Array):
        self.thresholds = Stat(jnp.asarray(thresholds, jnp.float32))  # [L]

    def __call__(self, site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        row, h = site_row(x, gain, prologue)
        outs = project(row, linears, kernel=plan.gemv)
        if site == "gate_up":
            g, u = outs
            keep = jnp.abs(jax.nn.silu(g.astype(jnp.float32))) > self.thresholds[layer]
            outs = (g, jnp.where(keep, u, jnp.zeros((), u.dtype)))
        return ops.combine_outputs(outs, residual, raw), ops.KeepSet(None, x=row, h=h)


def layer_table(cfg: ModelConfig, sc: SparseConfig) -> np.ndarray:
    """``[L, site]``: the fraction each layer's sites drop: ``sc.layers``, or the uniform split (p at every site
    for teal, the α split for La RoSA); a table of another layer count is an error naming both."""
    if sc.layers is None:
        sp = {s: sc.sparsity for s in SITES} if sc.method == "teal" else site_sparsities(cfg, sc)
        return np.tile([sp[s] for s in SITES], (cfg.num_layers, 1))
    if len(sc.layers) != cfg.num_layers:
        raise SparsityError(f"layers: a table of {len(sc.layers)} layers for a model of {cfg.num_layers} layers")
    return np.asarray(sc.layers, np.float64)


def site_thresholds(stats, table, *, rotated: bool, weighted: bool = False) -> dict[str, np.ndarray]:
    """Per site, the per-layer thresholds dropping ``table[:, site]`` of the calibration entries (``table``
    ``[L, site]``, or one row for every layer): TEAL's quantiles of the rows, or with ``rotated`` La RoSA's of the
    rotated rows at q/k/v and gate/up; ``weighted``: of the weight-aware model's inputs |a|·s (q/k/v, gate/up
    and down; o is not weighted)."""
    t = np.atleast_2d(np.asarray(table, np.float64))

    def one(i, s):
        if rotated and SITE_TYPE[s] == "rot":
            return stats.rotated_threshold(s, t[:, i], weighted=weighted)
        return stats.weighted_threshold(s, t[:, i]) if weighted and s == "down" else stats.teal_threshold(s, t[:, i])

    return {s: one(i, s) for i, s in enumerate(SITES)}


def make_projection(cfg: ModelConfig, sc: SparseConfig, stats=None):
    """The projection hook for ``sc`` (None for dense / p = 0)."""
    if sc.method == "dense" or sc.sparsity == 0.0:
        return None
    if sc.method == "topk":
        return TopKProjection(site_ks(cfg, sc))
    if sc.method == "larosa" and sc.mode == "fused" and sc.select == "topk":  # on the folded model: gains are ones
        return TopKProjection(site_ks(cfg, sc), gains=sc.weighted)  # (weight-aware: the scales s)
    if stats is None:
        raise SparsityError(f"method {sc.method!r}{' with thresholds' if sc.select == 'threshold' else ''} needs "
                            "calibration statistics (larosa calibrate)")
    if sc.method == "teal" or sc.select == "threshold":  # La RoSA's on the folded model's rows
        return TealProjection(site_thresholds(stats, layer_table(cfg, sc), rotated=sc.method == "larosa",
                                              weighted=sc.weighted))
    if sc.method == "larosa":
        return RotatedTopKProjection(site_ks(cfg, sc), stats.rotations, gamma_free=stats.flavour != "faithful")
    return CatsProjection(stats.cats_threshold(sc.sparsity))
