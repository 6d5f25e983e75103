"""scripts/reproduce.py: every (method, seed) into <out_root>/<method>_s<seed> through batch.py, then the report;
the group split is drawn once (--split_seed) and passed to every run, so seeds vary only the training."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from data_loaders.datasets import DEFAULT_GROUP_SPLIT, choose_groups, prepare_experiment
from data_loaders.schema import DataError
from orchestration import records
from orchestration.cli import build_parser
from orchestration.config import check_question_counts, run_config
from orchestration.experiment import check_flags, resolved_config, run_method
from orchestration.resume import differences
from utils.atomic_write import atomic_write_json
from utils.device import resolve_device
from utils.errors import RunFolderError, exit_on_error
from utils.run_lock import RunLock

from .batch import (
    Batch,
    Planned,
    add_batch_arguments,
    differences_text,
    plan_action,
    record_state,
    records_root,
    resolve_batch_args,
    status_report,
)
from .jobs import Task
from .paths import default_data_path, shown_command
from .predictions import prediction_data
from .prose import presets, snippets
from .report import MANIFEST, write_report
from .runs import ENTRY_POINTS, METHODS, collect, find_run_folders, method_label, prefer_done

FORBIDDEN = {"--seed": "--seeds", "--out_dir": "--out_root", "--resume": "nothing (resuming is automatic)",
             "--also_centralized": "--methods",
             "--central_steps": "--methods ... centralized_matched (its steps per group are --epochs; "
                                "centralized keeps the paper's 1)"}
PRESETS = presets("reproduce")
PAPER_PRESETS = ("paper", "paper_unseen")


def build_reproduce_parser(preset: str | None = None) -> argparse.ArgumentParser:
    p = build_parser("fedavg")
    p.description = ("Train FedAvg and the centralized baseline for every seed (one run folder each; finished "
                     "runs reused, interrupted ones resumed), then write the paper's table, figures and a "
                     "report from the run folders. Every training flag of main_fl.py passes through.")
    r = p.add_argument_group("reproduce")
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default 0 1 2 3)")
    r.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="methods to train and report (default fedavg centralized; presets: all three). "
                        "centralized_matched = centralized with --central_steps = --epochs")
    r.add_argument("--out_root", default=None, help="folder of the run folders (default runs/reproduce/<name>)")
    r.add_argument("--results_dir", default=None,
                   help="where the report, tables and figures go (default docs/results; smoke: <out_root>/results)")
    r.add_argument("--name", default=None, help="file stem of the outputs (default: the dataset)")
    add_batch_arguments(r)
    r.add_argument("--report_only", action="store_true",
                   help="train nothing: report from existing run folders (--runs, else --out_root's folders and "
                        "their records)")
    r.add_argument("--runs", nargs="+", default=None,
                   help="with --report_only: run folders or globs (a root folder means its run subfolders)")
    r.add_argument("--fig3_groups", nargs=2, default=None, metavar=("GROUP_A", "GROUP_B"),
                   help="the two evaluation groups of Fig. 3 (default: the most different pair)")
    r.add_argument("--fig3_qkey", type=int, default=None, help="the question of Fig. 3 (default: chosen)")
    r.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                   help="; ".join(f"{name}: {p['help']}" for name, p in PRESETS.items()))
    if preset:
        p.set_defaults(**PRESETS[PRESETS[preset].get("defaults_of", preset)]["defaults"])
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    known, _ = pre.parse_known_args(argv)
    for flag, instead in FORBIDDEN.items():
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise DataError(f"{flag} is not a flag of scripts/reproduce.py", f"use {instead}")
    args = build_reproduce_parser(known.preset).parse_args([*PRESETS.get(known.preset, {}).get("flags", []), *argv])
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3]
    if len(set(args.seeds)) != len(args.seeds):
        raise DataError(f"--seeds {args.seeds} names a seed twice", "list each seed once")
    args.methods_given = args.methods is not None  # by the user or a preset
    methods = args.methods or ["fedavg", "centralized"]
    if len(set(methods)) != len(methods):
        raise DataError(f"--methods {' '.join(methods)} names a method twice", "list each method once")
    args.methods = [m for m in METHODS if m in methods]  # table and figure order
    if args.preset and args.data_path is None:  # as the user gave it: env var, or ../shared/data/...
        args.data_path = default_data_path(args.dataset)
    args.name_given = args.name is not None or args.preset in PAPER_PRESETS  # the preset names its outputs
    # opinionqa_paper, globalqa_sample_paper for the shared sample CSV, else globalqa_paper; _unseen added
    sample = "_sample" if args.dataset == "globalqa" and "sample" in Path(str(args.data_path or "")).name else ""
    suffix = "_unseen" if args.preset == "paper_unseen" else ""
    args.name = args.name or (f"{args.dataset}{sample}_paper{suffix}" if args.preset in PAPER_PRESETS else args.dataset)
    args.out_root = Path(args.out_root or Path("runs") / "reproduce" / args.name)
    if args.results_dir is None:
        args.results_dir = args.out_root / "results" if args.preset == "smoke" else Path("docs") / "results"
    args.results_dir = Path(args.results_dir)
    return args


# ----------------------------------------------------------------------------------------
# group split


def resolve_split(args) -> str:
    """Fix the train/eval groups once, in args, and return the rule in words."""
    if args.train_groups and args.eval_groups and args.group_split is None:
        return "named with --train_groups / --eval_groups"
    if args.split_seed is None:  # main_fl.py would split by --seed; here the split must not move with it
        args.split_seed = 0
    f = args.group_split if args.group_split is not None else DEFAULT_GROUP_SPLIT
    if args.dataset == "synthetic":  # group names exist only once generated: split inside data loading
        return snippets()["split_synthetic"].format(f=f, rest=1 - f, a=args)
    random_split = args.group_split is not None or args.dataset == "opinionqa"
    args.train_groups, args.eval_groups = choose_groups(args.dataset, args.train_groups, args.eval_groups,
                                                        args.group_split, args.split_seed)
    args.group_split = None
    return snippets()["split_random" if random_split else "split_fixed"].format(f=f, rest=1 - f, a=args)


def check_counts_with_limits(args, counts: dict[str, int], train: list[str], evals: list[str]) -> None:
    """check_question_counts, with the largest episode bounds these groups allow added to its hint (small
    data: the GlobalOpinionQA sample)."""
    try:
        check_question_counts(run_config(args), counts, train, evals)
    except DataError as e:
        local, ev = min(int(counts[n] * args.data_split) for n in train), min(counts[n] for n in evals)
        raise DataError(str(e).split("\n  hint: ")[0], (
            f"{e.hint}; or these groups allow --min_ctx_num_qs + --min_tar_num_qs <= {local} (the smallest training "
            f"group's local questions) and --eval_num_qs <= {ev - 1} (the smallest evaluation group has {ev}), e.g. "
            f"--min_ctx_num_qs {local // 2} --min_tar_num_qs {local - local // 2} --eval_num_qs {ev - 1}; the "
            "--max_* bounds may stay (an episode takes what a group has)")) from e


_FLAGS = {m: frozenset(vars(build_parser(m).parse_args([]))) for m in set(ENTRY_POINTS.values())}


def seed_args(args, seed: int, out_dir: Path, resume: bool, method: str) -> argparse.Namespace:
    """The flags of one run exactly as main_fl.py / main_centralized.py would have parsed them (none of
    this script's own, none of FedAvg's for a centralized run), so that its config.json and the run
    identity that decides reuse are those of a run started by hand."""
    entry = ENTRY_POINTS[method]
    a = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in _FLAGS[entry]})
    a.seed, a.out_dir, a.resume = seed, str(out_dir), resume
    if entry == "fedavg":
        a.also_centralized = False
    else:  # centralized takes one step per group per epoch (the paper); centralized_matched FedAvg's --epochs
        a.central_steps = args.epochs if method == "centralized_matched" else 1
    return a


def _planned_runs(args, data, device, log=print):
    """(method, seed, run folder, its record or None, the resolved config it would train with)."""
    root = records_root(args.out_root, args.records_dir, log)
    for seed in args.seeds:
        for method in args.methods:
            path = args.out_root / f"{method}_s{seed}"
            requested = resolved_config(run_config(seed_args(args, seed, path, False, method), ENTRY_POINTS[method]),
                                        data, device)
            yield method, seed, path, (root / path.name if root else None), requested


def folder_error(path: Path, method: str, requested: dict) -> str | None:
    """Why an existing run folder cannot serve this (method, seed): another method, other flags, unreadable."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if path.is_dir() and any(f.name != ".lock" for f in path.iterdir()):
            return f"{path} exists and is not empty but holds no config.json"
        return None
    try:
        stored = json.loads(cfg_path.read_text())
    except ValueError as e:
        return f"{cfg_path} is unreadable ({e})"
    if method_label(stored) != method:
        return f"{path} holds a {method_label(stored)!r} run, not {method!r}"
    diffs = differences(stored, requested)  # the training code's own run identity (as --resume)
    if diffs:
        return f"{path} was trained with different flags (folder -> requested): {differences_text(diffs, 8)}"
    return None


def plan_runs(args, data, device, log=print) -> list[Planned]:
    """Every (method, seed) against its folder and record; a folder trained with other flags is an error."""
    plan, errors = [], []
    for method, seed, path, record, requested in _planned_runs(args, data, device, log):
        error = folder_error(path, method, requested)
        if error:
            errors.append(error)
        else:
            action = plan_action(path, lambda: record_state(record, requested), log)
            plan.append(Planned(method, seed, path, record, action))
    if errors:
        raise RunFolderError("cannot use these run folders:\n  - " + "\n  - ".join(errors),
                             "pass the flags those runs used, choose another --out_root, or delete the folders "
                             "named above to retrain them with these flags")
    return plan


def train_one(method: str, flags: dict, path: str) -> int:
    """One run in its own process (--jobs): the data loaded again, then trained; the exit code."""
    def train() -> None:
        run = run_config(argparse.Namespace(**flags), ENTRY_POINTS[method])
        run_method(run, prepare_experiment(run.data, log=print), Path(path))
    return exit_on_error(train, interrupts=True, stream=sys.stdout)  # stdout: the parent keeps the run's log


def make_batch(args, data) -> Batch:
    def train(p: Planned) -> int:
        run_method(run_config(seed_args(args, p.seed, p.folder, p.resumes, p.kind), ENTRY_POINTS[p.kind]),
                   data, p.folder, log=print)
        return 0

    def task(p: Planned, threads: int) -> Task:
        flags = vars(seed_args(args, p.seed, p.folder, p.resumes, p.kind))
        return Task(p.folder.name, "reporting.reproduce:train_one", (p.kind, flags, str(p.folder)), threads)
    return Batch(args, train, task)


def _command(argv: list[str]) -> str:
    """The command as typed, absolute paths shown relative to the repository (the manifest travels)."""
    return "python scripts/reproduce.py " + shown_command(argv)


def update_manifest(out_root: Path, argv: list[str], args, split_rule: str, session: dict) -> None:
    """Insert or replace this invocation's entry (keyed by its start time) in <out_root>/reproduce.json."""
    path = out_root / MANIFEST
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        manifest = {}
    sessions = [s for s in manifest.get("sessions", []) if s.get("started") != session["started"]] + [session]
    working = [s for s in sessions if s.get("trained") or s.get("resumed")]
    manifest.update(command=_command(argv), split_rule=split_rule, threads=args.threads or torch.get_num_threads(),
                    jobs=args.jobs, seeds=args.seeds, methods=args.methods, sessions=sessions,
                    wall_time_s=round(sum(s["wall_time_s"] for s in working), 1) if working else None)
    out_root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


# ----------------------------------------------------------------------------------------


def report(args, argv: list[str], paths: list[Path], seeds: list[int] | None, data=None, log=print,
           methods: list[str] | None = None) -> dict:
    runset = collect(paths, seeds, methods)
    for m, k in runset.counts().items():
        log(f"{m}: {k['finished']} finished, {k['interrupted']} interrupted, {k['missing']} missing "
            f"(of {k['expected']} seeds)")
    for w in runset.warnings:
        log(f"warning: {w}")
    if not runset.all_finished():
        raise RunFolderError("no finished run folder or record to report on",
                             "train first, or point --runs at run folders (runs/...) or records (results/...)")
    if runset.partial_label():
        log(f"report: {runset.partial_label()} (labelled so in its title and first line)")
    if args.report_only and not args.name_given:  # name the outputs after the runs, not the --dataset default
        args.name = runset.all_finished()[0].config.get("dataset") or args.name
    pred, pred_error = None, None
    try:
        pred = prediction_data(runset, data=data, data_path=args.data_path if args.report_only else None,
                               cache_dir=args.cache_dir, groups=args.fig3_groups, qkey=args.fig3_qkey, log=log)
    except Exception as e:  # noqa: BLE001 - Fig. 3 needs data files and checkpoints; the rest does not
        pred_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"fig. 3 skipped: {pred_error}")
    cmd = ["scripts/reproduce.py", *argv] if args.report_only else [
        "scripts/reproduce.py", "--report_only", "--runs", str(args.out_root), "--name", args.name,
        "--results_dir", str(args.results_dir)]
    out = write_report(runset, args.results_dir, args.name, pred=pred, pred_error=pred_error, report_command=cmd)
    for k, v in out.items():
        log(f"wrote {k}: {v}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file as it happens
    return exit_on_error(lambda: _main(argv), interrupts=True,
                         resume_hint="rerun the same command to continue (finished runs are reused)")


def _main(argv: list[str]) -> int | None:
    args = parse_args(argv)
    if args.engine != "inprocess":
        raise DataError(f"--engine {args.engine} is not supported by scripts/reproduce.py",
                        "train with the in-process engine here, or run main_fl.py --engine flower yourself "
                        "and report with --report_only --runs <folders>")
    resolve_batch_args(args)
    if args.report_only:
        # the seeds a report expects: given (--seeds, or a preset's), else those found
        given = args.preset or any(a == "--seeds" or a.startswith("--seeds=") for a in argv)
        report(args, argv, report_sources(args), args.seeds if given else None,
               methods=args.methods if args.methods_given else None)
        return 0
    t0 = time.perf_counter()
    check_flags(args)
    RunLock(args.out_root, "reproduction folder", "--out_root").check_free()  # before minutes of loading
    split_rule = resolve_split(args)
    print(f"groups: {split_rule}")
    # The data and the split do not depend on the seed (split fixed above, synthetic data from --syn_seed): loaded
    # once for every method and seed, and its errors (groups too small for the episodes) come before any file is written
    data = prepare_experiment(run_config(args).data, log=print,
                              check=lambda counts, tr, ev: check_counts_with_limits(args, counts, tr, ev))
    device = resolve_device(args.device)
    if args.status:
        status_report([(path.name, record_state(record, requested))
                       for _, _, path, record, requested in _planned_runs(args, data, device)])
        return 0
    if args.commit_records:
        records.check_commit_target(args.records_dir)
    # One reproduce.py per --out_root; released also on an error or an interrupt: finished runs stay,
    # the interrupted one resumes.
    with RunLock(args.out_root, "reproduction folder", "--out_root"):
        plan = plan_runs(args, data, device)
        batch = make_batch(args, data)
        verified = batch.verify(plan, lambda p: (ENTRY_POINTS[p.kind], seed_args(args, p.seed, p.folder, False, p.kind),
                                                 data))  # a stale record stops here
        actions = {a: sum(1 for p in plan if p.action == a) for a in ("fresh", "reuse", "record", "resume", "restart")}
        print("plan: " + ", ".join(f"{n} {a}" for a, n in actions.items() if n)
              + (f"; {args.jobs} runs at once, {args.threads} torch thread(s) each" if args.jobs > 1 else ""))
        started = time.strftime("%Y-%m-%dT%H:%M:%S")

        def save(done: dict, status: str) -> None:
            update_manifest(args.out_root, argv, args, split_rule,
                            {"started": started, "command": _command(argv), "status": status,
                             "wall_time_s": round(time.perf_counter() - t0, 1), "verified_records": verified, **done})

        save({}, "running")
        batch.on_progress = lambda done: save(done, "running")
        save(batch.run(plan), "finished")
        report(args, argv, [p.source for p in plan], args.seeds, data=data, methods=args.methods)
    print(f"done in {time.perf_counter() - t0:.1f} s")


def report_sources(args) -> list[Path]:
    """--report_only: the --runs folders as given; else --out_root's run folders and their records
    (a finished or diverged folder first, else the record, else the interrupted folder)."""
    if args.runs:
        return find_run_folders(args.runs)
    root = records_root(args.out_root, args.records_dir)
    recorded = find_run_folders([str(root)]) if root is not None and root.is_dir() else []
    folders = find_run_folders([str(args.out_root)]) if args.out_root.is_dir() else []
    return prefer_done(folders, recorded)
