"""larosa-jax: La RoSA (Layerwise Rotated Sparse Activation) for Llama and Qwen2 in JAX."""

__version__ = "0.1.0"

from .checkpoint import convert, load, load_tokenizer  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .generate import generate  # noqa: E402

__all__ = ["ModelConfig", "convert", "generate", "load", "load_tokenizer", "__version__"]
