"""Pallas (Triton) GPU kernels, each behind one dispatch function with a plain-jnp twin.

The dispatch uses the kernel on GPU where the shapes and dtype fit, the twin everywhere else;
tests run the kernels on CPU in Pallas interpret mode (``LAROSA_PALLAS_INTERPRET=1``).
"""

from .common import MASK_VALUE, acc_dtype, enabled
from .attention import decode_attention, decode_attention_reference
from .gemv import matvec, matvec_reference

__all__ = ["MASK_VALUE", "acc_dtype", "decode_attention", "decode_attention_reference", "enabled", "matvec",
           "matvec_reference"]
