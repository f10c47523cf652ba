"""Random-weight models built directly on the device, for benchmarks at real shapes.

The module is traced abstractly (``nnx.eval_shape``: no host arrays), then one jit draws every
parameter in its dtype, so a 7B bf16 model appears in seconds without a checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .transformer import Transformer


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0, *, adapters: bool = False) -> Transformer:
    """A Transformer with random weights: kernels N(0, 1/D_in), norm gains 1 ± 0.05 (never constants:
    they hide wrong indexing), biases N(0, 0.02²), embeddings N(0, 1), adapters random orthogonal."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0), adapters=adapters))
    graphdef, abs_state = nnx.split(abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abs_state)
    specs = tuple((jax.tree_util.keystr(p), tuple(leaf.shape), jnp.dtype(leaf.dtype)) for p, leaf in flat)

    @jax.jit
    def init(key):
        out = []
        for k, (name, shape, dt) in zip(jax.random.split(key, len(specs)), specs):
            if "scale" in name:
                x = 1.0 + 0.05 * jax.random.normal(k, shape, jnp.float32)
            elif "bias" in name:
                x = 0.02 * jax.random.normal(k, shape, jnp.float32)
            elif "embedding" in name:
                x = jax.random.normal(k, shape, jnp.float32)
            elif "adapters" in name:
                x = jnp.linalg.qr(jax.random.normal(k, shape, jnp.float32))[0]
            else:  # kernels [D_in, D_out]
                x = jax.random.normal(k, shape, jnp.float32) * (shape[-2] ** -0.5)
            out.append(x.astype(dt))
        return out

    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, init(jax.random.key(seed))))
