"""The command lines main_fl.py and main_centralized.py (and `plurallm-fl` / `plurallm-central`):
a user error is one line and exit code 2, an interrupt one line that says how to resume."""
from __future__ import annotations

import functools
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


main_fl = functools.partial(main, "fedavg")  # the `plurallm-fl` command (= python main_fl.py)
main_central = functools.partial(main, "centralized")  # `plurallm-central` (= python main_centralized.py)


def _main(method: str, args) -> None:
    t0 = time.perf_counter()
    run = check_flags(args, method)
    if run.federation.engine == "flower":  # clients on Flower nodes: flower_app/
        from orchestration.flower_simulation import run_simulation_engine
        run_simulation_engine(args)
    else:
        data = load_data(run)
        out = run.output.out_dir
        run_method(run, data, out)
        if method == "fedavg" and run.output.also_centralized:  # a sibling folder: both keep the standard layout
            run_method(run_config(args, "centralized"), data, f"{out.rstrip('/')}_centralized" if out else None)
    print(f"done in {time.perf_counter() - t0:.1f} s")
