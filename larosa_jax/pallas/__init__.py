"""Pallas (Triton) GPU kernels, each behind one dispatch function with a plain-jnp twin.

The decode plan (``larosa_jax.plan``) says which kernels may run; each dispatch function runs its
kernel where the shapes and dtype fit and the twin everywhere else. Off a GPU the kernels run in
Pallas interpret mode (the tests).
"""

from .common import MASK_VALUE, acc_dtype, gated, rms_normalize
from .attention import (apply_rope, decode_attention, decode_attention_reference, decode_step, decode_step_reference,
                        split_qkv, write_cache)
from .gemv import matvec, matvec_reference
from .select import (Gated, KeepSet, Norm, Side, apply, keep_mask, magnitude_threshold, residual_product,
                     select_threshold, select_topk, side_fits, topk, topk_threshold, topk_threshold_reference, window_hits)
from .sparse_gemv import combine_outputs, sparse_matvec, sparse_matvec_reference

__all__ = ["Gated", "KeepSet", "MASK_VALUE", "Norm", "Side", "acc_dtype", "apply", "combine_outputs", "decode_attention", "decode_attention_reference",
           "gated", "rms_normalize",
           "keep_mask", "magnitude_threshold", "matvec", "matvec_reference", "residual_product", "select_threshold",
           "select_topk", "side_fits", "sparse_matvec", "sparse_matvec_reference", "split_qkv", "topk", "topk_threshold",
           "topk_threshold_reference", "window_hits", "write_cache"]
