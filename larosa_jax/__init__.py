"""larosa-jax: La RoSA (Layerwise Rotated Sparse Activation) for Llama and Qwen2 in JAX.

The API is imported on first use (PEP 562), so ``larosa --help`` and argument errors do not pay for jax.
"""

import sys
import types

__version__ = "0.1.0"

_API = {  # name → module that defines it
    "CalibrationStats": "calibration", "ModelConfig": "config", "SparseConfig": "sparsity", "convert": "checkpoint",
    "generate": "generate", "load": "sparse_model", "load_tokenizer": "checkpoint", "save": "checkpoint",
    "sparsify": "sparse_model",
}
__all__ = [*sorted(_API), "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'larosa_jax' has no attribute {name!r}")


def __dir__():
    return __all__


class _Package(types.ModuleType):
    """Keeps an API function when its submodule of the same name (``generate``) is first imported: the import
    system would bind the submodule over it."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
