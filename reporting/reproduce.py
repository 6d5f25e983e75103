"""scripts/reproduce.py: train every (method, seed) of the paper's protocol, then report.

  <out_root>/<method>_s<seed>/    one standard run folder each, for the methods of --methods:
      fedavg                      main_fl.py
      centralized                 main_centralized.py, one step per training group per epoch (paper)
      centralized_matched         main_centralized.py with --central_steps = FedAvg's --epochs
  <out_root>/reproduce.json       the command(s), split rule, timings (paths relative to the repository)

Training goes through reporting/batch.py (reuse, resume, run records, --jobs). The group split
is drawn once (from --split_seed) and passed to every run as explicit lists, so seeds vary only
the training (initial weights, episodes, client sampling).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
    plan_action,
    record_state,
    records_root,
    resolve_batch_args,
    status_report,
)
from .jobs import Task
from .paths import default_data_path, shown_argv
from .predictions import prediction_data
from .report import MANIFEST, write_report
from .runs import ENTRY_POINTS, METHODS, collect, find_run_folders, method_label, prefer_done

FORBIDDEN = {"--seed": "--seeds", "--out_dir": "--out_root", "--resume": "nothing (resuming is automatic)",
             "--also_centralized": "--methods",
             "--central_steps": "--methods ... centralized_matched (its steps per group are --epochs; "
                                "centralized keeps the paper's 1)"}
DEFAULT_METHODS = ["fedavg", "centralized"]

# The paper's protocol (method.md §3-§7), every value written out so that a change of a parser
# default cannot move it: 1,300 FedAvg rounds (every client, 6 local steps, dataset-size
# weights) and 1,300 sequential centralized epochs, evaluation every 10, seeds 0-3, GPO's
# model and episode sizes. OpinionQA with MiniLM by default (the data at hand; the paper's
# Alpaca-7B embeddings are not), and the compute-matched baseline as a third method.
PAPER_PROTOCOL = dict(
    dataset="opinionqa", emb_model="minilm", seeds=[0, 1, 2, 3],
    methods=["fedavg", "centralized", "centralized_matched"],
    comm_round=1300, central_epochs=1300, central_mode="sequential", federated_eval=10, eval_freq=10,
    epochs=6, client_fraction=1.0, weighting="dataset_size", lr=3e-4, num_steps=100,
    min_ctx_num_qs=10, max_ctx_num_qs=100, min_tar_num_qs=10, max_tar_num_qs=100, episode_bounds="flags",
    data_split=0.9, eval_num_qs=20, eval_seed=0, eval_resample=False, metric="auto", split_seed=0,
    d_model=128, emb_depth=4, dim_feedforward=128, nhead=4, num_layers=6, dropout=0.0, bound_std=False,
    layer_init="independent", loss_reduction="sum", grad_clip=0.0,
    wandb="off", quiet=True,
)

# A few rounds of every method on the real GlobalOpinionQA sample with MiniLM embeddings and
# a small model: the whole pipeline (train, reuse, report, figures) in about two minutes.
PRESETS = {
    "smoke": dict(dataset="globalqa", seeds=[0, 1], comm_round=4, central_epochs=4, federated_eval=2,
                  eval_freq=2, epochs=2, emb_model="minilm", wandb="off", quiet=True, d_model=32,
                  dim_feedforward=32, num_layers=2, min_ctx_num_qs=3, max_ctx_num_qs=15, min_tar_num_qs=3,
                  max_tar_num_qs=15, eval_num_qs=5, name="smoke",
                  methods=["fedavg", "centralized", "centralized_matched"]),
    "paper": PAPER_PROTOCOL,
    "paper_unseen": PAPER_PROTOCOL,
}
# Flags a preset adds to the command line as if typed first (a flag given later overrides them):
# paper_unseen is the paper's protocol scored on questions no training group was trained on
# (--question_split, orchestration/cli.py; the evaluation issue).
PRESET_FLAGS = {"paper_unseen": ["--question_split", "0.2"]}
PAPER_PRESETS = ("paper", "paper_unseen")
PRESET_HELP = ("smoke: every method, 2 seeds, 4 rounds, small model, GlobalOpinionQA sample (about 2 minutes); "
               "paper: the paper's protocol (1,300 rounds and epochs, seeds 0-3, every method; --dataset "
               "opinionqa by default, or globalqa), outputs named <dataset>_paper; paper_unseen: the same with "
               "--question_split 0.2 (scored on held-out questions), outputs named <dataset>_paper_unseen")


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
    r.add_argument("--preset", choices=sorted(PRESETS), default=preset, help=PRESET_HELP)
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p


def _paper_name(args) -> str:
    """opinionqa_paper; globalqa_sample_paper for the shared sample CSV, else globalqa_paper."""
    sample = args.dataset == "globalqa" and "sample" in Path(str(args.data_path or "")).name
    return f"{args.dataset}{'_sample' if sample else ''}_paper"


def parse_args(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    known, _ = pre.parse_known_args(argv)
    for flag, instead in FORBIDDEN.items():
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise DataError(f"{flag} is not a flag of scripts/reproduce.py", f"use {instead}")
    args = build_reproduce_parser(known.preset).parse_args([*PRESET_FLAGS.get(known.preset, []), *argv])
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3]
    if len(set(args.seeds)) != len(args.seeds):
        raise DataError(f"--seeds {args.seeds} names a seed twice", "list each seed once")
    args.methods_given = args.methods is not None  # by the user or a preset
    methods = args.methods or DEFAULT_METHODS
    if len(set(methods)) != len(methods):
        raise DataError(f"--methods {' '.join(methods)} names a method twice", "list each method once")
    args.methods = [m for m in METHODS if m in methods]  # table and figure order
    if args.preset and args.data_path is None:  # as the user gave it: env var, or ../shared/data/...
        args.data_path = default_data_path(args.dataset)
    args.name_given = args.name is not None or args.preset in PAPER_PRESETS  # the preset names its outputs
    suffix = "_unseen" if args.preset == "paper_unseen" else ""
    args.name = args.name or (_paper_name(args) + suffix if args.preset in PAPER_PRESETS else args.dataset)
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
    if args.dataset == "synthetic":  # group names exist only once generated: split inside data loading
        f = args.group_split if args.group_split is not None else DEFAULT_GROUP_SPLIT
        return (f"seeded random {f:.0%}/{1 - f:.0%} split of the generated groups (data from --syn_seed "
                f"{args.syn_seed}) with --split_seed {args.split_seed}, the same for every seed")
    frac = args.group_split
    train, evals = choose_groups(args.dataset, args.train_groups, args.eval_groups, frac, args.split_seed)
    random_split = frac is not None or args.dataset == "opinionqa"
    args.train_groups, args.eval_groups, args.group_split = train, evals, None
    if random_split:
        f = frac if frac is not None else DEFAULT_GROUP_SPLIT
        return (f"seeded random {f:.0%}/{1 - f:.0%} split of the groups drawn once with split seed "
                f"{args.split_seed} (data_loaders.datasets.split_groups), passed to every run as explicit "
                "lists so that the seeds vary training only")
    return "the released code's fixed country lists (method.md §1), the same for every seed"


def episode_limits(args, counts: dict[str, int], train: list[str], evals: list[str]) -> str:
    """The largest episode bounds these groups allow, in flags (small data: the GlobalOpinionQA sample)."""
    local = min(int(counts[n] * args.data_split) for n in train)
    ev = min(counts[n] for n in evals)
    return (f"these groups allow --min_ctx_num_qs + --min_tar_num_qs <= {local} (the smallest training group's "
            f"local questions) and --eval_num_qs <= {ev - 1} (the smallest evaluation group has {ev}), e.g. "
            f"--min_ctx_num_qs {local // 2} --min_tar_num_qs {local - local // 2} --eval_num_qs {ev - 1}; the "
            "--max_* bounds may stay (an episode takes what a group has)")


def check_counts_with_limits(args, counts: dict[str, int], train: list[str], evals: list[str]) -> None:
    """check_question_counts, with the largest bounds the groups allow added to its hint."""
    try:
        check_question_counts(run_config(args), counts, train, evals)
    except DataError as e:
        what = str(e).split("\n  hint: ")[0]
        raise DataError(what, f"{e.hint}; or {episode_limits(args, counts, train, evals)}") from e


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


def _planned_runs(args, data_for_seed, device, log=print):
    """(method, seed, run folder, its record or None, the resolved config it would train with)."""
    root = records_root(args.out_root, args.records_dir, log)
    for seed in args.seeds:
        for method in args.methods:
            path = args.out_root / f"{method}_s{seed}"
            requested = resolved_config(run_config(seed_args(args, seed, path, False, method), ENTRY_POINTS[method]),
                                        data_for_seed(seed), device)
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
        more = f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""
        return f"{path} was trained with different flags (folder -> requested): {'; '.join(diffs[:8])}{more}"
    return None


def plan_runs(args, data_for_seed, device, log=print) -> list[Planned]:
    """Every (method, seed) against its folder and record; a folder trained with other flags is an error."""
    plan, errors = [], []
    for method, seed, path, record, requested in _planned_runs(args, data_for_seed, device, log):
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
    run_args, path = argparse.Namespace(**flags), Path(path)

    def train() -> None:
        run = run_config(run_args, ENTRY_POINTS[method])
        run_method(run, prepare_experiment(run.data, log=print), path)
    return exit_on_error(train, interrupts=True, stream=sys.stdout)  # stdout: the parent keeps the run's log


def make_batch(args, data_for_seed) -> Batch:
    def train(p: Planned) -> int:
        run_method(run_config(seed_args(args, p.seed, p.folder, p.resumes, p.kind), ENTRY_POINTS[p.kind]),
                   data_for_seed(p.seed), p.folder, log=print)
        return 0

    def task(p: Planned, threads: int) -> Task:
        flags = vars(seed_args(args, p.seed, p.folder, p.resumes, p.kind))
        return Task(p.folder.name, "reporting.reproduce:train_one", (p.kind, flags, str(p.folder)), threads)
    return Batch(args, train, task)


def _command(argv: list[str]) -> str:
    """The command as typed, absolute paths shown relative to the repository (the manifest travels)."""
    return "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in shown_argv(argv))


def update_manifest(out_root: Path, argv: list[str], args, split_rule: str, session: dict) -> None:
    """Insert or replace this invocation's entry (keyed by its start time) in <out_root>/reproduce.json."""
    path = out_root / MANIFEST
    manifest = {}
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
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
    c = runset.counts()
    for m, k in c.items():
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
    if getattr(args, "engine", "inprocess") != "inprocess":
        raise DataError(f"--engine {args.engine} is not supported by scripts/reproduce.py",
                        "train with the in-process engine here, or run main_fl.py --engine flower yourself "
                        "and report with --report_only --runs <folders>")
    resolve_batch_args(args)
    if args.report_only:
        report(args, argv, report_sources(args), _planned_seeds(args, argv),
               methods=args.methods if args.methods_given else None)
        return 0
    t0 = time.perf_counter()
    check_flags(args)
    RunLock(args.out_root, "reproduction folder", "--out_root").check_free()  # before minutes of loading
    split_rule = resolve_split(args)
    print(f"groups: {split_rule}")
    cache: dict = {}

    def data_for_seed(seed: int):
        # The data and the split do not depend on the seed (split fixed above, synthetic data
        # from --syn_seed), so it is loaded once for every method and seed.
        if not cache:
            cache["data"] = prepare_experiment(run_config(args).data, log=print, check=lambda counts, tr, ev:
                                               check_counts_with_limits(args, counts, tr, ev))
        return cache["data"]

    data_for_seed(args.seeds[0])  # data errors (e.g. groups too small for the episodes) before any file is written
    device = resolve_device(args.device)
    if args.status:
        status_report([(path.name, record_state(record, requested))
                       for _, _, path, record, requested in _planned_runs(args, data_for_seed, device)])
        return 0
    if args.commit_records:
        records.check_commit_target(args.records_dir)
    # One reproduce.py per --out_root; released also on an error or an interrupt: finished runs stay,
    # the interrupted one resumes.
    with RunLock(args.out_root, "reproduction folder", "--out_root"):
        plan = plan_runs(args, data_for_seed, device)
        batch = make_batch(args, data_for_seed)
        verified = batch.verify(plan, lambda p: (ENTRY_POINTS[p.kind], seed_args(args, p.seed, p.folder, False, p.kind),
                                                 data_for_seed(p.seed)))  # a stale record stops here
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
        report(args, argv, [p.source for p in plan], args.seeds, data=data_for_seed(args.seeds[0]),
               methods=args.methods)
    print(f"done in {time.perf_counter() - t0:.1f} s")


def _planned_seeds(args, argv: list[str]) -> list[int] | None:
    """The seeds a report expects: given (--seeds, or a preset's), else those found."""
    return args.seeds if args.preset or any(a == "--seeds" or a.startswith("--seeds=") for a in argv) else None


def report_sources(args) -> list[Path]:
    """--report_only: the --runs folders as given; else --out_root's run folders and their records
    (a finished or diverged folder first, else the record, else the interrupted folder)."""
    if args.runs:
        return find_run_folders(args.runs)
    root = records_root(args.out_root, args.records_dir)
    recorded = find_run_folders([str(root)]) if root is not None and root.is_dir() else []
    folders = find_run_folders([str(args.out_root)]) if args.out_root.is_dir() else []
    return prefer_done(folders, recorded)
