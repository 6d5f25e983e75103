"""What a FedAvg round costs on each engine, on one small synthetic experiment.

In process, through Flower's simulation (thread and Ray backends; SecAgg+ on 3 training groups) and as
a deployment (SuperLink + 3 SuperNodes on 127.0.0.1), with the bytes a round moves (federated/comm.py).
Per-round figures are medians over the rounds after the first (Flower's warm-up). Every engine uses
--threads torch threads per process (default 1, as Flower's Ray workers): more threads than free cores
make OpenMP spin and drown the overhead measured. Prints JSON; commands in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench import emit, machine_info, timed
from benchmarks.table import RESULTS_DIR
from data_loaders.datasets import prepare_experiment
from flower_app.loopback import LoopbackFederation
from orchestration.cli import build_parser
from orchestration.config import run_config
from orchestration.experiment import make_trainer

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("inprocess", "simulation", "simulation_ray", "deployment", "simulation_secagg")
GROUPS = ["g00", "g01", "g02"]
CPU = torch.device("cpu")


def flags(train_groups: str = "g00,g01") -> list[str]:
    """The experiment's main_fl.py flags; g02 evaluates (SecAgg+ needs a third training group, g03)."""
    return ["--dataset", "synthetic", "--syn_groups", str(len(train_groups.split(",")) + 1), "--syn_questions",
            "100", "--syn_dim", "64", "--train_groups", train_groups, "--eval_groups", "g02", "--d_model", "32",
            "--dim_feedforward", "32", "--num_layers", "2", "--min_ctx_num_qs", "5", "--max_ctx_num_qs", "20",
            "--min_tar_num_qs", "5", "--max_tar_num_qs", "20", "--eval_num_qs", "10", "--epochs", "6",
            "--wandb", "off", "--quiet", "--device", "cpu"]


FLAGS = flags()


def comm(rows: list[dict]) -> dict:
    """Median bytes per round (down, up, and per sampled client) from the rounds' comm counts."""
    down = [r["comm_bytes_down"] for r in rows]
    up = [r["comm_bytes_up"] for r in rows]
    clients = [len(r["train_loss_per_client"]) for r in rows]
    return {"bytes_down_per_round": statistics.median(down), "bytes_up_per_round": statistics.median(up),
            "bytes_per_client_per_round": statistics.median((d + u) / c for d, u, c in zip(down, up, clients))}


def summarise(round_s: list[float], eval_s: list[float], **extra) -> dict:
    later = round_s[1:] or round_s
    return {"round_s": [round(x, 4) for x in round_s], "first_round_s": round(round_s[0], 4),
            "median_round_s": round(statistics.median(later), 4), "eval_s": [round(x, 4) for x in eval_s],
            "median_eval_s": round(statistics.median(eval_s), 4), **extra}


def run_inprocess(rounds: int) -> dict:
    """FedAvgTrainer.train_round and .evaluate called directly: no messages at all."""
    run = run_config(build_parser("fedavg").parse_args([*FLAGS, "--comm_round", str(rounds)]))
    run = replace(run, client=replace(run.client, metric="jsd"))
    trainer = make_trainer(run, prepare_experiment(run.data, log=lambda *a: None), "cpu")
    first_eval = timed(lambda: trainer.evaluate(0), CPU)[1]
    fits = [timed(lambda r=r: trainer.train_round(r), CPU) for r in range(1, rounds + 1)]
    eval_s = [first_eval, timed(lambda: trainer.evaluate(rounds), CPU)[1]]
    stats = [{**out["comm"], "train_loss_per_client": out["train_loss_per_client"]} for out, _ in fits]
    return summarise([s for _, s in fits], eval_s, **comm(stats))


def flower_record(out: Path, wall: float) -> dict:
    fed = json.loads((out / "federation.json").read_text())
    if fed["failures"] or not (out / "summary.json").exists():
        raise RuntimeError(f"the Flower run in {out} did not finish cleanly: {fed['failures']}")
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return summarise(fed["round_seconds"], fed["eval_seconds"], total_wall_s=round(wall, 2), **comm(losses))


def thread_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_simulation(rounds: int, tmp: Path, threads: int, backend: str, secagg: bool = False) -> dict:
    out = tmp / f"simulation_{backend}{'_secagg' if secagg else ''}"
    run_flags = [*flags("g00,g01,g03"), "--secagg"] if secagg else FLAGS
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "main_fl.py", *run_flags, "--comm_round", str(rounds), "--federated_eval",
                    str(rounds), "--out_dir", str(out), "--engine", "flower", "--sim_backend", backend],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **thread_env(threads), "FLWR_TELEMETRY_ENABLED": "0",
                        "RAY_USAGE_STATS_ENABLED": "0"})
    return flower_record(out, time.perf_counter() - t0)


def run_deployment(rounds: int, tmp: Path, threads: int) -> dict:
    fed = LoopbackFederation(tmp / "federation", env=thread_env(threads))
    out = tmp / "deployment"
    try:
        t0 = time.perf_counter()
        fed.start_superlink()
        for group in GROUPS:
            fed.start_supernode(group)
        fed.run([*FLAGS, "--comm_round", str(rounds), "--federated_eval", str(rounds), "--out_dir", str(out)])
        fed.wait_done(out, timeout=120 + 60 * rounds)
        return flower_record(out, time.perf_counter() - t0)
    finally:
        left = fed.close()
        if left:
            print(f"warning: processes left running: {left}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--rounds", type=int, default=6, help="timed training rounds per engine (eval at 0 and the end)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process, on every engine")
    p.add_argument("--save", action="store_true", help="also write benchmarks/results/flower_overhead_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"config": {"flags": FLAGS, "rounds": args.rounds, "threads": args.threads,
                         "groups": {"train": GROUPS[:2], "eval": GROUPS[2:]}},
              "machine": {**machine_info(CPU), "load_average_1m_at_start": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(prefix="flower_overhead_") as tmp:
        runners = {"inprocess": lambda: run_inprocess(args.rounds),
                   "simulation": lambda: run_simulation(args.rounds, Path(tmp), args.threads, "thread"),
                   "simulation_ray": lambda: run_simulation(args.rounds, Path(tmp), args.threads, "ray"),
                   "deployment": lambda: run_deployment(args.rounds, Path(tmp), args.threads),
                   "simulation_secagg": lambda: run_simulation(args.rounds, Path(tmp), args.threads, "thread",
                                                               secagg=True)}
        for engine in args.engines.split(","):
            print(f"{engine}...", file=sys.stderr, flush=True)
            result[engine] = runners[engine]()
    if "inprocess" in result:
        base = result["inprocess"]
        result["overhead_vs_inprocess"] = {
            e: {"per_round_s": round(result[e]["median_round_s"] - base["median_round_s"], 4),
                "per_eval_s": round(result[e]["median_eval_s"] - base["median_eval_s"], 4),
                "round_ratio": round(result[e]["median_round_s"] / base["median_round_s"], 1)}
            for e in ENGINES[1:] if e in result and e != "simulation_secagg"}
    emit(result, RESULTS_DIR / "flower_overhead_cpu.json" if args.save else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
