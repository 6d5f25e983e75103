"""Sweeps of FedAvg variants over seeds, reported against a baseline (scripts/sweep.py).

A preset names the shared flags, the variants (name -> extra flags), the baseline and the
report. Every (variant, seed) is one standard run folder trained through main_fl.py's own
entry point, so resuming, locking and refusing mismatched flags are the training code's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_loaders.schema import DataError
from utils.run_io import RunLock

from .compare import load_variant, write_comparison
from .paths import default_data_path
from .runs import RunFolderError

# OpinionQA, the default seeded 60/40 split, MiniLM: the setup of the strategy and privacy issues.
OPINIONQA = ["--dataset", "opinionqa", "--emb_model", "minilm", "--comm_round", "300", "--federated_eval", "10",
             "--wandb", "off", "--quiet"]


@dataclass
class Preset:
    base: list[str]
    variants: dict[str, list[str]]
    baseline: str
    title: str
    report: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    setup: list[str] = field(default_factory=list)  # the report's "Setup" section (Markdown lines)


PRESETS = {
    "strategies": Preset(
        base=OPINIONQA,
        variants={
            "fedavg": [],
            "fedprox": ["--strategy", "fedprox", "--proximal_mu", "0.01"],
            "qfedavg": ["--strategy", "qfedavg", "--qffl_q", "0.1"],
            "adaptive": ["--strategy", "adaptive", "--adaptive_temperature", "0.1", "--adaptive_window", "5"],
            "trimmed_mean": ["--strategy", "trimmed_mean", "--trim_fraction", "0.2"],
            "median": ["--strategy", "median"],
            "fedadam": ["--server_opt", "adam"],
            # one attack scenario: 1 of the 10 training groups sign-flips its update, scaled by 10
            "fedavg_attacked": ["--byzantine", "1", "--attack", "sign_flip", "--attack_scale", "10"],
            "trimmed_mean_attacked": ["--strategy", "trimmed_mean", "--trim_fraction", "0.2", "--byzantine", "1",
                                      "--attack", "sign_flip", "--attack_scale", "10"],
            "median_attacked": ["--strategy", "median", "--byzantine", "1", "--attack", "sign_flip",
                                "--attack_scale", "10"],
            # the in-range attack: 3 of the 10 groups send mu - z sigma of the honest updates, z = 0.52
            # (1 attacker of 10 would give z = 0 and send the honest mean; 2 give z = 0.25)
            **{f"{rule}_alie": [*flags, "--byzantine", "3", "--attack", "alie"] for rule, flags in (
                ("fedavg", []), ("trimmed_mean", ["--strategy", "trimmed_mean", "--trim_fraction", "0.2"]),
                ("median", ["--strategy", "median"]))},
            # metric poisoning: 1 group reports held-out alignment 0 to draw adaptive's (capped) weight
            "adaptive_report_score": ["--strategy", "adaptive", "--adaptive_temperature", "0.1", "--adaptive_window",
                                      "5", "--byzantine", "1", "--attack", "report_score", "--attack_report", "0"],
        },
        baseline="fedavg", title="Aggregation strategies on OpinionQA (300 rounds, 3 seeds)",
        report="docs/results/strategies.md",
        setup=["OpinionQA, the default seeded 60/40 split (10 training groups, all sampled every round, 7 "
               "evaluation groups), MiniLM embeddings, the paper's other defaults (6 local steps, lr 3e-4), 300 "
               "rounds, evaluation every 10, seeds 0-2. The split and the initial weights are drawn from the "
               "seed: every variant of a seed shares them, so differences are paired by seed.",
               "",
               "- fedprox: mu 0.01; qfedavg: FedAvg's weights tilted by F^0.1, F = each client's held-out "
               "misalignment 1 - AS (q-FFL's reweighting at FedAvg's step size, issue 22); adaptive: "
               "softmax((1 - AS)/0.1) over a 5-evaluation window; trimmed_mean: 20% cut at each end; median; "
               "fedadam: server Adam on the mean client delta (lr 1e-3, betas 0.9/0.99, tau 1e-3).",
               "- Attack: 1 of the 10 training groups (drawn from the seed) sends w - 10 (w_k - w) every round "
               "(sign flip scaled by 10); *_attacked variants. *_alie: 3 of the 10 groups send ALIE's w + mu - "
               "0.52 sigma of the honest updates (Baruch et al. 2019; 3 because 1 of 10 gives z = 0, a void "
               "attack). adaptive_report_score: 1 group trains honestly but reports held-out alignment 0; its "
               "weight is capped at 3/10. Formulas: README, Aggregation strategies."]),
    # DP needs uniform weights, so the no-DP baseline is uniform too. The clip S = 0.1 is about the
    # median client update norm over the first 30 rounds of this setup, which the cosine schedule
    # moves between 3e-4 and 0.8 (dp_median_norm in losses.jsonl of main_fl.py --dataset opinionqa
    # --emb_model minilm --weighting uniform --dp --dp_noise 0 --dp_clip 1000 --comm_round 30).
    "privacy": Preset(
        base=[*OPINIONQA, "--weighting", "uniform"],
        variants={
            "no_dp": [],
            "dp_z0.1": ["--dp", "--dp_clip", "0.1", "--dp_noise", "0.1"],
            "dp_z1": ["--dp", "--dp_clip", "0.1", "--dp_noise", "1"],
            "dp_z3": ["--dp", "--dp_clip", "0.1", "--dp_noise", "3"],
            # epsilon ~ 9 after 300 rounds (delta 1e-5): the one level a user might call private
            "dp_z10": ["--dp", "--dp_clip", "0.1", "--dp_noise", "10"],
        },
        baseline="no_dp", title="Client-level DP-FedAvg on OpinionQA (300 rounds, 3 seeds)",
        report="docs/results/privacy.md",
        setup=["OpinionQA, the default seeded 60/40 split (10 training groups, every one sampled every round, so "
               "the sampling rate is 1), MiniLM embeddings, 300 rounds, evaluation every 10, seeds 0-2, uniform "
               "weights for every variant (DP requires them, so the no-DP baseline uses them too). The split is "
               "drawn from the seed: each seed evaluates other groups, and every variant of a seed the same ones, "
               "so differences are paired by seed.",
               "",
               "- Mechanism: each client's update is clipped to L2 norm S = 0.1; the server adds N(0, (z S / 10)^2) "
               "per coordinate to the mean of the 10 clipped updates. epsilon: Opacus's RDP accountant, "
               "delta = 1e-5, with respect to one group's whole data, for zero-out neighbours (m = 10 is fixed "
               "and public: one group's update replaced by zero); losses.jsonl also holds replace-one "
               "(dp_epsilon_replace_one, noise z/2) and the exact composition's (dp_epsilon_exact, = PRV).",
               "- Clip norm: S = 0.1 is about the median client update norm over the first 30 rounds of a "
               "no-noise, no-clip run of this setup (dp_median_norm in its losses.jsonl), which the cosine "
               "schedule moves between 3e-4 and 0.8; so about half the updates are clipped (dp_clipped in each DP "
               "run's losses.jsonl counts them per round)."]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train FedAvg variants over seeds and compare them with a baseline.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="which sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's, 0 1 2)")
    p.add_argument("--variants", nargs="+", default=None, help="train only these variants (default: all)")
    p.add_argument("--out_root", default=None, help="run folders (default runs/sweeps/<preset>)")
    p.add_argument("--report", default=None, help="the report's path (default: the preset's, under docs/results)")
    p.add_argument("--report_only", action="store_true", help="train nothing; report from the run folders")
    p.add_argument("--extra", default="", help="more main_fl.py flags for every run, e.g. '--data_path DIR'")
    return p


def run_one(flags: list[str], folder: Path, log=print) -> None:
    from orchestration.experiment import main as train
    from orchestration.resume import failure
    if (folder / "summary.json").is_file():
        log(f"reuse   {folder}")
        return
    if (failed := failure(folder)) is not None:  # deterministic: a rerun would diverge the same way
        log(f"failed  {folder} (earlier: {failed.get('reason')}); not retried, reported as diverged")
        return
    resume = (folder / "config.json").is_file()
    log(f"{'resume' if resume else 'train '}  {folder}")
    code = train("fedavg", [*flags, "--out_dir", str(folder), *(["--resume"] if resume else [])])
    if code in (130, 143):
        raise KeyboardInterrupt
    if code == 2 and (failed := failure(folder)) is not None:
        # a noise level or strategy that makes training diverge is a result of the sweep, not its end
        log(f"failed  {folder}: {failed.get('reason')}; the sweep goes on, the report lists it as diverged")
        return
    if code != 0:
        raise DataError(f"the run in {folder} failed (exit {code}); its error is printed above",
                        "fix it and rerun the same sweep command: finished runs are reused")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    seeds = args.seeds or preset.seeds
    names = args.variants or list(preset.variants)
    unknown = sorted(set(names) - set(preset.variants))
    out_root = Path(args.out_root or Path("runs") / "sweeps" / args.preset)
    try:
        if unknown:
            raise DataError(f"--variants {unknown} not in preset {args.preset}",
                            f"choose from {', '.join(preset.variants)}")
        if not args.report_only:
            with RunLock(out_root, "sweep folder", "--out_root"):
                t0 = time.perf_counter()
                extra = shlex.split(args.extra)
                if "--data_path" not in extra and default_data_path("opinionqa"):
                    extra = ["--data_path", default_data_path("opinionqa"), *extra]
                for seed in seeds:  # seed-major: a stopped sweep leaves whole seeds to compare
                    for name in names:
                        flags = [*preset.base, *preset.variants[name], *extra, "--seed", str(seed)]
                        run_one(flags, out_root / f"{name}_s{seed}")
                print(f"trained in {time.perf_counter() - t0:.1f} s")
        base = load_variant(preset.baseline, [str(out_root / f"{preset.baseline}_s*")])
        others = [load_variant(n, [str(out_root / f"{n}_s*")]) for n in preset.variants
                  if n != preset.baseline and any(any(out_root.glob(f"{n}_s*/{f}"))
                                                  for f in ("summary.json", "failed.json"))]
        command = ["python", "scripts/sweep.py", *argv]
        for k, path in write_comparison(base, others, Path(args.report or preset.report), preset.title,
                                        command, preset.setup).items():
            print(f"wrote {k}: {path}")
    except (DataError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (finished runs are reused)", file=sys.stderr)
        return 130
    return 0
