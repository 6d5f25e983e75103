"""ServerApp and ClientApp for `--secagg` runs, usable before main_fl.py's own apps know the flag.

    client_app   flower_app.client_app's three handlers; `train` wrapped in the SecAgg+ mod
                 (flower_app/secagg_client.py). Query and evaluate handlers import the
                 node code lazily, so the three SecAgg+ stages that do not train start
                 fast in a deployment's one-process-per-message ClientApps.
    server_app   server_app.run_federation with SecAggTrainer as the FedAvg trainer, flags
                 from the run config (main_fl.py's flags plus the --secagg group).

A FAB whose [tool.flwr.app.components] name these two runs SecAgg+ in a deployment; the
loopback deployment test (tests/test_flower_deploy.py) builds one. Once flower_app/client_app.py wraps its
train handler in `make_secagg_mod` and training.experiment.make_trainer returns
`make_secagg_trainer` for `--secagg`, the project's own apps do the same and this module
is only a convenience.
"""
from __future__ import annotations

import contextlib
import shlex

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .secagg import add_secagg_arguments, check_secagg_flags
from .secagg_client import make_secagg_mod

# Nothing here imports torch at module level: a deployment starts one ClientApp process per
# message, and three of SecAgg+'s four stages only exchange keys.


def make_secagg_client_app(partition_groups: list[str] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from .node import handle_query
        return handle_query(msg, context, partition_groups)

    @app.train(mods=[make_secagg_mod(partition_groups)])
    def train(msg: Message, context: Context) -> Message:
        from .node import handle_train
        return handle_train(msg, context, partition_groups)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from .node import handle_evaluate
        return handle_evaluate(msg, context, partition_groups)

    return app


def secagg_parser():
    """main_fl.py's parser, with the --secagg group added if utils/cli.py does not have it yet."""
    from utils.cli import build_parser
    parser = build_parser("fedavg")
    if "--secagg" not in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
        add_secagg_arguments(parser.add_argument_group("secure aggregation (flower_app/secagg.py)"))
    return parser


def args_from_flags(text: str):
    from data_loaders.schema import DataError
    try:
        args = secagg_parser().parse_args(shlex.split(text))
    except SystemExit as err:  # argparse already printed what is wrong
        raise DataError(f"the run config's flags are not valid main_fl.py flags: {text!r}",
                        "python main_fl.py --help lists them") from err
    args.engine = "flower"
    return args


@contextlib.contextmanager
def secagg_trainers():
    """Let run_method build a SecAggTrainer for `--secagg` (until make_trainer does so itself)."""
    import training.experiment as experiment

    from .secagg_server import make_secagg_trainer
    original = experiment.make_trainer

    def make_trainer(method, args, data, cfg, device):
        if method == "fedavg" and getattr(args, "secagg", False):
            return make_secagg_trainer(args, data, cfg, experiment.model_config(args, data.dim_x))
        return original(method, args, data, cfg, device)

    experiment.make_trainer = make_trainer
    try:
        yield
    finally:
        experiment.make_trainer = original


def run_secagg_federation(grid: Grid, args, runtime: str, log=print) -> dict:
    from .server_app import run_federation
    args.engine = "flower"
    check_secagg_flags(args)
    with secagg_trainers():
        return run_federation(grid, args, runtime, log)


def make_secagg_server_app(args=None, runtime: str = "deployment") -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from data_loaders.schema import DataError
        try:
            text = context.run_config.get("flags")
            if args is None and not isinstance(text, str):
                raise DataError("the run config has no 'flags' string", "pass --run-config 'flags=\"...\"'")
            run_federation_args = args if args is not None else args_from_flags(text)
            run_secagg_federation(grid, run_federation_args, runtime)
        except Exception as err:  # noqa: BLE001 - shown in the ServerApp's log, then re-raised
            print(f"error: {err}")
            raise

    return app


client_app = make_secagg_client_app()
server_app = make_secagg_server_app()
