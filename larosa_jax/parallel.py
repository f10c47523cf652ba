"""Device meshes with axes ``data`` and ``model``, and data-parallel placement of batches.

JAX's own machinery: a :class:`jax.sharding.Mesh`, :class:`~jax.sharding.NamedSharding` of the
batch axis over ``data`` and replicated weights; ``jit`` partitions the computation and inserts the
collectives (the calibration covariance Σ XᵀX of a batch split over devices becomes per-device
partial sums plus an all-reduce). Several hosts: call ``jax.distributed.initialize()`` first, and
``jax.devices()`` then lists every host's devices. Tensor-parallel decode over ``model`` is not
built yet; a mesh with ``model > 1`` is checked against the model's head counts and widths.
"""

from __future__ import annotations

import jax
import numpy as np
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
