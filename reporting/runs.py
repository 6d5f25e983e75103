"""Run folders and records as the reports see them: found by glob, classified, read once (utils/run_folder.py)."""
from __future__ import annotations

import glob
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import RunFolderError
from utils.run_folder import CONFIG, FAILED, is_finished, read_failure, read_json, read_log, read_summary, record_value

from .paths import shown

# Report methods. centralized_matched is the centralized entry point with --central_steps K > 1
# (K = FedAvg's --epochs: an epoch then takes as many gradient steps as a FedAvg round).
METHODS = ("fedavg", "centralized", "centralized_matched")
ENTRY_POINTS = {"fedavg": "fedavg", "centralized": "centralized", "centralized_matched": "centralized"}
METHOD_LABELS = {"fedavg": "FedAvg", "centralized": "Centralized",
                 "centralized_matched": "Centralized, compute-matched"}


def method_label(config: dict) -> str | None:
    """The report method of a run's config.json (folders older than --central_steps count as 1 step)."""
    method = config.get("method")
    if method == "centralized" and int(config.get("central_steps") or 1) > 1:
        return "centralized_matched"
    return method


def _norm(v):
    return sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v


@dataclass
class Run:
    path: Path
    status: str                      # finished | interrupted | failed | empty
    config: dict = field(default_factory=dict)
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)   # one record per evaluation
    losses: list[dict] = field(default_factory=list)    # one record per round
    failure: dict | None = None      # failed.json of a run that diverged (status "failed")

    @property
    def method(self) -> str | None:
        return method_label(self.config)

    @property
    def seed(self) -> int | None:
        s = self.config.get("seed")
        return int(s) if s is not None else None

    @property
    def last_round(self) -> int:
        rounds = [r["round"] for r in self.losses] or [r["round"] for r in self.metrics] or [0]
        return int(max(rounds))

    def value(self, key: str):
        return (self.summary or {}).get(key)

    def baseline(self, kind: str, key: str = "eval_alignment_score") -> float | None:
        """A no-model predictor's score on this run's own targets (training/reference.py)."""
        return ((self.value("baselines") or {}).get(kind) or {}).get(key)

    def last_logged(self, key: str):
        """The value in the last losses.jsonl row that has it (the ε variants are logged per round)."""
        return next((r[key] for r in reversed(self.losses) if r.get(key) is not None), None)

    def final_group(self, prefix: str, key: str) -> float | None:
        """worst_alignment | alignment_gap | bottom_quarter_alignment at the last evaluation with group
        scores, computed from the scores (record_value) so that folders older than those keys report too."""
        for rec in reversed(self.metrics):
            if rec.get(f"{prefix}_group_scores"):
                return record_value(rec, f"{prefix}_{key}")
        return None


def partial_label(done: int, seeds: int) -> str | None:
    """The label of a report over part of its plan: '2 of 4 seeds finished; partial'."""
    return None if done == seeds else f"{done} of {seeds} seeds finished; partial"


def partial_note(label: str | None) -> str:
    return (f"**{label[0].upper() + label[1:]}**: the numbers below cover the finished runs only and change as "
            "the others finish. ") if label else ""


def prefer_done(folders: list[Path], records: list[Path]) -> list[Path]:
    """One source per run name: a finished or diverged run folder, else its record, else the
    (interrupted) folder; in name order."""
    chosen = {p.name: p for p in records}
    for p in folders:
        if p.name not in chosen or is_finished(p) or (p / FAILED).is_file():
            chosen[p.name] = p
    return [chosen[name] for name in sorted(chosen)]


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / CONFIG).is_file():
        return Run(path, "empty")
    config = read_json(path / CONFIG)
    if config.get("method") not in ENTRY_POINTS.values():
        raise RunFolderError(f"{path}/config.json has method {config.get('method')!r}",
                             "expected fedavg or centralized: is this a PluralLLM run folder?")
    summary = read_summary(path)
    failure = read_failure(path) if summary is None else None
    status = "finished" if summary is not None else "failed" if failure is not None else "interrupted"
    return Run(path, status, config, summary, read_log(path, "metrics"), read_log(path, "losses"), failure)


def find_run_folders(patterns: list[str]) -> list[Path]:
    """Folders matched by the globs that hold a config.json; a root folder yields its run subfolders."""
    found: dict[Path, None] = {}  # in order, once each
    for pat in patterns:
        for p in map(Path, sorted(glob.glob(pat)) or ([pat] if Path(pat).exists() else [])):
            if p.is_dir():
                found.update(dict.fromkeys([p] if (p / CONFIG).is_file() else
                                           [c for c in sorted(p.iterdir()) if c.is_dir() and (c / CONFIG).is_file()]))
    return list(found)


@dataclass
class RunSet:
    """Runs by method and seed, plus what is missing or unusable, counted."""

    by_method: dict[str, dict[int, Run]]
    interrupted: list[Run]
    duplicates: list[Path]
    seeds: list[int]                  # the seeds expected (requested, or found)
    warnings: list[str]
    methods: tuple[str, ...] = METHODS  # the methods reported (requested, or found), in METHODS order
    failed: list[Run] = field(default_factory=list)  # diverged (failed.json): named in the notes, never counted

    def finished(self, method: str) -> dict[int, Run]:
        return self.by_method.get(method, {})

    def missing(self, method: str) -> list[int]:
        have = set(self.finished(method)) | {r.seed for r in self.interrupted if r.method == method}
        return [s for s in self.seeds if s not in have]

    def paired_seeds(self, a: str = "fedavg", b: str = "centralized") -> list[int]:
        return sorted(set(self.finished(a)) & set(self.finished(b)))

    def counts(self) -> dict[str, dict[str, int]]:
        return {m: {"expected": len(self.seeds), "finished": len(self.finished(m)),
                    "interrupted": sum(1 for r in self.interrupted if r.method == m),
                    "missing": len(self.missing(m))} for m in self.methods}

    def all_finished(self) -> list[Run]:
        return [r for m in self.methods for _, r in sorted(self.finished(m).items())]

    def partial_label(self) -> str | None:
        """'2 of 4 seeds finished; partial' while some seed lacks a finished run of some method."""
        done = [s for s in self.seeds if all(s in self.finished(m) for m in self.methods)]
        return partial_label(len(done), len(self.seeds))


# Settings that must agree between all folders of one report (else it compares apples and pears).
CONSISTENCY_KEYS = ("dataset", "train_groups", "eval_groups", "metric", "eval_num_qs", "eval_seed",
                    "d_model", "num_layers", "data_split", "max_ctx_num_qs", "min_ctx_num_qs",
                    "max_tar_num_qs", "min_tar_num_qs", "lr", "num_steps")


def collect(paths: list[Path], seeds: list[int] | None = None, methods: list[str] | None = None) -> RunSet:
    """methods: those to report (one without any folder is reported missing); default: those found."""
    runs = [load_run(p) for p in paths]
    by_method: dict[str, dict[int, Run]] = {m: {} for m in METHODS}
    interrupted, duplicates, notes, failed = [], [], [], []
    for r in runs:
        if r.status == "empty":
            continue
        if r.status == "interrupted":
            interrupted.append(r)
            continue
        if r.status == "failed":  # a rerun would diverge again: reported, never resumed or counted
            failed.append(r)
            notes.append(f"{shown(r.path)}: failed ({r.failure.get('reason')}); not in the statistics")
            continue
        slot = by_method[r.method]
        if r.seed in slot:
            duplicates.append(r.path)
            notes.append(f"{shown(r.path)}: a second finished {r.method} run of seed {r.seed} "
                         f"(kept {shown(slot[r.seed].path)}); ignored")
            continue
        slot[r.seed] = r
    finished = [r for m in METHODS for r in by_method[m].values()]
    for key in CONSISTENCY_KEYS:
        values = {json.dumps(_norm(r.config.get(key)), sort_keys=True) for r in finished}
        if len(values) > 1:
            notes.append(f"runs disagree on {key}: {sorted(values)}")
    hashes = {(r.config.get("data") or {}).get("source_hash") for r in finished}
    if len(hashes) > 1:
        notes.append(f"runs were trained on different data files (source hashes {sorted(map(str, hashes))})")
    for m in METHODS:
        lengths = {r.last_round for r in by_method[m].values()}
        if len(lengths) > 1:
            notes.append(f"{m} runs have different lengths {sorted(lengths)}: curves are cut to the shortest")
    if seeds is None:
        seeds = sorted({r.seed for r in runs if r.seed is not None})
    present = {r.method for r in runs if r.status != "empty"}
    chosen = tuple(m for m in METHODS if (m in methods if methods is not None else m in present))
    return RunSet(by_method, interrupted, duplicates, list(seeds), notes, chosen, failed)


def run_commands(runs: list[Run]) -> list[str]:
    """The command lines that produced the runs (from each config's recorded argv), unique, in order."""
    seen: dict[str, None] = {}
    for r in runs:
        argv = (r.config.get("environment") or {}).get("argv")
        # a worker of reproduce.py / sweep.py --jobs (reporting/jobs.py) is nobody's command line
        if argv and not str(argv[0]).endswith("reporting/jobs.py"):
            seen["python " + " ".join(shlex.quote(a) for a in argv)] = None
    return list(seen)

