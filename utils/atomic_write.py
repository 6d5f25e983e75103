"""Files that are whole or absent: strict JSON, and writes through a temp file and ``os.replace``.

A crash leaves the old file or the new one, never half of each; NaN or inf raise an error naming
the key instead of landing as a token other readers reject.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

from utils.errors import OUT_DIR_HINT, OutputDirError

_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # atomic_write_bytes's temp names


def _json_default(obj: Any) -> Any:
    """Turn paths, numpy/torch scalars and arrays into JSON values (NaN checks still apply)."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays/scalars, tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _first_nonfinite(obj: Any, where: str) -> str | None:
    """Where the first NaN/inf sits in a nested structure, e.g. ``summary['eval_cov']``."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return next((found for k, v in items if (found := _first_nonfinite(v, f"{where}[{k!r}]"))), None)


def to_strict_json(obj: Any, *, what: str = "value", indent: int | None = None) -> str:
    try:
        return json.dumps(obj, allow_nan=False, indent=indent, default=_json_default)
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        plain = json.loads(json.dumps(obj, default=_json_default))  # NaN-tolerant, to locate it
        where = _first_nonfinite(plain, what) or what
        raise ValueError(f"{where} is not finite (NaN or inf); strict JSON cannot hold it ({e})"
                         "\n  hint: fix the value upstream, or store it as null/a string") from e


def write_all(fd: int, data: bytes) -> None:
    """The whole buffer: ``os.write`` may write only part of it (a full disk, a signal)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry itself must be flushed."""
    with contextlib.suppress(OSError):  # some filesystems (and Windows) refuse it on a folder; the data is synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(directory: str | Path) -> int:
    """Delete the temp files a killed process left in `directory` (only the run lock holder may: a live
    write's temp file looks the same); returns the bytes freed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    freed = 0
    for path in directory.iterdir():
        if _TEMP_RE.match(path.name) and path.is_file():
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            freed += size
    return freed


def make_folder(path: Path, what: str = "run folder") -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create {what} {path}: {e.strerror}", err=e.errno) from e
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file and ``os.replace``; on failure ``path`` keeps its content."""
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # 0o666 lets the umask decide permissions, like a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        state = "does not exist" if e.errno == errno.ENOENT else "is not writable"
        raise OutputDirError(f"cannot write {path.name}: folder {directory} {state} ({e.strerror})", err=e.errno) from e
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputDirError):
            hint = ("free some disk space, or " + OUT_DIR_HINT) if e.errno == errno.ENOSPC else OUT_DIR_HINT
            raise OutputDirError(f"could not write {path}: {e.strerror or e}; "
                                 "the previous file (if any) is untouched", hint, e.errno) from e
        raise
    _fsync_dir(directory)
    return path


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    text = to_strict_json(obj, what=Path(path).name, indent=indent) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))
