"""Two variants of FedAvg training timed round after round in one process (an A/B test).

On a shared machine, two separate benchmark runs can differ by more than the effect being
measured. Here both trainers live in one process on the same synthetic data, and their
rounds alternate (A, B, A, B, ...), so slow phases of the machine hit both alike; each
round of A and B trains on the same episodes (same seeds). Prints JSON.

    python -m benchmarks.ab --scale paper --a "--precision fp32" --b "--precision bf16"
    python -m benchmarks.ab --scale paper --a "--client_engine loop" --b "--client_engine threads"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys

from benchmarks.bench import SCALES, cli_argv, timed
from data_loaders.datasets import prepare_experiment
from orchestration.cli import build_parser
from orchestration.experiment import check_flags
from orchestration.experiment import make_trainer as build
from utils.device import resolve_device


def make_trainer(point: dict, extra: str):
    args = build_parser("fedavg").parse_args(cli_argv(point) + shlex.split(extra))
    run = check_flags(args)
    return build(run, prepare_experiment(run.data, log=lambda *_: None), resolve_device(run.federation.device))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="paper", choices=sorted(SCALES))
    p.add_argument("--a", required=True, help="main_fl.py flags of variant A")
    p.add_argument("--b", required=True, help="main_fl.py flags of variant B")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds of each (after one warm-up each)")
    p.add_argument("--device", default="cpu")
    opts = p.parse_args(argv)
    point = {**dataclasses.asdict(SCALES[opts.scale]), "clients": SCALES[opts.scale].clients[0],
             "device": opts.device}
    trainers = {"a": make_trainer(point, opts.a), "b": make_trainer(point, opts.b)}
    device = resolve_device(opts.device)
    for tr in trainers.values():
        tr.train_round(1)
    secs: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(2, opts.rounds + 2):
        for side, tr in trainers.items():
            secs[side].append(timed(lambda: tr.train_round(r), device)[1])
    out = {"scale": opts.scale, "a": opts.a, "b": opts.b, "rounds": opts.rounds,
           **{f"{side}_engine": getattr(tr, "client_engine", None) for side, tr in trainers.items()},
           **{f"{side}_round_s": statistics.mean(v) for side, v in secs.items()},
           "samples_s": secs, "b_over_a": statistics.mean(secs["b"]) / statistics.mean(secs["a"])}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
