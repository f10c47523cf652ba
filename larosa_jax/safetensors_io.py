"""Minimal safetensors reading (memory-mapped, bf16 included) and streaming writing.

The ``safetensors`` package's numpy backend cannot hand out bfloat16, and its writer needs every
tensor in memory at once; conversion of a 7B model on a 24 GiB machine needs neither.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or disagrees with its config."""


class SafeTensorsFile:
    """Lazy reader: ``f.keys()``, ``f.shape(name)``, ``f[name]`` (a memory-mapped numpy array)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated (only {size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated (header says {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: not a safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must map names to strings")
        self.header = header
        self._base = 8 + n
        for name, info in header.items():
            try:
                a, b = (int(x) for x in info["data_offsets"])
                shape = [int(x) for x in info["shape"]]
                code = info["dtype"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}") from None
            if code in DTYPES and b - a != int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ({code} {tuple(shape)}) needs "
                    f"{int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize} bytes, its data_offsets span {b - a}"
                )
            if not 0 <= a <= b:
                raise CheckpointError(f"{self.path}: tensor {name!r} has invalid data_offsets [{a}, {b}]")
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self._base + end > size:
            raise CheckpointError(
                f"{self.path}: truncated ({size} bytes on disk, the header needs {self._base + end})"
            )
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        return self._mm[self._base + a : self._base + b].view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
    progress=None,
) -> None:
    """Stream tensors into one file: the header is written from ``specs`` first, then each tensor
    as it arrives, so peak memory is one tensor. ``tensors`` must follow ``specs`` in order."""
    header: dict = {"__metadata__": dict(metadata or {})}
    off = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    it: Iterator = iter(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            got_name, arr = next(it)
            if got_name != name or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CheckpointError(f"internal: expected {name} {shape} {dtype}, got {got_name} {arr.shape} {arr.dtype}")
            f.write(np.ascontiguousarray(arr).tobytes())
            if progress is not None:
                progress.update(1)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of arrays atomically (temporary sibling, then rename: :mod:`larosa_jax.outputs`)."""
    from .outputs import staged_file

    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs = [(k, a.shape, a.dtype) for k, a in arrays.items()]
    with staged_file(path) as tmp:
        write_safetensors(tmp, specs, arrays.items(), metadata)
