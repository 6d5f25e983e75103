"""`main_fl.py --engine flower`: the ServerApp and ClientApp on Flower's simulation runtime, one virtual
SuperNode per group (train then eval groups). --sim_backend thread runs the ClientApp in worker threads of
this process (no Ray, no ports); ray in Flower's Ray workers. flwr 1.41 hard-wires the Ray backend inside
the runtime, so the thread backend, with the same `Backend` interface, takes its place for one run only.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from data_loaders.datasets import chosen_groups
from flower_app.client_app import make_client_app
from orchestration.config import run_config
from orchestration.flower_server import make_server_app
from utils.errors import DataError

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class ThreadBackend(Backend):
    """Runs the ClientApp in the runtime's worker threads (as many as client_resources allow)."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        per_client = float(backend_config.get("client_resources", {}).get("num_cpus", 1) or 1)
        self.workers = max(1, int((os.cpu_count() or 1) // per_client))
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return self.workers

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """What Ray's actor does, in this thread: errors become ClientAppException (an error reply)."""
        try:
            return self.app_fn()(message=message, context=context), context
        except LoadClientAppError:
            raise
        except Exception as ex:  # noqa: BLE001 - reported to the server as the node's error
            raise ClientAppException(str(ex)) from ex


@contextlib.contextmanager
def use_backend(name: str):
    """Make Flower's simulation runtime build `name`'s backend for runs started inside."""
    if name == "ray":
        yield
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend
    original = raybackend.RayBackend
    raybackend.RayBackend = ThreadBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original


def backend_config(fed) -> dict:
    """Resources per virtual client: --sim_client_cpus CPUs (and --sim_client_gpus GPUs with Ray)."""
    return {"client_resources": {"num_cpus": fed.sim_client_cpus, "num_gpus": fed.sim_client_gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True}}


def run_simulation_engine(args, log=print) -> dict:
    os.environ.update(QUIET_ENV)
    run = run_config(args)  # checked by the caller (entry.py)
    fed = run.federation
    from flwr.simulation import run_simulation

    train, evals = chosen_groups(run.data)
    groups = [*train, *evals]
    outcome: dict = {}
    log(f"flower simulation ({fed.sim_backend} backend): {len(groups)} virtual SuperNodes, one per group")
    with use_backend(fed.sim_backend):
        run_simulation(server_app=make_server_app(args, outcome, runtime=f"simulation-{fed.sim_backend}"),
                       client_app=make_client_app(groups), num_supernodes=len(groups),
                       backend_config=backend_config(fed))
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise DataError("the Flower simulation ended without a result", "see Flower's log above")
    return outcome["summary"]
