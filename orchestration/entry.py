"""The command lines main_fl.py and main_centralized.py (and `plurallm-fl` / `plurallm-central`):
flags parsed, the experiment run (orchestration/experiment.py), a user error printed as one line
with exit code 2, an interrupt as one line that says how to resume."""
from __future__ import annotations

import os
import sys
import time

from orchestration.cli import build_parser
from orchestration.config import run_config
from orchestration.experiment import check_flags, load_data, run_method
from utils.errors import exit_on_error


def main(method: str, argv=None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file (nohup, > log) as it happens
    args = build_parser(method).parse_args(argv)
    return exit_on_error(lambda: _main(method, args), interrupts=True,
                         resume_hint="rerun the same command with --resume to continue from the last checkpoint")


def main_fl() -> int:
    """The `plurallm-fl` command (= python main_fl.py)."""
    return main("fedavg")


def main_central() -> int:
    """The `plurallm-central` command (= python main_centralized.py)."""
    return main("centralized")


def _main(method: str, args) -> None:
    t0 = time.perf_counter()
    run = check_flags(args, method)
    if run.federation.engine == "flower":  # clients on Flower nodes: flower_app/
        from orchestration.flower_simulation import run_simulation_engine
        run_simulation_engine(args)
        print(f"done in {time.perf_counter() - t0:.1f} s")
        return
    data = load_data(run)
    run_method(run, data, run.output.out_dir)
    if method == "fedavg" and run.output.also_centralized:
        # The baseline gets a sibling folder so both runs keep the standard layout.
        out = run.output.out_dir
        run_method(run_config(args, "centralized"), data, f"{out.rstrip('/')}_centralized" if out else None)
    print(f"done in {time.perf_counter() - t0:.1f} s")
