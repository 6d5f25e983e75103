"""Two variants of FedAvg training timed round after round in one process (an A/B test).

Two separate benchmark runs on a shared machine can differ by more than the effect measured; here the
two trainers' rounds alternate (A, B, A, B, ...) on the same episodes, so slow phases of the machine
hit both alike. Prints JSON; commands in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

from benchmarks.bench import SCALES, cli_argv, emit, timed
from orchestration.cli import build_parser
from orchestration.experiment import check_flags, load_data, make_trainer
from utils.device import resolve_device


def trainer(point: dict, flags: str):
    run = check_flags(build_parser("fedavg").parse_args(cli_argv({**point, "cli_args": flags})))
    return make_trainer(run, load_data(run, log=lambda *_: None), resolve_device(run.federation.device))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="paper", choices=sorted(SCALES))
    p.add_argument("--a", required=True, help="main_fl.py flags of variant A")
    p.add_argument("--b", required=True, help="main_fl.py flags of variant B")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds of each (after one warm-up each)")
    p.add_argument("--device", default="cpu")
    opts = p.parse_args(argv)
    point = {**dataclasses.asdict(SCALES[opts.scale]), "clients": SCALES[opts.scale].clients[0], "device": opts.device}
    trainers = {"a": trainer(point, opts.a), "b": trainer(point, opts.b)}
    device = resolve_device(opts.device)
    for tr in trainers.values():
        tr.train_round(1)
    secs: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(2, opts.rounds + 2):
        for side, tr in trainers.items():
            secs[side].append(timed(lambda: tr.train_round(r), device)[1])
    out = {"scale": opts.scale, "a": opts.a, "b": opts.b, "rounds": opts.rounds,
           **{f"{side}_engine": tr.client_engine for side, tr in trainers.items()},
           **{f"{side}_round_s": statistics.mean(v) for side, v in secs.items()},
           "samples_s": secs, "b_over_a": statistics.mean(secs["b"]) / statistics.mean(secs["a"])}
    emit(out, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
