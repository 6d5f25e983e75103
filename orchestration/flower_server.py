"""The ServerApp: the main_fl.py experiment with its clients on Flower nodes, run by the same
`run_method` as in one process. Its flags come, in a deployment, from the run config key `flags`
(pyproject.toml [tool.flwr.app.config], or `flwr run ... --run-config`). It adds federation.json:
which node held which group, every client left out of a round and why, each round's wall time.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from data_loaders.datasets import chosen_groups
from flower_app.federation import discover, federated_data, make_setup
from orchestration.cli import build_parser
from orchestration.experiment import check_flags, run_method
from utils.atomic_write import atomic_write_bytes
from utils.errors import DataError
from utils.run_folder import default_run_dir


def args_from_run_config(run_config: dict):
    """main_fl.py's flags from the run config's `flags` string."""
    text = run_config.get("flags")
    if not isinstance(text, str):
        raise DataError("the run config has no 'flags' string",
                        "set [tool.flwr.app.config] flags in pyproject.toml or pass --run-config 'flags=\"...\"'")
    try:
        args = build_parser("fedavg").parse_args(shlex.split(text))
    except SystemExit as err:  # argparse already printed what is wrong
        raise DataError(f"the run config's flags are not valid main_fl.py flags: {text!r}",
                        "python main_fl.py --help lists them") from err
    return args


def default_secure_noise(args, runtime: str) -> None:
    """In a real deployment (SuperLink and SuperNodes) DP noise comes from the OS, known only to the
    server, unless the flags say --no-dp_secure_noise; simulations stay reproducible (issue 22)."""
    if runtime == "deployment" and args.dp and args.dp_secure_noise is None:
        args.dp_secure_noise = True


def run_federation(grid: Grid, args, runtime: str, log=print) -> dict:
    """Find the nodes, then train and evaluate through the shared run loop; returns the summary."""
    args.engine = "flower"
    default_secure_noise(args, runtime)
    run = check_flags(args)
    train, evals = chosen_groups(run.data)  # without loading any data
    setup = make_setup(run.data, run.client, run.model, run.federation.device, run.server.weighting, train, evals)
    log(f"flower ({runtime}): waiting for the nodes of {len(train)} train + {len(evals)} eval groups")
    reports = discover(grid, setup, train + evals, run.federation.node_wait, log)
    data = federated_data(run.data.dataset, grid, setup, reports, train, evals, log)
    data.serial_eval = runtime == "simulation-thread"  # nodes in one process: evaluate in a fixed order
    out_dir = Path(args.out_dir) if args.out_dir else default_run_dir("fedavg", run.client.seed)
    ours = not (out_dir / "config.json").exists()  # run_method refuses a folder holding another run
    try:
        return run_method(run, data, out_dir, log=log)
    finally:
        if ours and out_dir.is_dir():
            record = {"engine": "flower", "runtime": runtime, "nodes": data.nodes, "failures": data.failures,
                      "round_seconds": [round(s, 4) for s in data.round_seconds],
                      "eval_seconds": [round(s, 4) for s in data.eval_seconds]}
            atomic_write_bytes(out_dir / "federation.json", (json.dumps(record, indent=2) + "\n").encode())


def make_server_app(args=None, outcome: dict | None = None, runtime: str = "simulation") -> ServerApp:
    """A ServerApp for `args` (simulation), or for the run config's flags (`args=None`: deployment).
    With `outcome`, the summary or the exception is stored there instead of raised, for the caller
    to report after the runtime has shut down."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_args = args if args is not None else args_from_run_config(dict(context.run_config))
            summary = run_federation(grid, run_args, runtime)
            if outcome is not None:
                outcome["summary"] = summary
        except Exception as err:  # noqa: BLE001 - handed to the caller, or re-raised
            if outcome is None:
                print(f"error: {err}")
                raise
            outcome["error"] = err

    return app


app = make_server_app(runtime="deployment")
