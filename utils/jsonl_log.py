"""Append-only JSON-lines logs (a run's metrics.jsonl and losses.jsonl): write, read, trim, repair.

Each record is one fsynced ``write`` of a whole line, so a crash costs at most the last line;
a log is only ever rewritten whole, atomically.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path
from typing import Any

from utils.atomic_write import atomic_write_bytes, to_strict_json, write_all
from utils.errors import OUT_DIR_HINT, OutputDirError


class MetricsWriter:
    """Appends records to a JSON-lines log; a last line cut by a crash is trimmed first (with a warning)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._repair_tail()
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot open metrics log {self.path}: {e.strerror}", err=e.errno) from e

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
        if self._fd is None:
            raise ValueError(f"metrics log {self.path} is closed")
        if not isinstance(record, dict):
            raise TypeError(f"a metrics record must be a dict, got {type(record).__name__}")
        self._check_in_place()
        line = (to_strict_json(record, what="metrics record") + "\n").encode("utf-8")
        try:
            write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as e:
            raise OutputDirError(f"could not append to {self.path}: {e.strerror or e}",
                                 "free some disk space, or " + OUT_DIR_HINT, e.errno) from e

    def _check_in_place(self) -> None:
        """Stop when the log was deleted or replaced: the descriptor would write into the lost file."""
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
    return OutputDirError(f"{path} {what}; its records cannot be rebuilt from the checkpoints",
                          f"put the run's own {path.name} back (from a backup) and rerun with --resume, or start "
                          "the run anew in another --out_dir")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines log (gzipped if named .gz). A bad last line (a crash mid-append) is dropped
    with a warning; a bad line elsewhere is a ValueError naming it."""
    path = Path(path)
    raw = path.read_bytes()
    lines = (gzip.decompress(raw) if path.suffix == ".gz" else raw).split(b"\n")
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    records: list[dict[str, Any]] = []
    for k, (lineno, raw) in enumerate(numbered):
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif k == len(numbered) - 1:
            warnings.warn(f"{path}: line {lineno} is truncated or invalid JSON (a write was "
                          f"interrupted); dropped it, kept {len(records)} records", stacklevel=2)
        else:
            raise ValueError(f"{path}: line {lineno} is not a JSON object: {raw[:80]!r}"
                             "\n  hint: the file was damaged or edited; fix or delete that line")
    return records


def _repeats(records: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(index, round, the highest round before it) of each record whose round does not exceed every round
    kept before it (two processes appended to the log, or it was edited)."""
    out, last = [], None
    for i, rec in enumerate(records):
        rnd = rec.get("round")
        if isinstance(rnd, int) and last is not None and rnd <= last:
            out.append((i, rnd, last))
        elif isinstance(rnd, int):
            last = rnd
    return out


def check_rounds_increase(path: str | Path, records: list[dict[str, Any]]) -> None:
    repeats = _repeats(records)
    if repeats:
        i, rnd, prev = repeats[0]
        raise OutputDirError(
            f"{path}: record {i + 1} is round {rnd} after round {prev}; the log holds the same rounds twice "
            "(two processes appended to it at once, or it was edited)",
            f"repair it with `python scripts/repair_logs.py {Path(path).parent}` (keeps the first record of "
            "each round, in order), then rerun with --resume")


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    body = "".join(to_strict_json(r, what="metrics record") + "\n" for r in records)
    atomic_write_bytes(path, body.encode("utf-8"))


def repair_log(path: str | Path) -> tuple[int, int]:
    """Keep each record whose round exceeds every round kept before it (runs are deterministic: the
    first of a round is as good as any); returns (kept, dropped)."""
    path = Path(path)
    records = read_metrics(path)
    dropped = {i for i, _, _ in _repeats(records)}
    kept = [rec for i, rec in enumerate(records) if i not in dropped]
    if len(kept) != len(records):
        _rewrite(path, kept)
    return len(kept), len(records) - len(kept)


def trim_metrics(path: str | Path, last_round: int) -> int:
    """Drop the records after ``last_round`` (the checkpoint a run resumes from); returns how many."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if not (isinstance(r.get("round"), int) and r["round"] > last_round)]
    dropped = len(records) - len(kept)
    if dropped or path.read_bytes()[-1:] not in (b"", b"\n"):
        _rewrite(path, kept)
    return dropped
