"""The ClientApp around flower_app.node: `app` for a SuperNode (its group from --node-config),
`make_client_app(groups)` for the simulation (virtual node i holds groups[i])."""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .secagg_client import make_secagg_mod

# flower_app.node (torch, the data) is imported inside the handlers: a deployment starts one
# ClientApp process per message, and three of SecAgg+'s four stages only exchange keys.


def make_client_app(partition_groups: list[str] | None = None) -> ClientApp:
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


app = make_client_app()
