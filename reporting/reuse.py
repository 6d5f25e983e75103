"""Run records (orchestration/records.py) in the plans of scripts/reproduce.py and scripts/sweep.py.

A planned run whose record exists is not trained again when
  1. the record's resolved configuration is the planned one (orchestration.resume.differences,
     the training code's own run identity: every flag that changes numbers, the data content
     hash, the embedding model; a flag added since the run, left at its default, is no
     difference), and
  2. a replay of its first rounds on this code reproduces its logged losses to 1e-5 relative
     on the CPU model that recorded it, 1e-3 on another (orchestration/replay.py), which
     catches a code change that alters numbers.
A record that fails 1 is planned to run, and replaced when that run finishes. One that fails 2
is stale: nothing trains until it is retrained on purpose (--rerun_stale).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_loaders.schema import DataError
from orchestration import records
from orchestration.config import run_config
from orchestration.replay import (
    CROSS_HOST_TOLERANCE,
    REPLAY_ROUNDS,
    TOLERANCE,
    compare_losses,
    replay_losses,
    tolerance_for,
)
from orchestration.resume import differences
from utils.errors import RunFolderError
from utils.provenance import cpu_model
from utils.run_folder import CONFIG, is_finished, read_json, read_log

from .paths import shown

STATUSES = ("finished", "diverged", "stale-config", "missing")


def records_root(out_root: Path, records_dir: Path | None, log=print) -> Path | None:
    """The records folder of out_root's runs; None (said once) when out_root is not under runs/."""
    if records_dir is None:
        return None
    try:
        return records.record_path(Path(out_root) / "_", records_dir).parent
    except DataError:
        log(f"records: off (--out_root {shown(out_root)} is not inside a folder named runs/; records map "
            "runs/<A>/<B>/<run> to <records_dir>/<A>/<B>/<run>)")
        return None


@dataclass
class RecordState:
    path: Path | None          # the record's folder (None: records are off)
    status: str                # finished | diverged | stale-config | missing
    differences: list[str] = field(default_factory=list)   # record -> planned, for stale-config

    @property
    def usable(self) -> bool:
        return self.status in ("finished", "diverged")


def record_state(record: Path | None, requested: dict) -> RecordState:
    """What the record holds for this planned run (configs compared; nothing replayed)."""
    if record is None or not (record / CONFIG).is_file():
        return RecordState(record, "missing")
    stored = read_json(record / CONFIG, hint="restore it from git, or delete the record to retrain the run")
    diffs = differences(stored, requested)
    if diffs:
        return RecordState(record, "stale-config", diffs)
    return RecordState(record, "finished" if is_finished(record) else "diverged")


def differences_text(diffs: list[str], most: int = 4) -> str:
    more = f" (+{len(diffs) - most} more)" if len(diffs) > most else ""
    return "; ".join(diffs[:most]) + more


@dataclass
class Verdict:
    record: Path
    ok: bool
    text: str   # the largest difference and both CPU models, or the first differing value


def verify(record: Path, method: str, args, data) -> Verdict:
    """Replay the record's first rounds with `args` (the planned flags, equal to the record's)."""
    info = records.read_info(record)
    recorded = read_log(record, "losses")
    rounds = min(REPLAY_ROUNDS, len(recorded))  # a run that diverged at round 2 logged one round
    here = cpu_model()
    tolerance = tolerance_for(info.get("cpu_model"), here)
    where = (f"recorded on {info.get('cpu_model') or 'an unrecorded CPU'} with "
             f"{info.get('torch_threads') or 'default'} torch thread(s), replayed on {here}")
    if rounds == 0:
        return Verdict(record, True, "no round logged before it diverged: nothing to replay")
    try:
        replayed = replay_losses(run_config(args, method), data, rounds, info.get("torch_threads"))
    except DataError as e:
        return Verdict(record, False, f"the replay failed: {str(e).splitlines()[0]}")
    cmp = compare_losses(recorded, replayed, tolerance)
    if cmp.ok:
        return Verdict(record, True, f"replay of {rounds} rounds: {cmp.values} losses, largest relative "
                                     f"difference {cmp.max_rel:.2g} (tolerance {tolerance:g}); {where}")
    return Verdict(record, False, f"replay of {rounds} rounds: first value beyond {tolerance:g}: "
                                  f"{cmp.first_diff}; {where}")


def stale_error(stale: list[Verdict]) -> RunFolderError:
    lines = "\n  - ".join(f"{shown(v.record)}: {v.text}" for v in stale)
    return RunFolderError(
        f"{len(stale)} record(s) are stale: this code no longer reproduces their first {REPLAY_ROUNDS} rounds "
        f"(beyond {TOLERANCE:g} relative on the recording CPU model, {CROSS_HOST_TOLERANCE:g} on another); "
        f"nothing was trained:\n  - {lines}",
        "if the change of numbers is intended, rerun with --rerun_stale (retrains these runs and replaces their "
        "records); otherwise find the code change that moved them")


def status_report(rows: list[tuple[str, RecordState]], log=print) -> Counter:
    """One line per planned run and the counts: the plan against the records."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, st in rows:
        where = shown(st.path) if st.path is not None else "(records off)"
        extra = f": {differences_text(st.differences)}" if st.differences else ""
        log(f"{st.status:12s}  {name:{width}s}  {where}{extra}")
    counts = Counter(st.status for _, st in rows)
    log(f"{len(rows)} planned: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
        + " (configurations compared with the plan; --status replays nothing)")
    return counts


def add_record_arguments(p) -> None:
    """The record flags of scripts/reproduce.py and scripts/sweep.py (an argparse parser or group)."""
    p.add_argument("--records_dir", default=None,
                   help="run records: runs/<A>/<B>/<run> is recorded at <records_dir>/<A>/<B>/<run> when it "
                        "finishes, and a planned run with a verified record is not trained again (default "
                        f"${records.RECORDS_ENV}, else results/ of the repository)")
    p.add_argument("--commit_records", action="store_true",
                   help="git-commit each record the moment it is written (that path only, nothing else)")
    p.add_argument("--rerun_stale", action="store_true",
                   help="retrain the runs whose record this code no longer reproduces (default: stop, name them)")
    p.add_argument("--status", action="store_true",
                   help="train nothing: list the plan against the records (finished, diverged, missing, "
                        "stale-config) with counts")
