"""scripts/sweep.py: FedAvg variants over seeds through main_fl.py's entry point, then reported (compare.py)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_loaders.datasets import prepare_experiment
from data_loaders.schema import DataError
from orchestration import records
from orchestration.cli import build_parser as build_fedavg_parser
from orchestration.config import run_config
from orchestration.entry import main as train
from orchestration.experiment import check_flags, resolved_config
from utils.device import resolve_device
from utils.errors import exit_on_error
from utils.run_lock import RunLock

from .batch import (
    Batch,
    Planned,
    RecordState,
    add_batch_arguments,
    plan_action,
    record_state,
    records_root,
    resolve_batch_args,
    status_report,
)
from .compare import load_variant, write_comparison
from .jobs import Task
from .paths import default_data_path
from .prose import presets, template
from .runs import partial_label


@dataclass
class Preset:
    """A sweep (reporting/presets.json): main_fl.py's flags, the variants (name -> extra flags), the baseline."""
    base: list[str]
    variants: dict[str, list[str]]
    baseline: str
    title: str
    report: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    setup: list[str] = field(default_factory=list)  # the report's "Setup" section (Markdown lines)


def _preset(name: str, p: dict) -> Preset:
    return Preset([*presets("sweep")["common"], *p.get("flags", [])], p["variants"], p["baseline"], p["title"],
                  p["report"], p.get("seeds", [0, 1, 2]), template(f"sweep_{name}_setup.md").splitlines())


PRESETS = {name: _preset(name, p) for name, p in presets("sweep")["presets"].items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train FedAvg variants over seeds and compare them with a baseline.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="which sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's, 0 1 2)")
    p.add_argument("--variants", nargs="+", default=None, help="train only these variants (default: all)")
    p.add_argument("--out_root", default=None, help="run folders (default runs/sweeps/<preset>)")
    p.add_argument("--report", default=None, help="the report's path (default: the preset's, under docs/results)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing; report from the run folders and their records")
    p.add_argument("--extra", default="", help="more main_fl.py flags for every run, e.g. '--data_path DIR'")
    add_batch_arguments(p)
    return p


class Planner:
    """The sweep's runs against their folders and records; data loaded once per data setting."""

    def __init__(self):
        self._data = {}

    def parsed(self, run: Planned) -> argparse.Namespace:
        return build_fedavg_parser("fedavg").parse_args([*run.argv, "--out_dir", str(run.folder)])

    def data(self, args: argparse.Namespace):
        data = run_config(args).data  # all that prepare_experiment's result depends on
        if data not in self._data:
            self._data[data] = prepare_experiment(data)
        return self._data[data]

    def state(self, run: Planned) -> RecordState:
        if run.record is None or not (run.record / "config.json").is_file():
            return RecordState(run.record, "missing")
        args = self.parsed(run)
        run_cfg = check_flags(args)
        requested = resolved_config(run_cfg, self.data(args), resolve_device(run_cfg.federation.device))
        return record_state(run.record, requested)

    def replay(self, run: Planned):
        args = self.parsed(run)
        return "fedavg", args, self.data(args)




def _argv(p: Planned) -> list[str]:
    return [*p.argv, "--out_dir", str(p.folder), *(["--resume"] if p.resumes else [])]


def make_batch(args) -> Batch:
    return Batch(args, lambda p: train("fedavg", _argv(p)),
                 lambda p, threads: Task(p.folder.name, "orchestration.entry:main", ("fedavg", _argv(p)), threads),
                 diverged_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return exit_on_error(lambda: _sweep(args, argv), interrupts=True,
                         resume_hint="rerun the same command to continue (finished runs are reused)")


def _sweep(args, argv: list[str]) -> int | None:
    preset = PRESETS[args.preset]
    seeds = args.seeds or preset.seeds
    names = args.variants or list(preset.variants)
    unknown = sorted(set(names) - set(preset.variants))
    out_root = Path(args.out_root or Path("runs") / "sweeps" / args.preset)
    if unknown:
        raise DataError(f"--variants {unknown} not in preset {args.preset}",
                        f"choose from {', '.join(preset.variants)}")
    resolve_batch_args(args)
    root = records_root(out_root, args.records_dir)
    if not args.report_only:
        extra = shlex.split(args.extra)
        if "--data_path" not in extra and default_data_path("opinionqa"):
            extra = ["--data_path", default_data_path("opinionqa"), *extra]
        runs = [Planned(name, seed, out_root / f"{name}_s{seed}", root / f"{name}_s{seed}" if root else None, "fresh",
                        [*preset.base, *preset.variants[name], *extra, "--seed", str(seed)])
                for seed in seeds for name in names]  # seed-major: a stopped sweep leaves whole seeds to compare
        planner = Planner()
        if args.status:
            status_report([(r.folder.name, planner.state(r)) for r in runs])
            return 0
        if args.commit_records:
            records.check_commit_target(args.records_dir)
        with RunLock(out_root, "sweep folder", "--out_root"):
            t0 = time.perf_counter()
            for r in runs:
                r.action = plan_action(r.folder, lambda: planner.state(r))
            batch = make_batch(args)
            batch.verify(runs, planner.replay)  # before anything trains: a stale record stops here
            batch.run(runs)
            print(f"trained in {time.perf_counter() - t0:.1f} s")
    _report(args, argv, preset, out_root, root, names, seeds)


def _report(args, argv, preset: Preset, out_root: Path, root: Path | None, names: list[str], seeds: list[int]):
    def globs(name: str) -> tuple[list[str], list[str]]:
        return [str(out_root / f"{name}_s*")], [str(root / f"{name}_s*")] if root else []

    def present(name: str) -> bool:
        return any(any(Path(d).glob(f"{name}_s*/{f}")) for d in (out_root, root) if d
                   for f in ("summary.json", "failed.json"))

    base = load_variant(preset.baseline, *globs(preset.baseline))
    others = [load_variant(n, *globs(n)) for n in preset.variants if n != preset.baseline and present(n)]
    wanted = names if preset.baseline in names else [preset.baseline, *names]
    by_name = {v.name: v for v in [base, *others]}  # a seed is done when every wanted variant finished or diverged
    done = [s for s in seeds if all(n in by_name and (s in by_name[n].runs or s in by_name[n].failed) for n in wanted)]
    command = ["python", "scripts/sweep.py", *argv]
    for k, path in write_comparison(base, others, Path(args.report or preset.report), preset.title, command,
                                    preset.setup, partial=partial_label(len(done), len(seeds))).items():
        print(f"wrote {k}: {path}")
