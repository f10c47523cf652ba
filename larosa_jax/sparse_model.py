"""``sparsify(model, stats, SparseConfig)``: a model whose forward and generate apply the sparsity."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .calibration import CalibrationStats
from .fusion import fuse, weight_aware
from .models import Transformer
from .plan import DecodePlan
from .sparsity import (SITES, SparseConfig, Stat, TealProjection, effective_sparsity, effective_sparsity_of,
                       make_projection)


class SparseModel(nnx.Module):
    """A :class:`Transformer` plus the projection hook of a :class:`SparseConfig`.

    Same call convention as the dense model, so ``generate``, perplexity and the benchmarks take
    either. For ``larosa`` in ``fused`` mode ``base`` is the folded model (adapters, untied head).
    ``plan``: the kernels its decode uses (checked for the method; default :meth:`DecodePlan.default`).
    """

    def __init__(self, base: Transformer, sparse: SparseConfig, proj, plan: DecodePlan | None = None):
        self.base = base
        self.proj = proj
        kind = decode_kind(sparse, base.adapters is not None)
        self.plan = (DecodePlan.default(kind) if plan is None else plan).check(kind)
        # only the method, mode and α rule are static: other p or α values reuse the compiled model
        self.method, self.mode = sparse.method, sparse.mode
        self.alpha_rule = sparse.alpha if isinstance(sparse.alpha, str) else None
        self.select, self.weighted = sparse.select, sparse.weighted
        self.numbers = Stat(jnp.asarray([sparse.sparsity, *sparse.alphas(), effective_sparsity_of(base.config, sparse)]))

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def sparse(self) -> SparseConfig:
        p, a_rot, a_plain, _ = (float(v) for v in self.numbers[...])
        return SparseConfig(self.method, self.mode, p, self.alpha_rule or (a_rot, a_plain), self.select, self.weighted)

    @property
    def effective_sparsity(self) -> float:
        return float(self.numbers[3])

    def __call__(self, tokens, cache=None, *, start=None):
        if self.proj is None:
            return self.base(tokens, cache, start=start, plan=self.plan)
        return self.base(tokens, cache, start=start, proj=self.proj, plan=self.plan)


def decode_kind(sc: SparseConfig, adapters: bool = True) -> str:
    """What a decode of ``sc`` needs (``plan.KINDS``): no selection, Top-K or thresholds, and whether the
    model has La RoSA's adapters (the fused model of layerwise rotations does; one shared Q does not)."""
    if sc.method in ("dense", "cats") or sc.sparsity == 0:
        return "dense"
    threshold = sc.method == "teal" or sc.select == "threshold"
    if sc.method == "larosa" and sc.mode == "fused" and adapters:
        return "larosa-threshold" if threshold else "larosa"
    return "teal" if threshold else "topk"


def realized_sparsity(sparse: SparseModel, tokens) -> dict | None:
    """The sparsity calibrated thresholds (TEAL, La RoSA's rotated thresholds) give on ``tokens`` ``[B, T]``:
    ``{"effective": parameter-weighted, "sites": {site: dropped share over layers and tokens}}``. Thresholds
    aim at their calibration text's quantiles, so other text drifts from the nominal sparsity; Top-K keeps
    exactly k (None here)."""
    proj = getattr(sparse, "proj", None)
    if not isinstance(proj, TealProjection):
        return None
    def forward(m, t):
        m(t, None)  # only the sown shares are wanted, not the logits

    proj.observe = True
    try:
        _, sown = nnx.jit(nnx.capture(forward, nnx.Intermediate))(sparse, jnp.asarray(tokens, jnp.int32))
    finally:
        proj.observe = False
    sites = {s: float(np.mean(sown["proj"][f"dropped_{s}"].get_value())) for s in SITES}
    return {"effective": effective_sparsity(sparse.config, sites), "sites": sites}


def sparsify(model: Transformer, stats: CalibrationStats | None, sc: SparseConfig | str,
             plan: DecodePlan | None = None) -> SparseModel:
    """Apply ``sc`` (a SparseConfig, or the path of one saved as JSON, e.g. by ``larosa tune``) to a dense
    (or already fused) model. Checks that ``stats`` belong to ``model``; ``plan``: the decode's kernels
    (default: every kernel that serves the method on a GPU, none elsewhere)."""
    if not isinstance(sc, SparseConfig):
        sc = SparseConfig.load(sc)
    if isinstance(model, SparseModel):
        model = model.base
    fused_already = model.fused
    if stats is not None and not fused_already:
        stats.check_model(model)
    if sc.method == "larosa" and sc.mode == "fused" and not fused_already:
        if stats is None:
            raise ValueError("larosa fused mode needs rotations (larosa calibrate --flavour joint)")
        if stats.flavour == "faithful":
            warnings.warn("folding rotations of the 'faithful' flavour: fused mode rotates norm(h) without γ; "
                          "calibrate with --flavour joint (or fused) for rotations made for it", stacklevel=2)
        model = fuse(model, stats.rotations)
    elif fused_already and sc.method not in ("dense", "larosa") or (fused_already and sc.mode != "fused" and sc.method == "larosa"):
        raise ValueError(f"a fused model only runs method 'larosa' mode 'fused' (or 'dense'), not {sc.method}/{sc.mode}")
    if sc.weighted:
        model = weight_aware(model)
    return SparseModel(model, sc, make_projection(model.config, sc, stats), plan)


# ----------------------------------------------------------------------------- a fused checkpoint's own config
SPARSE_FORMAT = 1  # the layout of the ``sparse`` block ``larosa fuse --sparsity`` writes into a checkpoint's config


def record(model: Transformer, stats: CalibrationStats | None, sc: SparseConfig) -> dict:
    """The ``sparse`` block of a fused checkpoint's config: its SparseConfig and, for thresholds, the per-layer
    thresholds themselves (so the checkpoint decodes without its rotations file)."""
    block = {"format": SPARSE_FORMAT, "config": sc.to_dict()}
    proj = make_projection(model.config, sc, stats)
    if sc.select == "threshold" and proj is not None:
        th = proj.thresholds[...]
        block["thresholds"] = {s: [float(v) for v in th[i]] for i, s in enumerate(SITES)}
    return block


def read_record(block: dict, where: str) -> tuple[SparseConfig, dict | None]:
    """(SparseConfig, thresholds or None) of a checkpoint's ``sparse`` block; another format is an error with the
    command that re-fuses."""
    from .safetensors_io import CheckpointError

    redo = "re-fuse it with this version: larosa fuse --ckpt DENSE_CKPT --rotations DIR --sparsity P --out DIR"
    if not isinstance(block, dict) or block.get("format") != SPARSE_FORMAT:
        got = block.get("format") if isinstance(block, dict) else block
        raise CheckpointError(f"{where}: its sparse config is of format {got!r}, this larosa reads {SPARSE_FORMAT}; {redo}")
    try:
        sc = SparseConfig.from_dict(block.get("config"), where=f"{where} (larosa.sparse.config)")
    except ValueError as e:
        raise CheckpointError(f"{e}; {redo}") from None
    th = block.get("thresholds")
    if (sc.select == "threshold") != (th is not None):
        raise CheckpointError(f"{where}: a {sc.select} config {'without' if th is None else 'with'} thresholds; {redo}")
    if th is not None:
        n = None
        for s in SITES:
            if not isinstance(th.get(s), list) or (n is not None and len(th[s]) != n):
                raise CheckpointError(f"{where}: larosa.sparse.thresholds.{s} is not one number per layer; {redo}")
            n = len(th[s])
    return sc, th


def from_record(model: Transformer, block: dict, where: str, plan: DecodePlan | None = None) -> SparseModel:
    """The sparse model a fused checkpoint's ``sparse`` block describes."""
    sc, th = read_record(block, where)
    if th is None:
        return sparsify(model, None, sc, plan)
    if len(th["qkv"]) != model.config.num_layers:
        from .safetensors_io import CheckpointError

        raise CheckpointError(f"{where}: thresholds for {len(th['qkv'])} layers, the model has {model.config.num_layers}")
    return SparseModel(model, sc, TealProjection({s: np.asarray(th[s], np.float32) for s in SITES}), plan)


def load(path, dtype=None, mesh=None, plan: DecodePlan | None = None):
    """A checkpoint ready to decode: the sparse model when it records a sparse config (``larosa fuse
    --sparsity``), else the dense model (:func:`larosa_jax.checkpoint.load`)."""
    from .checkpoint import load as load_checkpoint, read_config

    block = read_config(path)[1].get("sparse")
    if block is not None:
        read_record(block, str(path))  # a stale record fails before the weights load
    model = load_checkpoint(path, dtype=dtype, mesh=mesh)
    return model if block is None else from_record(model, block, str(path), plan)
