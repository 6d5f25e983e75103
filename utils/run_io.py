"""Run-folder I/O: atomic files, an append-only metrics log, and provenance.

Every training run writes a self-describing folder::

    runs/<YYYYmmdd-HHMMSS>_<method>_s<seed>/
        config.json        resolved configuration (strict JSON)
        environment.json   library versions, device, git commit
        metrics.jsonl      one JSON object per evaluation round, appended
        summary.json       final numbers, written once at the end
        checkpoints/       see utils/checkpoint.py

Files that are rewritten (config, summary, checkpoints) go through a temp file
and ``os.replace`` so a crash leaves either the old file or the new one, never
half of each. The metrics log is append-only: each record is one ``write`` of a
whole line followed by ``fsync``, so a crash can cost at most the last line,
which ``read_metrics`` detects and drops with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils.errors import UserError

_REPO_ROOT = Path(__file__).resolve().parents[1]
_OUT_DIR_HINT = "choose another --out_dir, or fix the folder's permissions"


class OutputDirError(UserError, OSError):
    """An output file or folder cannot be written; the message names it and gives a hint."""

    def __init__(self, what: str, hint: str | None = None, err: int | None = None):
        super().__init__(what, hint)
        self.errno = err


class RunLockedError(OutputDirError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a folder for as long as this process works in it.

    ``flock`` on ``<folder>/.lock``: the kernel drops it when the process ends, however it ends
    (kill -9 included), so a lock never goes stale and needs no cleaning up. The file holds
    the holder's PID, start time and command so a refused process can name it.
    """

    def __init__(self, folder: str | Path, what: str = "run folder", flag: str = "--out_dir"):
        self.folder, self.what, self.flag = Path(folder), what, flag  # flag: what chose the folder
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"cannot create run folder {self.folder}: {e.strerror}", _OUT_DIR_HINT, e.errno) from e
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot create {self.path}: {e.strerror}", _OUT_DIR_HINT, e.errno) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = self._in_use(fd)
            os.close(fd)
            raise err from None
        info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        _write_all(fd, (json.dumps(info) + "\n").encode("utf-8"))
        self._fd = fd
        return self

    def check_free(self) -> None:
        """Refuse now, before slow work (loading data), when a live process holds the lock; creates
        nothing, holds nothing: acquire() still decides, since a holder may start in between."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file yet (or none readable): acquire() reports what is wrong
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(fd) from None
        finally:
            os.close(fd)  # also drops the probe's own lock

    def _in_use(self, fd: int) -> RunLockedError:
        return RunLockedError(
            f"{self.what} {self.folder} is in use by {_holder(fd)}; two processes writing one folder would "
            "interleave their logs", f"wait for it to finish (or stop it), or use another {self.flag}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (harmless)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        cmd = _shortened(" ".join(str(a) for a in info.get("argv", [])), 120)
        return f"process {info['pid']} (started {info.get('started', '?')}: {cmd})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its PID could not be read)"


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"  # the ellipsis says it was cut


# ---------------------------------------------------------------------------
# Run folder naming


def default_run_dir(method: str, seed: int, root: str | Path = "runs") -> Path:
    """Create and return a fresh ``<root>/<YYYYmmdd-HHMMSS>_<method>_s<seed>`` folder.

    The folder is created here (``mkdir`` without ``exist_ok``) so two runs started in
    the same second cannot both claim it; the loser gets a ``-1``, ``-2``... suffix.
    """
    safe_method = re.sub(r"[^A-Za-z0-9_.-]+", "-", method).strip("-") or "run"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}_{safe_method}_s{seed}"
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create run root folder {root}: {e.strerror}",
                             _OUT_DIR_HINT, e.errno) from e
    for n in range(10_000):
        candidate = root / (base if n == 0 else f"{base}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputDirError(f"cannot create run folder {candidate}: {e.strerror}",
                                 _OUT_DIR_HINT, e.errno) from e
    raise OutputDirError(f"too many run folders named {base}-N in {root}", _OUT_DIR_HINT)


# ---------------------------------------------------------------------------
# Strict JSON


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
    if isinstance(obj, dict):
        items: Iterable = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _first_nonfinite(v, f"{where}[{k!r}]")
        if found:
            return found
    return None


def to_strict_json(obj: Any, *, what: str = "value", indent: int | None = None) -> str:
    """Serialise ``obj`` as strict JSON; NaN/inf raise a ValueError naming the key."""
    try:
        return json.dumps(obj, allow_nan=False, indent=indent, default=_json_default)
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        plain = json.loads(json.dumps(obj, default=_json_default))  # NaN-tolerant, to locate it
        where = _first_nonfinite(plain, what) or what
        raise ValueError(f"{where} is not finite (NaN or inf); strict JSON cannot hold it ({e})"
                         "\n  hint: fix the value upstream, or store it as null/a string") from e


# ---------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry itself must be flushed."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # atomic_write_bytes's temp names


def remove_stale_temps(directory: str | Path) -> int:
    """Delete the temp files of atomic writes a killed process left in `directory`; returns the bytes freed.

    Only for a folder no other process writes (the run lock holder's): a live write's temp
    file has the same name shape. A kill during a checkpoint write leaves ~60 MB at paper scale."""
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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    On any failure the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # 0o666 lets the umask decide permissions, like a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        state = "does not exist" if e.errno == errno.ENOENT else "is not writable"
        raise OutputDirError(f"cannot write {path.name}: folder {directory} {state} ({e.strerror})",
                             _OUT_DIR_HINT, e.errno) from e
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, OutputDirError):
            hint = ("free some disk space, or " + _OUT_DIR_HINT) if e.errno == errno.ENOSPC \
                else _OUT_DIR_HINT
            raise OutputDirError(f"could not write {path}: {e.strerror or e}; "
                                 "the previous file (if any) is untouched", hint, e.errno) from e
        raise
    _fsync_dir(directory)
    return path


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as strict, indented JSON atomically (NaN/inf raise ValueError)."""
    text = to_strict_json(obj, what=Path(path).name, indent=indent) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Metrics log (JSON lines)


class MetricsWriter:
    """Append-only JSON-lines log, one record per line, each line fsynced as a whole.

    Opening an existing file whose last line was cut by a crash trims that partial
    line first (with a warning), so new records never get glued onto it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._repair_tail()
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot open metrics log {self.path}: {e.strerror}",
                                 _OUT_DIR_HINT, e.errno) from e

    def _repair_tail(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{self.path}: dropping a partial last line ({len(data) - keep} bytes, "
                      "left by an interrupted write) before appending", stacklevel=3)
        os.truncate(self.path, keep)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; NaN/inf raise ValueError before anything is written."""
        if self._fd is None:
            raise ValueError(f"metrics log {self.path} is closed")
        if not isinstance(record, dict):
            raise TypeError(f"a metrics record must be a dict, got {type(record).__name__}")
        self.check_in_place()
        line = (to_strict_json(record, what="metrics record") + "\n").encode("utf-8")
        try:
            _write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as e:
            raise OutputDirError(f"could not append to {self.path}: {e.strerror or e}",
                                 "free some disk space, or " + _OUT_DIR_HINT, e.errno) from e

    def check_in_place(self) -> None:
        """The open descriptor would go on writing into a log deleted or replaced under it, and
        every later record would be lost with the unlinked file: stop at the next record instead."""
        if self._fd is None:
            return
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise lost_log_error(self.path, "vanished (deleted or moved) while the run was writing it") from None
        mine = os.fstat(self._fd)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise lost_log_error(self.path, "was replaced by another file while the run was writing it")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()


def lost_log_error(path: Path, what: str) -> OutputDirError:
    """A run's log that is gone cannot be rebuilt from its checkpoints: say so, and what is left to do."""
    return OutputDirError(f"{path} {what}; its records cannot be rebuilt from the checkpoints",
                          f"put the run's own {path.name} back (from a backup) and rerun with --resume, or start "
                          "the run anew in another --out_dir")


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines metrics log (gzipped when its name ends in .gz, as in a run record).

    A bad last line is what a crash mid-append leaves: it is dropped with a warning.
    A bad line anywhere else means the file was damaged or edited: ValueError with the
    line number. Blank lines are skipped.
    """
    path = Path(path)
    raw = path.read_bytes()
    lines = (gzip.decompress(raw) if path.suffix == ".gz" else raw).split(b"\n")
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    records: list[dict[str, Any]] = []
    for k, (lineno, raw) in enumerate(numbered):
        rec = _parse_record(raw)
        if rec is not None:
            records.append(rec)
        elif k == len(numbered) - 1:
            warnings.warn(f"{path}: line {lineno} is truncated or invalid JSON (a write was "
                          f"interrupted); dropped it, kept {len(records)} records", stacklevel=2)
        else:
            raise ValueError(f"{path}: line {lineno} is not a JSON object: {raw[:80]!r}"
                             "\n  hint: the file was damaged or edited; fix or delete that line")
    return records


def check_rounds_increase(path: str | Path, records: list[dict[str, Any]]) -> None:
    """A log whose rounds go backwards was appended by two processes at once (before the run
    lock existed) or edited: name the file and the line, and say how to repair it."""
    prev = None
    for i, rec in enumerate(records, 1):
        rnd = rec.get("round")
        if prev is not None and isinstance(rnd, int) and rnd <= prev:
            raise OutputDirError(
                f"{path}: record {i} is round {rnd} after round {prev}; the log holds the same rounds twice "
                "(two processes appended to it at once, or it was edited)",
                f"repair it with `python -m utils.repair_logs {Path(path).parent}` (keeps the first record of "
                "each round, in order), then rerun with --resume")
        if isinstance(rnd, int):
            prev = rnd


def repair_log(path: str | Path) -> tuple[int, int]:
    """Keep each record whose round exceeds every round kept before it; returns (kept, dropped).

    Runs are deterministic in their flags, so two processes that trained the same rounds
    logged the same numbers: the first record of each round is as good as any."""
    path = Path(path)
    records = read_metrics(path)
    kept, last = [], None
    for rec in records:
        rnd = rec.get("round")
        if isinstance(rnd, int) and last is not None and rnd <= last:
            continue
        kept.append(rec)
        last = rnd if isinstance(rnd, int) else last
    if len(kept) != len(records):
        body = "".join(to_strict_json(r, what="metrics record") + "\n" for r in kept)
        atomic_write_bytes(path, body.encode("utf-8"))
    return len(kept), len(records) - len(kept)


def trim_metrics(path: str | Path, last_round: int) -> int:
    """Drop records with ``round > last_round`` (logged after the checkpoint a run resumes
    from); returns how many were dropped. The file is rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if not (isinstance(r.get("round"), int) and r["round"] > last_round)]
    dropped = len(records) - len(kept)
    if dropped or path.read_bytes()[-1:] not in (b"", b"\n"):
        body = "".join(to_strict_json(r, what="metrics record") + "\n" for r in kept)
        atomic_write_bytes(path, body.encode("utf-8"))
    return dropped


# ---------------------------------------------------------------------------
# Run folder


class RunDir:
    """One run's output folder: config, environment, metrics log, summary, checkpoints."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"cannot create run folder {self.path}: {e.strerror}",
                                 _OUT_DIR_HINT, e.errno) from e
        self._metrics: MetricsWriter | None = None

    @classmethod
    def create(cls, method: str, seed: int, root: str | Path = "runs") -> RunDir:
        return cls(default_run_dir(method, seed, root))

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")

    def write_config(self, config: dict[str, Any]) -> Path:
        return atomic_write_json(self.config_path, config)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return atomic_write_json(self.summary_path, summary)

    @property
    def metrics(self) -> MetricsWriter:
        """The metrics log, opened on first use so read-only users never create it."""
        if self._metrics is None:
            self._metrics = MetricsWriter(self.metrics_path)
        return self._metrics

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path) if self.metrics_path.exists() else []

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


# ---------------------------------------------------------------------------
# Provenance


def _dist_version(name: str) -> str | None:
    # Reading package metadata avoids importing heavy libraries (transformers) just for a version.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict[str, Any]:
    """Versions, hardware and code revision, for the run folder (every field may be None).

    The CPU model and torch's thread count are kept because both can change a run's last bits
    (a GEMM's reduction order): a replay of a recorded run uses the same thread count."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "argv": list(sys.argv),
    }
    for dist in ("torch", "numpy", "transformers", "flwr", "safetensors", "wandb"):
        info[dist] = _dist_version(dist)
    info["cuda"] = info["cuda_device"] = info["torch_threads"] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install must not stop a run from recording the rest
        pass
    info["git_commit"] = _git("rev-parse", "HEAD") or None
    # Reports and records are outputs, not code: the queue's own worktree rewrites them between runs.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)docs/results", ":(exclude)results")
    info["git_dirty"] = None if status is None or info["git_commit"] is None else bool(status)
    return info


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks so large embedding files fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def tree_sha256(paths: str | Path | Iterable[str | Path]) -> str:
    """One digest over files and folders: sorted relative paths plus each file's SHA-256.

    A folder contributes its files with paths relative to the folder (so renaming the
    folder keeps the digest); a file given directly contributes its name. Two entries with
    the same relative path are ambiguous and raise ValueError.
    """
    items = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    entries: dict[str, Path] = {}
    for item in items:
        if item.is_dir():
            files = {f.relative_to(item).as_posix(): f for f in item.rglob("*") if f.is_file()}
        elif item.is_file():
            files = {item.name: item}
        else:
            raise FileNotFoundError(f"tree_sha256: {item} does not exist")
        clash = entries.keys() & files.keys()
        if clash:
            raise ValueError(f"tree_sha256: {sorted(clash)[0]!r} appears under two of the given paths")
        entries.update(files)
    h = hashlib.sha256()
    for rel in sorted(entries):
        h.update(f"{rel}\0{file_sha256(entries[rel])}\n".encode("utf-8"))
    return h.hexdigest()
