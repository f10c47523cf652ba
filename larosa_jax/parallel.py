"""Device meshes with axes ``data`` and ``model``, and data-parallel placement of batches.

JAX's own machinery: a :class:`jax.sharding.Mesh`, :class:`~jax.sharding.NamedSharding` of the
batch axis over ``data`` and replicated weights; ``jit`` partitions the computation and inserts the
collectives (the calibration covariance Σ XᵀX of a batch split over devices becomes per-device
partial sums plus an all-reduce). Several hosts: call ``jax.distributed.initialize()`` first, and
``jax.devices()`` then lists every host's devices.

Tensor parallelism over ``model`` (:class:`TensorParallel`): one ``shard_map`` around the model, q/k/v
and gate/up split by output columns, o and down by input rows with the partial outputs summed, the KV
cache split by KV head. Top-K keeps its one-device meaning (see :class:`RowParallel`), so tokens do
not change with the mesh. ``checkpoint.load(path, mesh=mesh)`` reads each device's block of every
weight straight from the memory-mapped file (:func:`place`).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")


class MeshError(ValueError):
    """A mesh that cannot be built here or does not fit the model."""


def parse_mesh(spec: str | None) -> dict[str, int] | None:
    """``"data=2,model=1"`` → ``{"data": 2, "model": 1}`` (missing axes are 1); None or "" → None."""
    if not spec:
        return None
    sizes = {a: 1 for a in AXES}
    for part in spec.split(","):
        name, eq, val = part.strip().partition("=")
        if name not in AXES or not eq or not val.isdigit() or int(val) < 1:
            raise MeshError(f"--mesh {spec!r}: expected axis=size pairs with axes {' and '.join(AXES)} and sizes >= 1, "
                            f"e.g. data=2,model=1 (bad part {part.strip()!r})")
        sizes[name] = int(val)
    return sizes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model_axis(cfg, size: int) -> None:
    """Tensor parallelism over ``size`` devices must divide every sharded dimension of the model."""
    if size == 1:
        return
    dims = {"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "intermediate_size": cfg.intermediate_size, "hidden_size": cfg.hidden_size}
    for name, n in dims.items():
        if n % size:
            ok = [d for d in _divisors(n) if all(v % d == 0 for v in dims.values())]
            raise MeshError(f"mesh model={size} does not divide {name}={n}; model sizes that divide every sharded "
                            f"dimension: {', '.join(map(str, ok))}")


def make_mesh(spec: str | dict[str, int] | None = None, *, cfg=None, devices=None) -> Mesh:
    """A ``(data, model)`` mesh. Default: every local device on ``data``."""
    devs = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec) if isinstance(spec, str) or spec is None else dict(spec)
    sizes = sizes or {"data": len(devs), "model": 1}
    n = sizes["data"] * sizes["model"]
    if n > len(devs):
        raise MeshError(f"mesh data={sizes['data']},model={sizes['model']} needs {n} devices; found {len(devs)} "
                        f"({devs[0].platform})")
    if cfg is not None:
        check_model_axis(cfg, sizes["model"])
    return Mesh(np.asarray(devs[:n], dtype=object).reshape(sizes["data"], sizes["model"]), AXES)


def data_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["data"]


def replicate(tree, mesh: Mesh | None):
    """Every leaf on every device of the mesh (weights, accumulators)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(x, mesh: Mesh | None):
    """Split the leading (batch) axis over ``data``; a batch the axis does not divide stays replicated."""
    if mesh is None:
        return x
    if x.shape[0] % data_size(mesh):
        return replicate(x, mesh)
    return jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))


# ----------------------------------------------------------------------------- tensor-parallel decode
# Input-major kernels [D_in, D_out]: q/k/v and gate/up are column-parallel (D_out split, heads and MLP
# columns contiguous per device), o and down row-parallel (D_in split; partial outputs summed). The d × d
# adapters are split by columns too, their outputs all-gathered: one small collective per layer buys 1/M
# of their bytes per token and of their memory (10.6 GB replicated at Llama-2-70B size). Norms,
# embedding and the lm_head are replicated; the KV cache is split by KV head.
_COLUMN = re.compile(r"(^|\.)((attn\.(q|k|v)|mlp\.(gate|up))\.(kernel|bias)|adapters\.\d+)$")
_ROW = re.compile(r"(^|\.)(attn\.o|mlp\.down)\.kernel$")
ROW_SITES = ("o", "down")


def param_spec(name: str, ndim: int) -> P:
    """How tensor parallelism splits the parameter with dotted name ``name`` (the checkpoint's names)."""
    if _COLUMN.search(name):
        return P(None, "model") if ndim == 2 else P("model")  # kernel, bias
    if _ROW.search(name):
        return P("model", None)
    return P()


def _dotted(path) -> str:
    """A pytree path of an NNX state as a dotted parameter name (``layers.0.attn.q.kernel``)."""
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    return ".".join(str(k) for k in keys if k != "value")


def place(name: str, arr, mesh: Mesh, dtype):
    """A device array of host array ``arr`` (e.g. memory-mapped) split over ``mesh`` as
    :func:`param_spec` says; each device reads only its own block of ``arr``."""
    sharding = NamedSharding(mesh, param_spec(name, arr.ndim))
    return jax.make_array_from_callback(tuple(arr.shape), sharding, lambda idx: np.asarray(arr[idx], dtype=dtype))


def _local_config(cfg, m: int):
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // m, num_kv_heads=cfg.num_kv_heads // m,
                               intermediate_size=cfg.intermediate_size // m)


class RowParallel(nnx.Module):
    """Wraps a projection hook (a module, whose calibrated state stays state, or ``dense_projection``)
    inside ``shard_map``. Column sites (q/k/v, gate/up) pass through: their input is replicated and
    each device computes its column block. At the row-parallel sites (o, down) each device holds a
    slice of the input: its prologue (SiLU·up) is elementwise and runs on the slice; Top-K must mean
    the same as on one device, so the threshold pair is found on the all-gathered row and its index
    cut shifted to this device's slice; partial outputs are summed over ``model``, and the fused
    model's adapter product (A split by columns) is all-gathered and added. Magnitude thresholds
    (TEAL, CATS) are elementwise and need no gather."""

    def __init__(self, inner, axis: str = "model"):
        self.inner, self.axis = inner, axis

    def __call__(self, site, layer, x, linears, plan, *, gain=None, prologue=None, residual=None, side=None, raw=False):
        if site not in ROW_SITES:
            return self.inner(site, layer, x, linears, plan, gain=gain, prologue=prologue, raw=raw)
        from . import pallas as ops
        from .models.transformer import site_row
        from .sparsity import SITES, gemv_options, kept_projection, select_options

        row, _ = site_row(x, None, prologue)
        part_raw = raw or residual is not None  # the adapter product is added onto the float32 sum
        ks = getattr(self.inner, "ks", None)
        if ks is None:  # dense, TEAL, CATS: each device decides on its own entries
            outs, keep = self.inner(site, layer, row, linears, plan, raw=part_raw)
        else:
            full = jax.lax.all_gather(row, self.axis, axis=row.ndim - 1, tiled=True)
            opts = select_options(plan, site)
            thr = ops.topk_threshold(full, ks[SITES.index(site)], kernel=opts["kernel"], window=opts["window"])
            off = jax.lax.axis_index(self.axis) * row.shape[-1]
            keep = ops.KeepSet(jnp.stack([thr[..., 0], jnp.clip(thr[..., 1] - off, 0, row.shape[-1])], axis=-1))
            outs = kept_projection(row, keep, linears, None, part_raw, **dict(gemv_options(plan, site), gemv="masked"))
        outs = tuple(jax.lax.psum(o.astype(jnp.float32), self.axis).astype(o.dtype) for o in outs)
        if residual is not None:  # this device's column block of r·A: gather the rest
            ra = ops.residual_product(*residual)
            y = outs[0] + jax.lax.all_gather(ra, self.axis, axis=ra.ndim - 1, tiled=True)
            outs = (y,) if raw else (y.astype(linears[0].kernel.dtype),)
        return outs, keep


class TensorParallel(nnx.Module):
    """A model (dense :class:`~larosa_jax.models.Transformer` or
    :class:`~larosa_jax.sparse_model.SparseModel`) run tensor-parallel over ``mesh``'s ``model``
    axis, with the batch over ``data``, in one ``shard_map``: the same layer function as on one
    device, with the model's decode plan minus the adapter tiles (:meth:`DecodePlan.for_tensor_parallel`).
    Same call convention as the model, so :func:`larosa_jax.generate.generate` takes it. The Pallas
    kernels run inside on each device's shards."""

    def __init__(self, model, mesh: Mesh):
        base = getattr(model, "base", model)
        cfg = base.config
        check_model_axis(cfg, mesh.shape["model"])
        if cfg.o_bias or cfg.mlp_bias:
            raise MeshError("tensor parallelism does not support o_proj/down_proj biases (attention_bias or "
                            "mlp_bias in config.json)")
        self.inner, self.mesh = model, mesh

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    def _local_split(self):
        """(graphdef, state) of the model with the per-device config (head counts and MLP width divided
        by M), the tensor-parallel plan and its projection hook wrapped in :class:`RowParallel`; the
        state is the model's own."""
        base = getattr(self.inner, "base", self.inner)
        cfg, plan = base.config, self.inner.plan
        proj = getattr(self.inner, "proj", None)
        base.config = _local_config(cfg, self.mesh.shape["model"])
        self.inner.plan = plan.for_tensor_parallel()
        if proj is not None:
            self.inner.proj = RowParallel(proj)
        try:
            return nnx.split(self.inner)
        finally:
            base.config, self.inner.plan = cfg, plan
            if proj is not None:
                self.inner.proj = proj

    def __call__(self, tokens, cache=None, *, start=None):
        if tokens.shape[0] % self.mesh.shape["data"]:
            raise MeshError(f"a batch of {tokens.shape[0]} rows does not split over data={self.mesh.shape['data']}")
        graphdef, state = self._local_split()
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        specs = jax.tree_util.tree_unflatten(treedef, [param_spec(_dotted(p), l.ndim) for p, l in flat])
        batch = P("data")

        def body(state, tokens, cache, start):
            from .models import dense_projection

            model = nnx.merge(graphdef, state)
            if getattr(model, "proj", None) is not None:  # a sparse hook, already row-parallel
                return model(tokens, cache, start=start)
            base = getattr(model, "base", model)  # dense: row-parallel sums around the dense hook
            return base(tokens, cache, start=start, proj=RowParallel(dense_projection), plan=model.plan)

        cache_spec = None
        if cache is not None:
            kv = P("data", None, "model", None)
            cache_spec = type(cache)(k=[kv] * len(cache.k), v=[kv] * len(cache.v), pos=P(), start=batch)
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=(specs, batch, cache_spec, None if start is None else batch),
                           out_specs=(batch, cache_spec), check_vma=False)
        return fn(state, tokens, cache, start)


def shard_params(model, mesh: Mesh):
    """Move every array of ``model`` (already on a device) onto ``mesh`` as :func:`param_spec` splits it."""
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [jax.device_put(l, NamedSharding(mesh, param_spec(_dotted(p), l.ndim))) for p, l in flat]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
