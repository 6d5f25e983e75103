"""A run's output folder: its layout, writing it, and the one reader of it.

    runs/<YYYYmmdd-HHMMSS>_<method>_s<seed>/
        config.json        resolved configuration and environment
        metrics.jsonl      one record per evaluation round; losses.jsonl: one per round
        summary.json       final numbers (failed.json instead, for a run that diverged)
        checkpoints/       see utils/checkpoint.py

A run record (orchestration/records.py) gzips the logs; the readers here take either, so the
reports, the per-run figures and the predictor read a folder and a record alike.
"""
from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

from utils.atomic_write import atomic_write_json, make_folder
from utils.errors import OutputDirError, RunFolderError
from utils.jsonl_log import MetricsWriter, read_metrics
from utils.metrics import worst_group

CONFIG, SUMMARY, FAILED, CHECKPOINTS = "config.json", "summary.json", "failed.json", "checkpoints"
DAMAGED = "the folder is damaged; delete or repair it"


def default_run_dir(method: str, seed: int, root: str | Path = "runs") -> Path:
    """A fresh ``<root>/<YYYYmmdd-HHMMSS>_<method>_s<seed>`` folder, created here so two runs started in
    the same second cannot both claim it (the loser gets a ``-1``, ``-2``... suffix)."""
    safe_method = re.sub(r"[^A-Za-z0-9_.-]+", "-", method).strip("-") or "run"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}_{safe_method}_s{seed}"
    root = make_folder(Path(root), "run root folder")
    for n in range(10_000):
        candidate = root / (base if n == 0 else f"{base}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputDirError(f"cannot create run folder {candidate}: {e.strerror}", err=e.errno) from e
    raise OutputDirError(f"too many run folders named {base}-N in {root}")


class RunDir:
    """One run's output folder as the run writes it: config, metrics log, summary, checkpoints."""

    def __init__(self, path: str | Path):
        self.path = make_folder(Path(path))
        self._metrics: MetricsWriter | None = None

    config_path = property(lambda self: self.path / CONFIG)
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    losses_path = property(lambda self: self.path / "losses.jsonl")
    summary_path = property(lambda self: self.path / SUMMARY)
    checkpoint_dir = property(lambda self: self.path / CHECKPOINTS)

    def write_config(self, config: dict[str, Any]) -> Path:
        return atomic_write_json(self.config_path, config)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return atomic_write_json(self.summary_path, summary)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self._metrics is None:  # opened on first use, so read-only users never create it
            self._metrics = MetricsWriter(self.metrics_path)
        self._metrics.write(record)

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


def read_json(path: Path, what: str = "", hint: str = DAMAGED) -> dict:
    """A JSON object file; FileNotFoundError when absent, RunFolderError (ending with `hint`) when unreadable."""
    named = f"{what} {path}" if what else str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{named} is unreadable ({e})", hint) from None
    if not isinstance(obj, dict):
        raise RunFolderError(f"{named} is not a JSON object", hint)
    return obj


def is_finished(folder: Path) -> bool:
    """The loop writes summary.json last, after the final checkpoint."""
    return (folder / SUMMARY).is_file()


def read_summary(folder: Path, what: str = "", hint: str = DAMAGED) -> dict | None:
    return read_json(folder / SUMMARY, what, hint) if is_finished(folder) else None


def read_failure(folder: Path) -> dict | None:
    """failed.json of a run that diverged, None for any other; a damaged one still marks it failed."""
    try:
        return read_json(folder / FAILED)
    except FileNotFoundError:
        return None
    except RunFolderError:
        return {"reason": f"{folder / FAILED} is unreadable"}


def started_threads(folder: Path) -> int | None:
    """The torch thread count the run started with (its last bits depend on it); None when unknown."""
    try:
        return (read_json(folder / CONFIG).get("environment") or {}).get("torch_threads")
    except (FileNotFoundError, RunFolderError):
        return None


def read_log(folder: Path, stem: str) -> list[dict[str, Any]]:
    """<stem>.jsonl of a run folder, or <stem>.jsonl.gz of a record; [] when neither is there."""
    for path in (folder / f"{stem}.jsonl", folder / f"{stem}.jsonl.gz"):
        if path.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a cut last line is what a live or interrupted run shows
                return read_metrics(path)
    return []


# Worst-group keys, derived from the per-group scores for a record without them (as the run loop does).
_WORST_KEYS = {"worst_alignment": "worst", "alignment_gap": "gap", "bottom_quarter_alignment": "bottom_quarter"}


def record_value(rec: dict, key: str) -> float | None:
    """rec[key]; a worst-group key computed from rec['<eval|train>_group_scores'] when absent; else None."""
    if rec.get(key) is not None:
        return rec[key]
    prefix, _, rest = key.partition("_")
    scores = rec.get(f"{prefix}_group_scores") if rest in _WORST_KEYS else None
    if not scores:
        return None
    return worst_group(scores)[_WORST_KEYS[rest]]
