"""Where commands write: one rule for every output (checkpoint, rotations, α, results).

- An output is written to a temporary sibling (``.NAME.larosa-tmp-PID-XXXXXX``) and renamed into
  place once complete; a directory that it replaces is kept (renamed aside) until the new one is in
  place, a replaced file is swapped in one ``os.replace``. A reader never sees half an output and an
  interrupted run leaves the old one as it was.
- :func:`check_target` runs before any work: an existing output is replaced only with ``overwrite``
  and only if it is the kind of output the command writes (:class:`Kind`): never the current
  directory, one of its parents, the home or root directory, or a directory holding files of its own.
- Temporaries of a killed run (their process is gone) are removed by the next run aimed at the same
  output, with a note on stderr; those of a live process, or of older versions, are only reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

TMP, OLD = "larosa-tmp", "larosa-old"
_OURS = re.compile(r"\.(?P<name>.+)\.(?P<what>larosa-tmp|larosa-old)-(?P<pid>\d+)-\w+")


class OutputError(ValueError):
    """An output that may not be written or replaced, with the path and the reason."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of output: ``name`` for messages, whether it is a directory, the entries a directory of
    this kind may hold (``files``, None: any) and ``recognise(path)``: is an existing path one of these?"""

    name: str
    is_dir: bool
    recognise: Callable[[Path], bool]
    files: frozenset[str] | None = None


def note(msg: str) -> None:
    print(f"larosa: note: {msg}", file=sys.stderr)


def _size(p: Path) -> str:
    try:
        n = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    except OSError:
        return "?"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: in use by this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def sweep(path: str | Path) -> list[str]:
    """Find the temporaries an earlier run left beside ``path``: remove those of dead processes (an
    aside copy of a replaced output is put back if the output itself is missing), report the rest.
    Returns the notes (also printed on stderr)."""
    path = Path(path)
    parent = path.parent
    notes: list[str] = []
    if not parent.is_dir():
        return notes
    legacy = (re.compile(rf"\.{re.escape(path.name)}\.tmp-\w+"), re.compile(rf"{re.escape(path.name)}\.tmp(\.\w+)?"))
    for entry in sorted(parent.iterdir()):
        m = _OURS.fullmatch(entry.name)
        if m and m["name"] == path.name:
            pid = int(m["pid"])
            if _alive(pid):
                notes.append(f"{entry}: temporary of running process {pid} (another run writing {path}?); left alone")
            elif m["what"] == OLD and not path.exists() and not path.is_symlink():
                os.rename(entry, path)
                notes.append(f"{path}: restored from {entry.name}, set aside by an interrupted run (process {pid})")
            else:
                size = _size(entry)
                _remove(entry)
                notes.append(f"removed {entry} ({size}), left by an interrupted run (process {pid})")
        elif any(rx.fullmatch(entry.name) for rx in legacy):
            notes.append(f"{entry} ({_size(entry)}) looks like the temporary of an interrupted run of an older "
                         "larosa; remove it if no run is writing there")
    for n in notes:
        note(n)
    return notes


def _special(path: Path) -> str | None:
    """Why ``path`` may never be replaced, or None."""
    try:
        r, cwd = path.resolve(), Path.cwd().resolve()
    except OSError:
        return None
    if r == cwd:
        return "is the current directory"
    if r in cwd.parents:
        return "is a parent of the current directory"
    try:
        home = Path.home().resolve()
    except (OSError, RuntimeError):  # no home directory known
        home = None
    if home is not None and (r == home or r in home.parents):
        return "is the home directory or one of its parents"
    if r == Path(r.anchor):
        return "is the root directory"
    return None


def _entries(path: Path) -> list[str]:
    """A directory's entries, less our own temporaries."""
    return sorted(e.name for e in path.iterdir() if not _OURS.fullmatch(e.name))


def check_target(path: str | Path, kind: Kind, *, overwrite: bool, flag: str = "--out",
                 inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse (:class:`OutputError`, one line) an output that may not be written; call it before any
    work. An absent path or an empty directory may be written; an existing output of the same kind
    only with ``overwrite``. ``inputs``: paths the command reads, which the output must not replace.
    Also sweeps stale temporaries (:func:`sweep`)."""
    path = Path(path)
    why = _special(path)
    if why:
        raise OutputError(f"{flag} {path}: {why}; give a new path for the {kind.name}")
    for src in inputs:
        s, r = Path(src).resolve(), path.resolve()
        if s == r or r in s.parents:
            raise OutputError(f"{flag} {path}: holds the input {src}; write the {kind.name} somewhere else")
    sweep(path)
    if not path.exists():
        if path.is_symlink():
            raise OutputError(f"{flag} {path}: is a dangling symbolic link; remove it or give another path")
        return path
    if kind.is_dir:
        if not path.is_dir():
            raise OutputError(f"{flag} {path}: is a file, not a {kind.name}; refusing to replace it")
        entries = _entries(path)
        if not entries:
            return path
        if not overwrite:
            raise OutputError(f"{path}: already exists (pass --overwrite to replace it)")
        foreign = [e for e in entries if kind.files is not None and e not in kind.files]
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise OutputError(f"{flag} {path}: holds {shown}, which no {kind.name} holds; refusing to replace it "
                              "(give another path, or move those away)")
        if not kind.recognise(path):
            raise OutputError(f"{flag} {path}: is not a {kind.name}; refusing to replace it")
    else:
        if path.is_dir():
            raise OutputError(f"{flag} {path}: is a directory, not a {kind.name}; refusing to replace it")
        if not overwrite:
            raise OutputError(f"{path}: already exists (pass --overwrite to replace it)")
        if not kind.recognise(path):
            raise OutputError(f"{flag} {path}: is not a {kind.name}; refusing to replace it")
    return path


def tmp_sibling(path: str | Path, what: str = TMP) -> Path:
    """A fresh name beside ``path`` (same filesystem, so renames are atomic) that :func:`sweep` knows."""
    path = Path(path)
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{secrets.token_hex(3)}")


def _mkdir(p: Path) -> None:
    p.mkdir()  # the permissions a plain mkdir gives (umask applies)


def swap_in(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``; an existing output is set aside first and removed only
    once the new one is in place."""
    if path.exists() or path.is_symlink():
        if tmp.is_dir() or path.is_dir():
            old = tmp_sibling(path, OLD)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            _remove(old)
            return
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """``with staged_dir(out) as tmp:`` fill ``tmp``; on success it becomes ``out`` (replacing an
    existing one only then); on any error, ^C or SIGTERM it is removed and ``out`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    _mkdir(tmp)
    try:
        yield tmp
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """``with staged_file(out) as tmp:`` write ``tmp``; on success it replaces ``out`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        swap_in(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def results_files(files: list[Path], *, resume: bool) -> Iterator[list[Path]]:
    """``with results_files(files, resume=...) as targets:`` the paths a results run rewrites after every
    row: ``files`` themselves when they are new or resumed; when the run replaces existing ones
    (``--overwrite``), temporary siblings that take their place only once the block ends, so a failed
    or interrupted run leaves the old results whole and removes its own."""
    staged = any(f.exists() for f in files) and not resume
    targets = [tmp_sibling(f) for f in files] if staged else list(files)
    try:
        yield targets
    except BaseException:
        if staged:
            for t in targets:
                with contextlib.suppress(OSError):
                    t.unlink()
        raise
    if staged:
        for t, f in zip(targets, files):
            swap_in(t, f)


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write a whole file atomically (temporary sibling, then rename)."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)
