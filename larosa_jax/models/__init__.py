"""Flax NNX decoders: Llama (2, 3, 3.1) and Qwen2 share one implementation."""

from .transformer import KVCache, Linear, Transformer, dense_projection, init_cache, rms_norm

__all__ = ["KVCache", "Linear", "Transformer", "dense_projection", "init_cache", "rms_norm"]
