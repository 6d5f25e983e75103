"""Train the planned runs of reproduce.py and sweep.py: finished folders reused, interrupted ones resumed,
verified run records reused (README, Run records)."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

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
    torch_threads,
)
from orchestration.resume import differences
from utils.checkpoint import latest_checkpoint
from utils.errors import RunFolderError
from utils.provenance import cpu_model
from utils.run_folder import CONFIG, is_finished, read_failure, read_json, read_log, started_threads

from .jobs import resolve_jobs, run_tasks, usable_cores
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


def record_state(record: Path | None, requested: dict) -> RecordState:
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


def verify(record: Path, method: str, args, data) -> tuple[bool, str]:
    """Whether a replay of the record's first rounds reproduces it, and the largest difference (or the first
    one beyond the tolerance) with both CPU models."""
    info = records.read_info(record)
    recorded = read_log(record, "losses")
    rounds = min(REPLAY_ROUNDS, len(recorded))  # a run that diverged at round 2 logged one round
    here = cpu_model()
    tolerance = tolerance_for(info.get("cpu_model"), here)
    where = (f"recorded on {info.get('cpu_model') or 'an unrecorded CPU'} with "
             f"{info.get('torch_threads') or 'default'} torch thread(s), replayed on {here}")
    if rounds == 0:
        return True, "no round logged before it diverged: nothing to replay"
    try:
        replayed = replay_losses(run_config(args, method), data, rounds, info.get("torch_threads"))
    except DataError as e:
        return False, f"the replay failed: {str(e).splitlines()[0]}"
    cmp = compare_losses(recorded, replayed, tolerance)
    if cmp.ok:
        return True, (f"replay of {rounds} rounds: {cmp.values} losses, largest relative difference "
                      f"{cmp.max_rel:.2g} (tolerance {tolerance:g}); {where}")
    return False, f"replay of {rounds} rounds: first value beyond {tolerance:g}: {cmp.first_diff}; {where}"


def stale_error(stale: list[tuple[Path, str]]) -> RunFolderError:
    lines = "\n  - ".join(f"{shown(record)}: {text}" for record, text in stale)
    return RunFolderError(
        f"{len(stale)} record(s) are stale: this code no longer reproduces their first {REPLAY_ROUNDS} rounds "
        f"(beyond {TOLERANCE:g} relative on the recording CPU model, {CROSS_HOST_TOLERANCE:g} on another); "
        f"nothing was trained:\n  - {lines}",
        "if the change of numbers is intended, rerun with --rerun_stale (retrains these runs and replaces their "
        "records); otherwise find the code change that moved them")


def status_report(rows: list[tuple[str, RecordState]], log=print) -> Counter:
    width = max((len(name) for name, _ in rows), default=0)
    for name, st in rows:
        where = shown(st.path) if st.path is not None else "(records off)"
        extra = f": {differences_text(st.differences)}" if st.differences else ""
        log(f"{st.status:12s}  {name:{width}s}  {where}{extra}")
    counts = Counter(st.status for _, st in rows)
    log(f"{len(rows)} planned: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
        + " (configurations compared with the plan; --status replays nothing)")
    return counts


def add_batch_arguments(p) -> None:
    """--threads, --jobs and the run-record flags of scripts/reproduce.py and scripts/sweep.py."""
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per run (0 = cores // --jobs; with --jobs 1, torch's default)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each in its own process (default: 2 on a machine with 2 or more "
                        "cores, else 1; measured in benchmarks/README.md)")
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


def resolve_batch_args(args) -> None:
    args.records_dir = Path(args.records_dir) if args.records_dir else records.default_records_dir()
    args.jobs, args.threads = resolve_jobs(args.jobs, args.threads, usable_cores())
    if args.threads:  # also with --jobs: this process's data, replays and single runs at the children's count
        torch.set_num_threads(args.threads)


def folder_action(path: Path) -> str:
    """fresh (no folder yet), or how an interrupted folder continues through the training code's --resume."""
    if not (path / CONFIG).is_file():
        return "fresh"
    return "resume" if latest_checkpoint(path / "checkpoints") is not None else "restart"


def plan_action(folder: Path, state: Callable[[], RecordState], log=print) -> str:
    """What a planned run's folder and record leave to do; state() is asked only when the folder is not done."""
    if is_finished(folder):
        return "reuse"
    if read_failure(folder) is not None:  # deterministic: a rerun would diverge the same way
        return "failed"
    st = state()
    if st.status == "stale-config":
        log(f"record  {shown(st.path)} was made with other flags (record -> planned: "
            f"{differences_text(st.differences)}); not reused: planned to run, its record replaced then")
    return "record" if st.status in ("finished", "diverged") else folder_action(folder)


@dataclass
class Planned:
    kind: str                  # the method (reproduce.py) or the variant (sweep.py)
    seed: int
    folder: Path
    record: Path | None        # where its record goes (None: records off); action "record": reused from there
    action: str                # reuse | record | failed (diverged) | fresh | resume | restart (no checkpoint yet)
    argv: list[str] = field(default_factory=list)   # main_fl.py's flags (sweeps), --out_dir aside

    @property
    def name(self) -> str:
        return f"{self.kind} seed {self.seed}"

    @property
    def source(self) -> Path:
        """Where the report reads this run."""
        return self.record if self.action == "record" else self.folder

    @property
    def resumes(self) -> bool:
        return self.action in ("resume", "restart")


class Batch:
    """Runs a plan: train(run) in this process (an exit code, or the run's DataError), task(run, threads)
    as a jobs.Task in its own process. With diverged_ok a diverged run is a result and the batch goes on."""

    def __init__(self, args, train: Callable, task: Callable, diverged_ok: bool = False, log=print):
        self.args, self.train, self.task, self.diverged_ok, self.log = args, train, task, diverged_ok, log
        self.done: dict[str, list[str]] = {"trained": [], "resumed": [], "reused": [], "from_records": []}
        self.on_progress: Callable | None = None
        self._order: list[str] = []

    def verify(self, plan: list[Planned], replay: Callable) -> list[str]:
        """Replay each reused record (replay(run) -> (method, args, data)) before anything trains; stale
        records stop the command, or with --rerun_stale are planned to run. Returns the log lines."""
        stale, lines = [], []
        for p in (p for p in plan if p.action == "record"):
            ok, text = verify(p.record, *replay(p))
            lines.append(f"record  {shown(p.record)}: {'verified' if ok else 'STALE'}; {text}")
            self.log(lines[-1])
            if not ok:
                stale.append((p, text))
        if stale and not self.args.rerun_stale:
            raise stale_error([(p.record, text) for p, text in stale])
        for p, _ in stale:
            p.action = folder_action(p.folder)
            self.log(f"--rerun_stale: {p.name} is planned to {p.action} (its record is replaced then)")
        return lines

    def save_record(self, p: Planned) -> None:
        if p.record is not None:
            rec = records.write_record(p.folder, self.args.records_dir, self.log)
            if self.args.commit_records:
                records.commit_record(rec, self.log)

    def threads(self, p: Planned) -> int:
        """An interrupted run continues with the torch thread count it started with (its last bits)."""
        return (started_threads(p.folder) if p.resumes else None) or self.args.threads

    def run(self, plan: list[Planned]) -> dict[str, list[str]]:
        self._order = [p.folder.name for p in plan]
        for p in plan:
            if p.action == "reuse":
                self.log(f"reuse   {p.folder} (finished, same flags)")
                self._add("reused", p)
                self.save_record(p)  # a no-op when the record is there already
            elif p.action == "failed":
                self.log(f"failed  {p.folder} (earlier: {read_failure(p.folder).get('reason')}); not retried, "
                         "reported as diverged")
                self.save_record(p)
            elif p.action == "record":
                self.log(f"reuse   {shown(p.record)} (record: same flags, replay verified)")
                self._add("from_records", p)
        todo = [p for p in plan if p.action in ("fresh", "resume", "restart")]
        if self.args.jobs > 1 and len(todo) > 1:  # a single run trains here, with the thread count a job would get
            by_name = {p.folder.name: p for p in todo}
            for p in todo:
                self.log(f"queued  {p.action:7s} {p.name} -> {p.folder}")
            run_tasks([self.task(p, self.threads(p)) for p in todo], self.args.jobs,
                      lambda t, code: self._ended(by_name[t.label], code, t.errors), self.log)
            return self.done
        for i, p in enumerate(todo, 1):
            self.log(f"[{i}/{len(todo)}] {p.action:7s} {p.name} -> {p.folder}")
            t0 = time.perf_counter()
            try:
                with torch_threads(self.threads(p)):
                    code = self.train(p)
            except DataError:
                if read_failure(p.folder) is not None:  # diverged: that is its result, recorded as such
                    self.save_record(p)
                raise
            self._ended(p, code, [], time.perf_counter() - t0)
        return self.done

    def _add(self, key: str, p: Planned) -> None:
        self.done[key] = sorted([*self.done[key], p.folder.name], key=self._order.index)  # plan order

    def _ended(self, p: Planned, code: int, errors: list[str], seconds: float | None = None) -> None:
        if code in (130, 143):
            raise KeyboardInterrupt
        failure = read_failure(p.folder) if code else None
        if failure is not None:
            self.save_record(p)
            if self.diverged_ok:  # a noise level or strategy that diverges is a result of the sweep, not its end
                self.log(f"failed  {p.folder}: {failure.get('reason')}; the sweep goes on, the report lists it "
                         "as diverged")
                return
        if code:
            raise DataError(f"the run in {p.folder} failed (exit {code}): {' '.join(errors) or 'see its output above'}",
                            "fix it and rerun the same command: finished runs are reused")
        self.log(f"{p.name} done" + (f" in {seconds:.1f} s" if seconds is not None else ""))
        self.save_record(p)
        self._add("resumed" if p.resumes else "trained", p)
        if self.on_progress:
            self.on_progress(self.done)
