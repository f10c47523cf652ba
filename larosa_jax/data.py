"""Text sources and token windows for calibration and perplexity.

``wikitext2`` comes through ``datasets`` when the hub is reachable (rows joined with "\\n\\n", the
usual protocol); any local text file works offline. Calibration takes the train split (or a local
file: the raw *valid* split when offline), never test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Missing or too-short data, with the file and the token counts."""


def load_text(data: str = "wikitext2", data_file: str | Path | None = None, split: str = "train") -> tuple[str, str]:
    """(text, description of the source)."""
    if data_file is not None:
        p = Path(data_file)
        if not p.is_file():
            raise DataError(f"{p}: data file not found")
        try:
            return p.read_bytes().decode("utf-8"), str(p)
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "convert it to UTF-8") from None
    if data != "wikitext2":
        raise DataError(f"--data {data!r}: expected 'wikitext2' or --data-file PATH")
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as e:
        raise DataError(
            f"could not load WikiText-2 ({split}) through datasets ({type(e).__name__}); "
            "offline, pass --data-file with a local text file (e.g. wiki.valid.raw)"
        ) from None
    return "\n\n".join(rows), f"wikitext-2-raw-v1/{split} (datasets)"


def tokenize(tokenizer, text: str) -> np.ndarray:
    """The whole text as one id stream (BOS as the tokenizer adds it, once at the start)."""
    return np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int32)


def fingerprint(ids: np.ndarray) -> str:
    """Identity of a token stream (which text, tokenized by which tokenizer)."""
    return hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()[:16]


def window_spans(n_tokens: int, samples: int, seqlen: int, seed: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the windows :func:`calibration_windows` picks from ``n_tokens``."""
    order = np.random.default_rng(seed).permutation(n_tokens // seqlen)
    return [(int(i) * seqlen, (int(i) + 1) * seqlen) for i in order[:samples]]


def heldout_windows(ids: np.ndarray, samples: int, seqlen: int, seed: int, *, exclude: list[tuple[int, int]] = (),
                    source: str = "text") -> np.ndarray:
    """Like :func:`calibration_windows` but never touching a token range in ``exclude`` (the
    calibration windows): with the calibration's seqlen and seed, the same windows as ``skip``."""
    n_windows = len(ids) // seqlen
    order = np.random.default_rng(seed).permutation(n_windows)
    ex = sorted(exclude)
    starts = np.asarray([a for a, _ in ex], np.int64)
    ends = np.asarray([b for _, b in ex], np.int64)

    def free(i: int) -> bool:
        lo, hi = i * seqlen, (i + 1) * seqlen
        return not np.any((starts < hi) & (ends > lo))

    allowed = [int(i) for i in order if free(int(i))]
    if len(allowed) < samples:
        raise DataError(
            f"{source}: {len(ids)} tokens hold {n_windows} windows of {seqlen}, {len(allowed)} of them off the "
            f"calibration text; {samples} held-out windows needed: lower --samples or --seqlen, or give more text")
    chosen = allowed[:samples]
    return np.stack([ids[i * seqlen : (i + 1) * seqlen] for i in sorted(chosen)])


def calibration_windows(
    ids: np.ndarray, samples: int, seqlen: int, seed: int, *, skip: int = 0, source: str = "text"
) -> np.ndarray:
    """``samples`` distinct non-overlapping windows ``[samples, seqlen]`` chosen at random with ``seed``.

    ``skip`` passes over the first windows of the same random order: with the same seed,
    ``skip=samples`` gives held-out windows disjoint from the calibration ones (α search).
    """
    n_windows = len(ids) // seqlen
    if n_windows < samples + skip:
        raise DataError(
            f"{source}: {len(ids)} tokens available, {samples + skip} x {seqlen} = {(samples + skip) * seqlen} "
            f"needed; lower --samples or --seqlen, or give more text"
        )
    order = np.random.default_rng(seed).permutation(n_windows)
    chosen = np.sort(order[skip : skip + samples])
    return np.stack([ids[i * seqlen : (i + 1) * seqlen] for i in chosen])


def split_windows(ids: np.ndarray, seqlen: int, *, source: str = "text") -> np.ndarray:
    """All non-overlapping windows ``[n, seqlen]`` of the stream (the 'full' perplexity protocol)."""
    n = len(ids) // seqlen
    if n < 1:
        raise DataError(f"{source}: {len(ids)} tokens, shorter than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)
