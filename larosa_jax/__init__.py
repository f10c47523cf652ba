"""larosa-jax: La RoSA (Layerwise Rotated Sparse Activation) for Llama and Qwen2 in JAX."""

__version__ = "0.1.0"

from .calibration import CalibrationStats  # noqa: E402
from .checkpoint import convert, load_tokenizer, save  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .generate import generate  # noqa: E402
from .sparse_model import load, sparsify  # noqa: E402  (load: the sparse model a fused checkpoint records)
from .sparsity import SparseConfig  # noqa: E402

__all__ = ["CalibrationStats", "ModelConfig", "SparseConfig", "convert", "generate", "load", "load_tokenizer", "save",
           "sparsify", "__version__"]
