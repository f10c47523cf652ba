"""Perplexity over token windows: exp(mean NLL of every next-token prediction inside each window)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import parallel


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll, axis=1), jnp.all(jnp.isfinite(nll), axis=1)


def window_nll(model, windows: np.ndarray, *, batch_size: int = 1, progress: bool = False, desc: str = "ppl",
               mesh=None) -> np.ndarray:
    """Summed NLL per window ``[N]`` (float64), ``seqlen - 1`` predictions each. With a ``mesh``, each
    batch of windows is split over its ``data`` axis (weights replicated)."""
    from tqdm.auto import tqdm

    graphdef, state = nnx.split(model)
    state = parallel.replicate(state, mesh)
    windows = np.asarray(windows, np.int32)
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = windows[i : i + batch_size]
        nll, finite = _window_nll(graphdef, state, parallel.shard_batch(jnp.asarray(chunk), mesh))
        if not bool(np.all(finite)):
            raise FloatingPointError(f"non-finite loss in windows {i}..{i + len(chunk) - 1}")
        out.append(np.asarray(nll, np.float64))
    return np.concatenate(out)


def perplexity(model, windows: np.ndarray, *, batch_size: int = 1, progress: bool = False, mesh=None) -> float:
    nll = window_nll(model, windows, batch_size=batch_size, progress=progress, mesh=mesh)
    return float(np.exp(nll.sum() / (len(windows) * (windows.shape[1] - 1))))
