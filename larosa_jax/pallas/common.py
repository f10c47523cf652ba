"""What every kernel module shares: interpret mode off a GPU, Triton compiler params, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


def acc_dtype(dtype):
    """Accumulation / reduction dtype: float32, or float64 for float64 models (exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_normalize(x: jax.Array, eps: float, gain: jax.Array | None = None) -> jax.Array:
    """HF's LlamaRMSNorm: normalise in float32, cast back, then multiply by the gain (if any)."""
    xf = x.astype(acc_dtype(x.dtype))
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if gain is None else gain * y


def gated(g: jax.Array, u: jax.Array) -> jax.Array:
    """The MLP's down input SiLU(g)·u, computed in float32 and cast back to g's dtype."""
    ct = acc_dtype(g.dtype)
    return (jax.nn.silu(g.astype(ct)) * u.astype(ct)).astype(g.dtype)


def interpret() -> bool:
    """Kernels run in Pallas interpret mode off a GPU (the tests on CPU)."""
    return jax.default_backend() != "gpu"


def triton_params(**kw):
    """``pltriton.CompilerParams`` (named ``TritonCompilerParams`` in older jax)."""
    from jax.experimental.pallas import triton as pltriton

    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(**kw)
