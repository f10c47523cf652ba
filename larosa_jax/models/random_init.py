"""Random-weight models built directly on the device, for benchmarks at real shapes.

The module is traced abstractly (``nnx.eval_shape``: no host arrays), then each parameter is drawn
on the device in its dtype by a small jit per distinct shape (one jit for all ~300 leaves took
131 s to compile on an H100; one per shape takes seconds).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .transformer import Transformer


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _leaf(key, shape, dtype, mean, std):
    return (jax.random.normal(key, shape, jnp.float32) * std + mean).astype(dtype)


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0, *, adapters: bool = False) -> Transformer:
    """A Transformer with random weights: kernels N(0, 1/D_in), norm gains 1 ± 0.05 (never constants:
    they hide wrong indexing), biases N(0, 0.02²), embeddings N(0, 1), adapters orthogonal."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0), adapters=adapters))
    graphdef, abs_state = nnx.split(abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abs_state)
    leaves = []
    for key, (path, leaf) in zip(jax.random.split(jax.random.key(seed), len(flat)), flat):
        name, shape, dt = jax.tree_util.keystr(path), tuple(leaf.shape), jnp.dtype(leaf.dtype)
        if "adapters" in name:
            x = jnp.linalg.qr(_leaf(key, shape, jnp.float32, 0.0, 1.0))[0].astype(dt)
        else:
            mean, std = (1.0, 0.05) if "scale" in name else (0.0, 0.02) if "bias" in name else \
                (0.0, 1.0) if "embedding" in name else (0.0, shape[-2] ** -0.5)  # kernels [D_in, D_out]
            x = _leaf(key, shape, dt, mean, std)
        leaves.append(x)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
