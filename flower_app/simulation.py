"""`main_fl.py --engine flower`: the ServerApp and ClientApp on Flower's simulation runtime.

One virtual SuperNode per group (node i holds the i-th of the train then eval groups), run
by Flower's Ray backend in worker processes on this machine; the ServerApp runs in this
process and writes the run folder. Telemetry, Ray usage stats and Flower's update check
are switched off before Flower starts.
"""
from __future__ import annotations

import os

from data_loaders.schema import DataError

from .federation import resolve_groups
from .server_app import check_supported

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def backend_config(args) -> dict:
    """Ray resources: each virtual client reserves --sim_client_cpus CPUs (and --sim_client_gpus GPUs)."""
    return {"client_resources": {"num_cpus": args.sim_client_cpus, "num_gpus": args.sim_client_gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True}}


def run_simulation_engine(args, log=print) -> dict:
    """Run the experiment of `args` through Flower's simulation runtime; returns the summary."""
    for key, value in QUIET_ENV.items():
        os.environ[key] = value
    args.engine = "flower"
    check_supported(args)  # before Ray starts: these flags fail in seconds, not after a minute
    from flwr.simulation import run_simulation

    from .client_app import make_client_app
    from .server_app import make_server_app
    train, evals = resolve_groups(args)
    groups = list(train) + list(evals)
    outcome: dict = {}
    log(f"flower simulation: {len(groups)} virtual SuperNodes, one per group")
    run_simulation(server_app=make_server_app(args, outcome, runtime="simulation"),
                   client_app=make_client_app(groups), num_supernodes=len(groups),
                   backend_config=backend_config(args))
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise DataError("the Flower simulation ended without a result", "see Flower's log above")
    return outcome["summary"]
