"""Calibration: per-layer covariance H_l = Σ XᵀX, damping, eigh → Q_l; thresholds for the baselines.

Windows stream through the dense model *layer by layer*: the residual
stream of all windows waits on the host between layers, and one jitted block step (compiled once,
shared by every layer) sees one window batch at a time, so the device never holds more than one
layer's activations for one batch. Each batch's XᵀX is made in float32 on the device and summed
across batches in float64 on the host; the damped H_l's float64 eigendecomposition runs on the host
(as the public code's does) in a worker thread, beside the next layer's device work.

Flavours (they give different Q): ``faithful`` H of X = norm(h)·γ_attn (the official code);
``fused`` H of X = norm(h) (γ-free, what the folded model rotates); ``joint`` the eigenvectors of
:func:`joint_metric` over both rotated sites (the attention and the MLP input), the Q the fused model
is measured best with; ``global`` one Q for every layer, the eigenvectors of the layers' joint
matrices summed (trace-normalised): the fused model then needs no adapters; ``identity`` Q = I for
every layer: La RoSA's γ-free selection and site split without a rotation (the other end of the
rotation lever; no adapters either). Every flavour also records the quantiles of the γ-free rotated
rows |norm(h)·Q_l| at both sites (from a sample of token rows), for La RoSA's calibrated thresholds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import re
import struct
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from . import __version__, outputs, parallel
from .config import ModelConfig
from .models.transformer import dense_projection, residual, rope_tables, site_row
from .plan import DecodePlan
from .safetensors_io import CheckpointError, SafeTensorsFile, write_safetensors

FLAVOURS = ("faithful", "fused", "joint", "global", "identity")
JOINT_EPS = 3.0  # joint flavour: weight of the γ-free covariances beside the γ-scaled ones (1-30 measured alike)
ROT_SITES = ("qkv", "gate_up")  # the rotated sites: their |norm(h)·Q| quantiles serve La RoSA's thresholds
ROT_SAMPLE_ROWS = 256  # token rows per site and window batch kept on the host for those quantiles
DAMP = 0.01  # H += 0.01 · mean(diag H) · I
QUANTILE_GRID = np.linspace(0.0, 1.0, 1001)
SAMPLES_PER_BATCH = 1 << 16  # |x| values per site and window batch used for the quantiles
STAT_SITES = ("qkv", "o", "gate_up", "down", "cats")  # "cats": |SiLU(gate)|
WEIGHTED_KEYS = ("qkv_rotw", "gate_up_rotw", "down_w")  # |row|·s, s the weight-row norms (fusion.weight_aware)
QUANTILE_KEYS = (*STAT_SITES, "qkv_rot", "gate_up_rot", *WEIGHTED_KEYS)


class CalibrationError(ValueError):
    """Calibration refused: bad flavour, non-finite activations, mismatched model."""


ROTATIONS_FILE = "rotations.safetensors"
ALPHA_FILE = "alpha.json"  # the α search's winners, tied to the rotations file (larosa_jax.search)
ROTATIONS = outputs.Kind("rotations directory", True, lambda p: (p / ROTATIONS_FILE).is_file(),
                         frozenset({ROTATIONS_FILE, ALPHA_FILE}))
ORTHO_TOL = 1e-3  # max |QᵀQv − v| / |v| over random v; float32 eigh gives ~1e-6
REQUIRED_METADATA = ("model_fingerprint", "flavour")


def rotations_path(path: str | Path) -> Path:
    """``DIR`` (from larosa calibrate) or the rotations file itself → the file."""
    p = Path(path)
    return p / ROTATIONS_FILE if p.is_dir() or not p.suffix else p


def rotations_dir(path: str | Path) -> Path:
    return rotations_path(path).parent


def rotations_fingerprint(path: str | Path) -> str:
    """Identity of a rotations file: its header (names, shapes, metadata of that calibration run),
    eigenvalues and quantiles in full, and the first and last 64 KiB of every Q (cheap for 70B)."""
    p = rotations_path(path)
    f = SafeTensorsFile(p)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        h.update(fh.read(n))
    for k in sorted(f.keys()):
        a = np.ascontiguousarray(f[k]).reshape(-1).view(np.uint8) if not k.endswith(".Q") else None
        if a is not None:
            h.update(a.tobytes())
        else:
            raw = f[k].reshape(-1).view(np.uint8)
            h.update(np.asarray(raw[: 1 << 16]).tobytes() + np.asarray(raw[-(1 << 16):]).tobytes())
    return h.hexdigest()[:16]


def fingerprint(model) -> str:
    """Identity of a model's weights (config + embedding statistics), independent of dtype."""
    cfg: ModelConfig = model.config
    emb = np.asarray(jnp.asarray(model.embed.embedding[...], jnp.float32))
    rows = emb[:: max(1, emb.shape[0] // 64)]
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(rows.astype(ml_dtypes.bfloat16).tobytes())  # bf16 bytes: fp32, fp64 and bf16 loads agree
    return h.hexdigest()[:16]


@dataclasses.dataclass
class CalibrationStats:
    """Everything ``sparsify`` needs: rotations Q_l and the baselines' activation quantiles."""

    rotations: np.ndarray  # [L, d, d] float32, columns = eigenvectors of H_l (damped)
    eigenvalues: np.ndarray  # [L, d]
    quantiles: dict[str, np.ndarray]  # site → [L, len(QUANTILE_GRID)] quantiles of |x| (cats: |SiLU(g)|;
    #                                   "qkv_rot", "gate_up_rot": of |norm(h)·Q_l|, the fused model's rows)
    metadata: dict[str, str]

    @property
    def flavour(self) -> str:
        return self.metadata["flavour"]

    def teal_threshold(self, site: str, p) -> np.ndarray:
        """Per-layer threshold zeroing a fraction p of the calibration activations at ``site`` (p: one for
        every layer, or one per layer)."""
        q = self.quantiles[site]
        ps = np.broadcast_to(np.asarray(p, np.float64), (len(q),))
        return np.array([np.interp(pl, QUANTILE_GRID, ql) for pl, ql in zip(ps, q)], np.float32)

    def cats_threshold(self, p: float) -> np.ndarray:
        return self.teal_threshold("cats", p)

    def rotated_threshold(self, site: str, p, weighted: bool = False) -> np.ndarray:
        """Per-layer threshold zeroing a fraction p of the rotated rows |norm(h)·Q_l| at q/k/v or gate/up
        (La RoSA's calibrated thresholds; γ-free rows, as the fused model selects on); ``weighted``: of
        |norm(h)·Q_l|·s, s the row norms of the folded weights the site reads (the weight-aware model)."""
        return self._stored(f"{site}_rot{'w' if weighted else ''}", p)

    def weighted_threshold(self, site: str, p) -> np.ndarray:
        """Per-layer threshold zeroing a fraction p of |x|·s at ``down`` (s its weight-row norms), where the
        weight-aware model's down input is x·s."""
        return self._stored(f"{site}_w", p)

    def _stored(self, key: str, p) -> np.ndarray:
        if key not in self.quantiles:
            raise CalibrationError(f"rotations from larosa {self.metadata.get('version', '?')} hold no quantiles "
                                   f"{key}; recalibrate (larosa calibrate) for these thresholds")
        return self.teal_threshold(key, p)

    def check_model(self, model, where: str = "rotations") -> None:
        fp = fingerprint(model)
        if self.metadata.get("model_fingerprint") != fp:
            raise CalibrationError(
                f"{where}: calibrated on model {self.metadata.get('model_fingerprint')} "
                f"({self.metadata.get('model_source', '?')}), but this model is {fp}; calibrate this model"
            )
        cfg: ModelConfig = model.config
        want = (cfg.num_layers, cfg.hidden_size, cfg.hidden_size)
        if tuple(self.rotations.shape) != want:
            raise CalibrationError(f"{where}: rotations of shape {tuple(self.rotations.shape)} (layers, d, d), "
                                   f"the model needs {want}")
        for site, q in self.quantiles.items():
            if q.shape[0] != cfg.num_layers:
                raise CalibrationError(f"{where}: quantiles.{site} has {q.shape[0]} layers, the model {cfg.num_layers}")

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``<out_dir>/rotations.safetensors`` as a new rotations directory (staged, then renamed:
        :mod:`larosa_jax.outputs`). An existing one is replaced only with ``overwrite``, its alpha.json
        going with it (those α were searched on the old rotations)."""
        out = outputs.check_target(out_dir, ROTATIONS, overwrite=overwrite)
        tensors = {f"layers.{l}.Q": np.asarray(self.rotations[l]) for l in range(len(self.rotations))}
        tensors["eigenvalues"] = np.asarray(self.eigenvalues)
        tensors.update({f"quantiles.{s}": np.asarray(q, np.float32) for s, q in self.quantiles.items()})
        specs = [(k, a.shape, a.dtype) for k, a in tensors.items()]
        with outputs.staged_dir(out) as tmp:
            write_safetensors(tmp / ROTATIONS_FILE, specs, tensors.items(), {k: str(v) for k, v in self.metadata.items()})
        return out / ROTATIONS_FILE

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        """Read and validate a rotations file: contiguous layers, shapes, finite values, orthogonal Q
        (within :data:`ORTHO_TOL`), quantiles of every site (non-negative, non-decreasing) and the
        metadata ``sparsify`` relies on. Anything else is a one-line :class:`CheckpointError`."""
        p = rotations_path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: no such file (expected the output of `larosa calibrate`)")
        f = SafeTensorsFile(p)
        layers, unknown = {}, []
        for k in f.keys():
            m = re.fullmatch(r"layers\.(\d+)\.Q", k)
            if m:
                layers[int(m.group(1))] = k
            elif k != "eigenvalues" and not (k.startswith("quantiles.") and k.split(".", 1)[1] in QUANTILE_KEYS):
                unknown.append(k)
        if not layers or "eigenvalues" not in f:
            raise CheckpointError(f"{p}: no layers.*.Q / eigenvalues tensors (not a rotations file from `larosa calibrate`)")
        if unknown:
            raise CheckpointError(f"{p}: unexpected tensor{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, sorted(unknown)[:3]))}")
        n = len(layers)
        gap = next((l for l in range(n) if l not in layers), None)
        if gap is not None:
            raise CheckpointError(f"{p}: tensor 'layers.{gap}.Q' is missing (found {n} layers up to {max(layers)})")
        missing_q = [s for s in STAT_SITES if f"quantiles.{s}" not in f]
        if missing_q:
            raise CheckpointError(f"{p}: tensor 'quantiles.{missing_q[0]}' is missing (every site needs its quantiles: "
                                  f"{', '.join(STAT_SITES)})")
        meta = dict(f.metadata)
        for key in REQUIRED_METADATA:
            if not meta.get(key):
                raise CheckpointError(f"{p}: metadata key {key!r} is missing")
        if meta["flavour"] not in FLAVOURS:
            raise CheckpointError(f"{p}: metadata flavour={meta['flavour']!r}, expected one of {', '.join(FLAVOURS)}")

        def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if f.shape(name) != shape:
                raise CheckpointError(f"{p}: tensor {name!r} has shape {f.shape(name)}, expected {shape}")
            a = np.asarray(f[name])
            if not np.issubdtype(a.dtype, np.floating) and a.dtype != np.dtype(ml_dtypes.bfloat16):
                raise CheckpointError(f"{p}: tensor {name!r} has dtype {a.dtype}, expected floating point")
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise CheckpointError(f"{p}: tensor {name!r} holds non-finite values (NaN or Inf)")
            return a

        shape0 = f.shape(layers[0])
        if len(shape0) != 2 or shape0[0] != shape0[1] or shape0[0] < 1:
            raise CheckpointError(f"{p}: tensor 'layers.0.Q' has shape {shape0}, expected a square matrix")
        d = shape0[0]
        rot = np.stack([tensor(f"layers.{l}.Q", (d, d)) for l in range(n)])
        probe = np.random.default_rng(0).standard_normal((d, 8)).astype(np.float32)
        for l in range(n):
            err = float(np.abs(rot[l].T @ (rot[l] @ probe) - probe).max() / np.abs(probe).max())
            if not err <= ORTHO_TOL:
                raise CheckpointError(f"{p}: tensor 'layers.{l}.Q' is not orthogonal (|QᵀQv − v| / |v| = {err:.3g}, "
                                      f"allowed {ORTHO_TOL:g})")
        eig = tensor("eigenvalues", (n, d))
        quant = {}
        for site in (*STAT_SITES, *(k for k in QUANTILE_KEYS[len(STAT_SITES):] if f"quantiles.{k}" in f)):
            q = tensor(f"quantiles.{site}", (n, len(QUANTILE_GRID)))
            if (q < 0).any() or (np.diff(q, axis=1) < 0).any():
                raise CheckpointError(f"{p}: tensor 'quantiles.{site}' is not a non-negative, non-decreasing quantile table")
            quant[site] = q
        return cls(rot, eig, quant, meta)


def damped(h: np.ndarray) -> np.ndarray:
    """H + DAMP·mean(diag H)·I in float64."""
    h = np.array(h, np.float64)
    h[np.diag_indices_from(h)] += DAMP * np.mean(np.diag(h))
    return h


def rotation_of(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, Q) of the damped covariance: a float64 eigendecomposition of the float64 H on the
    host, as the public code computes it (float32 ``eigh`` on a device moved single layers'
    sparsification errors by several %)."""
    return np.linalg.eigh(damped(h))


def joint_metric(h_attn: np.ndarray, h_mlp: np.ndarray, g_attn: np.ndarray, g_mlp: np.ndarray,
                 eps: float = JOINT_EPS) -> np.ndarray:
    """The joint flavour's matrix for one layer, whose eigenvectors are its Q: over the two rotated sites
    (attention input, MLP input; γ-free covariances H_s, RMSNorm gains γ_s), Σ_s Γ_s·H_s·Γ_s / tr + ε·H_s / tr
    (each H_s damped). One Q serves both sites in the fused model, so both inputs count: the γ-scaled
    covariance is what each site's weights see, the γ-free one what the selection sees."""
    m = 0.0
    for h, g in ((h_attn, g_attn), (h_mlp, g_mlp)):
        hd = damped(h)
        ghg = np.asarray(g, np.float64)[:, None] * hd * np.asarray(g, np.float64)[None, :]
        m = m + ghg / np.trace(ghg) + eps * hd / np.trace(hd)
    return m


@functools.partial(jax.jit, static_argnames=("graphdef", "flavour", "cfg"))
def _block_step(graphdef, state, h, rope, start, key, *, flavour: str, cfg: ModelConfig):
    """One decoder layer on one window batch: new h, this batch's XᵀX per covariance (float32; the MLP
    input's too for the joint flavour), |x| quantiles per site, and ``ROT_SAMPLE_ROWS`` random token rows
    of the γ-free rotated-site inputs."""
    block = nnx.merge(graphdef, state)
    grid = jnp.asarray(QUANTILE_GRID, jnp.float32)
    stats: dict[str, jax.Array] = {}
    covs: dict[str, jax.Array] = {}
    rows: dict[str, jax.Array] = {}
    keys = dict(zip((*STAT_SITES, "rows"), jax.random.split(key, len(STAT_SITES) + 1)))
    n_tok = h.shape[0] * h.shape[1]
    pick = jax.random.randint(keys["rows"], (min(ROT_SAMPLE_ROWS, n_tok),), 0, n_tok)

    def quantiles(site, v):
        flat = jnp.abs(v.astype(jnp.float32)).reshape(-1)
        idx = jax.random.randint(keys[site], (SAMPLES_PER_BATCH,), 0, flat.shape[0])
        stats[site] = jnp.quantile(flat[idx], grid)

    def capture(site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        row, _ = site_row(x, None, prologue)  # norm(h) at qkv / gate_up (γ-free), the plain input elsewhere
        xin = row if gain is None else gain * row
        quantiles(site, xin)
        if site in (*ROT_SITES, "down"):  # down: for its weighted quantiles
            free = row.astype(jnp.float32).reshape(-1, row.shape[-1])
            rows[site] = free[pick]
        if site in ROT_SITES:
            if site == "qkv" or flavour in ("joint", "global"):
                xc = xin.astype(jnp.float32).reshape(free.shape) if flavour == "faithful" else free
                covs[site] = jnp.dot(xc.T, xc, precision=jax.lax.Precision.HIGHEST)
        out, keep = dense_projection(site, layer, x, linears, plan, gain=gain, prologue=prologue, raw=raw)
        if site == "gate_up":
            quantiles("cats", jax.nn.silu(out[0][..., : linears[0].kernel.shape[1]].astype(jnp.float32)))
        return out, keep

    t = h.shape[1]
    slots = (jnp.zeros((), jnp.int32), jnp.arange(t, dtype=jnp.int32), start)
    h_out, _ = block(h, 0, cfg, rope, None, slots, capture, DecodePlan.reference())
    h_out = residual(h_out, h.dtype)
    finite = jnp.all(jnp.isfinite(h_out.astype(jnp.float32)), axis=(1, 2))  # per window
    return h_out, covs, stats, rows, finite


def calibrate(
    model,
    windows: np.ndarray,
    *,
    flavour: str = "fused",
    batch_size: int = 4,
    data_source: str = "",
    seed: int = 0,
    model_source: str = "",
    progress: bool = True,
    mesh=None,
) -> CalibrationStats:
    """Run ``windows`` ``[N, T]`` through the dense ``model`` and return rotations + quantiles.

    With a ``mesh`` each window batch is split over its ``data`` axis: every device runs its windows
    and the covariance Σ XᵀX is summed across devices by the partitioned jit (an all-reduce)."""
    from tqdm.auto import tqdm

    if flavour not in FLAVOURS:
        raise CalibrationError(f"unknown flavour {flavour!r}; valid: {', '.join(FLAVOURS)}")
    cfg: ModelConfig = model.config
    windows = np.asarray(windows, np.int32)
    n, t = windows.shape
    d, n_layers = cfg.hidden_size, cfg.num_layers
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    t0 = time.time()

    # residual stream of every window, kept on the host between layers
    embed = jax.jit(lambda e, ids: e[ids])
    h_host = [np.asarray(embed(model.embed.embedding[...], windows[b])) for b in batches]
    start = jnp.zeros((batches[0].stop - batches[0].start,), jnp.int32)
    rope = rope_tables(cfg, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (start.shape[0], t)))
    key = jax.random.key(seed)

    rotations = np.zeros((n_layers, d, d), np.float32)
    eigvals = np.zeros((n_layers, d), np.float32)
    quant = {s: np.zeros((n_layers, len(QUANTILE_GRID)), np.float64) for s in STAT_SITES}
    eighs = []
    grid = np.asarray(QUANTILE_GRID)

    def metric(layer, covs):
        blk = model.layers[layer]
        gains = [np.asarray(n.scale[...], np.float64) for n in (blk.attn_norm, blk.mlp_norm)]
        return joint_metric(covs["qkv"], covs["gate_up"], *gains)

    def rotated_quantiles(layer, q, rows):
        """|row·Q_l| at the rotated sites, and for the weight-aware model |row·Q_l|·s and |down row|·s (s: the
        row norms of the folded weights each site reads, as ``fusion.weight_aware`` computes them)."""
        from .fusion import norm_floor

        def norms(m):  # on the device in float32: Q_lᵀ·diag(γ)·W is d × d × n multiply-adds (7B: ~10¹² a layer)
            return norm_floor(np.asarray(jnp.linalg.norm(m, axis=1), np.float64))

        blk, out = model.layers[layer], {}
        for s, norm, lins in (("qkv", blk.attn_norm, (blk.attn.q, blk.attn.k, blk.attn.v)),
                              ("gate_up", blk.mlp_norm, (blk.mlp.gate, blk.mlp.up))):
            a = np.abs(np.concatenate(rows[s]) @ q)
            w = jnp.concatenate([x.kernel[...].astype(jnp.float32) for x in lins], axis=1)
            gw = norm.scale[...].astype(jnp.float32)[:, None] * w
            out[f"{s}_rot"] = np.quantile(a, grid)
            out[f"{s}_rotw"] = np.quantile(a * norms(jnp.dot(jnp.asarray(q.T, jnp.float32), gw,
                                                             precision=jax.lax.Precision.HIGHEST)), grid)
        down = blk.mlp.down.kernel[...].astype(jnp.float32)
        out["down_w"] = np.quantile(np.abs(np.concatenate(rows["down"])) * norms(down), grid)
        return out

    def layer_rotation(layer, covs, rows):
        """Q_l by the flavour (a float64 eigendecomposition), then the quantiles of |row·Q_l| at the rotated
        sites; for ``global`` the layer's normalised joint matrix (Q comes after the last layer)."""
        te = time.time()
        if flavour == "global":
            m = metric(layer, covs)
            return m / np.trace(m), None, None, time.time() - te
        if flavour == "identity":  # the variances stand for the eigenvalues
            q = np.eye(d)
            return np.diag(damped(covs["qkv"])), q, rotated_quantiles(layer, q, rows), time.time() - te
        w, q = np.linalg.eigh(metric(layer, covs)) if flavour == "joint" else rotation_of(covs["qkv"])
        return w, q, rotated_quantiles(layer, q, rows), time.time() - te

    bar = tqdm(range(n_layers), desc="calibrate", unit="layer", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # LAPACK releases the GIL
        for layer in bar:
            graphdef, state = nnx.split(model.layers[layer])
            state = parallel.replicate(state, mesh)
            covs, rows = {}, {s: [] for s in (*ROT_SITES, "down")}
            for bi, b in enumerate(batches):
                nb = b.stop - b.start
                r = rope if nb == start.shape[0] else tuple(x[:nb] for x in rope)
                key, sub = jax.random.split(key)
                h_new, cb, stats, rb, finite = _block_step(
                    graphdef, state, parallel.shard_batch(jnp.asarray(h_host[bi]), mesh), parallel.replicate(r, mesh),
                    parallel.replicate(start[:nb], mesh), parallel.replicate(sub, mesh), flavour=flavour, cfg=cfg
                )
                finite = np.asarray(finite)
                if not finite.all():
                    w = b.start + int(np.argmin(finite))
                    raise CalibrationError(f"non-finite activation (NaN or Inf) at layer {layer}, window {w}")
                for s, q in stats.items():
                    quant[s][layer] += np.asarray(q, np.float64) * nb / n
                for c, v in cb.items():
                    covs[c] = covs.get(c, 0.0) + np.asarray(v, np.float64)
                for s, v in rb.items():
                    rows[s].append(np.asarray(v, np.float32))
                h_host[bi] = np.asarray(h_new)
            eighs.append((pool.submit(layer_rotation, layer, covs, rows), rows))
        t_eigh = 0.0
        for s in QUANTILE_KEYS[len(STAT_SITES):]:
            quant[s] = np.zeros((n_layers, len(QUANTILE_GRID)), np.float64)
        if flavour == "global":  # one Q for every layer: the summed normalised joint matrices
            te = time.time()
            w, q = np.linalg.eigh(sum(fut.result()[0] for fut, _ in eighs))
            for layer, (_, rows) in enumerate(eighs):
                rotations[layer], eigvals[layer] = q, w
                for k, v in rotated_quantiles(layer, q, rows).items():
                    quant[k][layer] = v
            t_eigh += time.time() - te
        for layer, (fut, _) in enumerate(eighs):
            w, q, rq, te = fut.result()
            t_eigh += te
            if q is None:
                continue
            rotations[layer], eigvals[layer] = q, w
            for k, v in rq.items():
                quant[k][layer] = v
    meta = {
        "model_fingerprint": fingerprint(model), "model_source": model_source, "flavour": flavour,
        "data_source": data_source, "tokens": str(n * t), "samples": str(n), "seqlen": str(t), "seed": str(seed),
        "damp": str(DAMP), "version": __version__, "seconds": f"{time.time() - t0:.1f}", "eigh_seconds": f"{t_eigh:.1f}",
    }
    return CalibrationStats(rotations, eigvals, {s: q.astype(np.float32) for s, q in quant.items()}, meta)
