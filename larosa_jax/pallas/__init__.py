"""Pallas (Triton) GPU kernels, each behind one dispatch function with a plain-jnp twin.

The dispatch uses the kernel on GPU where the shapes and dtype fit, the twin everywhere else;
tests run the kernels on CPU in Pallas interpret mode (``LAROSA_PALLAS_INTERPRET=1``).
"""

from .common import MASK_VALUE, acc_dtype, enabled, gated, rms_normalize
from .attention import (apply_rope, decode_attention, decode_attention_reference, decode_step, decode_step_reference,
                        split_qkv, write_cache)
from .gemv import matvec, matvec_reference
from .select import (Gated, KeepSet, Norm, Side, apply, keep_mask, magnitude_threshold, select_threshold, select_topk,
                     side_on, topk, topk_threshold, topk_threshold_reference, window_hits)
from .sparse_gemv import sparse_matvec, sparse_matvec_reference

__all__ = ["Gated", "KeepSet", "MASK_VALUE", "Norm", "Side", "acc_dtype", "apply", "decode_attention", "decode_attention_reference",
           "enabled", "gated", "rms_normalize",
           "keep_mask", "magnitude_threshold", "matvec", "matvec_reference", "select_threshold",
           "select_topk", "side_on", "sparse_matvec", "sparse_matvec_reference", "split_qkv", "topk", "topk_threshold",
           "topk_threshold_reference", "window_hits", "write_cache"]
