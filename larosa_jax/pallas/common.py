"""What every kernel module shares: when the Pallas path is on, Triton compiler params, dtypes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


def acc_dtype(dtype):
    """Accumulation / reduction dtype: float32, or float64 for float64 models (exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)


DEFAULT_KERNELS = "gemv,attn,rope,select,sparse,tail,norm,window,gather,side"


def rms_normalize(x: jax.Array, eps: float, gain: jax.Array | None = None) -> jax.Array:
    """HF's LlamaRMSNorm: normalise in float32, cast back, then multiply by the gain (if any)."""
    xf = x.astype(acc_dtype(x.dtype))
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if gain is None else gain * y


def gated(g: jax.Array, u: jax.Array) -> jax.Array:
    """The MLP's down input SiLU(g)·u, computed in float32 and cast back to g's dtype."""
    ct = acc_dtype(g.dtype)
    return (jax.nn.silu(g.astype(ct)) * u.astype(ct)).astype(g.dtype)


def enabled(what: str) -> bool:
    """Whether kernel option ``what`` is on: "gemv", "attn", "select", "sparse" replace their jnp
    twins; "tail" puts the fused model's residual adapter r·A in the down site's sparse GEMV launch
    (extra dense tiles) instead of XLA's dot; "norm" runs the residual add and RMSNorm before q/k/v
    and gate/up inside their selection kernels instead of XLA's small fusions; "rope" (with "attn")
    does a decode token's RoPE and cache write in the attention kernel; "window" starts the Top-K
    search in a window guessed from the row's mean |x| (same result, fewer counting steps);
    "gather": a batch-1 Top-K selection also compacts the kept indices (split over programs) and the
    sparse GEMV reads dense tiles of kept rows instead of masked tiles (TEAL's given thresholds keep
    the masked tiles, which need no selection launch).

    "side": the fused model's adapter product r·A as tiles on the spare programs of the down selection
    launch, streaming while it searches its row (the gate/up selection zero-fills their sum), instead
    of as tiles of the down GEMV's launch ("tail", still used where "side" cannot be).

    On by default on GPU; ``LAROSA_PALLAS`` lists the enabled options (default all ten, or "0"
    for none). Opt-in: "gated", SiLU(gate)·up inside the down selection kernel (15.8 µs at D = 11008,
    against 7.7 µs + one 1.4 µs XLA fusion, measured slower in decode on an H200; eval/results/NOTES.md).
    ``LAROSA_PALLAS_INTERPRET=1`` turns them on elsewhere in Pallas interpret mode (tests).
    """
    flags = os.environ.get("LAROSA_PALLAS", DEFAULT_KERNELS)
    on = jax.default_backend() == "gpu" or os.environ.get("LAROSA_PALLAS_INTERPRET") == "1"
    return on and what in flags.split(",")


def interpret() -> bool:
    return jax.default_backend() != "gpu"


def triton_params(**kw):
    """``pltriton.CompilerParams`` (named ``TritonCompilerParams`` in older jax)."""
    from jax.experimental.pallas import triton as pltriton

    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(**kw)
