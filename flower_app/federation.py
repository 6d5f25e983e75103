"""The server side of the federation: find each group's node, then run FedAvg over the Grid. `FlowerTrainer`
has FedAvgTrainer's interface, so the same RunLoop drives it; only `fit_sampled` differs."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from data_loaders.datasets import DataConfig, ExperimentData
from data_loaders.schema import DataError
from federated.aggregation import num_sampled_clients
from federated.client import FitResult
from federated.fedavg import FedAvgRound, check_min_clients
from federated.server import ServerRules
from models.gpo import GPOConfig
from training.config import ClientConfig
from training.evaluation import GroupEval

from .protocol import EVALUATE, QUERY, TRAIN, NodeReport, instruction, read_eval_reply, read_fit_reply, read_query_reply

POLL_S = 0.05  # how often the server asks the SuperLink for replies (Flower's own helper waits 3 s)


# --- which groups, and where they live -----------------------------------------------

def make_setup(data: DataConfig, client: ClientConfig, model: GPOConfig, device: str, weighting: str,
               train: list[str], evals: list[str]) -> str:
    """What every instruction carries: the run's typed configs (node.py rebuilds them), its device and
    FedAvg weighting, and the group lists (JSON, sorted keys). The model's dim_x comes from the node's data."""
    return json.dumps({"data": asdict(data), "client": asdict(client), "model": asdict(model), "device": device,
                       "weighting": weighting, "train_groups": list(train), "eval_groups": list(evals)},
                      sort_keys=True)


REFUSED = "the SuperLink did not accept the message (its node is no longer registered)"


def push_and_pull(grid: Grid, messages: list[Message], timeout: float | None) -> tuple[list[str], list[Message]]:
    """Push `messages` and poll for their replies, error replies included, until all came or `timeout` s
    passed; returns the message ids ('' for one the SuperLink refused) and the replies."""
    ids = list(grid.push_messages(messages))
    pending = {mid for mid in ids if mid}
    replies: list[Message] = []
    end = None if timeout is None else time.monotonic() + timeout
    while pending and (end is None or time.monotonic() < end):
        for reply in grid.pull_messages(list(pending)):
            if reply.metadata.reply_to_message_id in pending:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        if pending:
            time.sleep(POLL_S)
    return ids, replies


def exchange(grid: Grid, messages: dict[str, Message], timeout: float | None) -> dict[str, Message | str]:
    """One message per group; its reply, matched by the instruction it answers (never by arrival order),
    or REFUSED. A group missing from the result did not reply within `timeout` seconds."""
    names = list(messages)
    ids, replies = push_and_pull(grid, [messages[n] for n in names], timeout)
    by_id = dict(zip(ids, names))
    out: dict[str, Message | str] = {n: REFUSED for mid, n in zip(ids, names) if not mid}
    out.update({by_id[r.metadata.reply_to_message_id]: r for r in replies})
    return out


def failure(reply: Message | str) -> str | None:
    """Why an exchange brought no usable reply (REFUSED, or the error a ClientApp or the SuperLink sent)."""
    return reply if isinstance(reply, str) else reply.error.reason if reply.has_error() else None


def discover(grid: Grid, setup: str, groups: list[str], wait_s: float, log=print) -> dict[str, NodeReport]:
    """Ask every connected node, late ones as they appear, which group it holds, until each of
    `groups` has one or `wait_s` runs out."""
    deadline = time.monotonic() + wait_s
    asked: set[int] = set()
    reports: dict[str, NodeReport] = {}
    errors: list[str] = []
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        asked.update(new)
        if new:
            msgs = {str(n): instruction(QUERY, n, setup, 0) for n in new}
            replies = exchange(grid, msgs, max(1.0, deadline - time.monotonic()))
            for node, reply in replies.items():
                reason = failure(reply)
                if reason is not None:
                    errors.append(f"node {node}: {reason}")
                    log(f"flower: node {node} did not join: {reason}")
                    continue
                rep = read_query_reply(reply)
                if rep.group in reports:
                    raise DataError(f"two SuperNodes ({reports[rep.group].node_id}, {rep.node_id}) hold group "
                                    f"{rep.group!r}", "give each SuperNode a different group in its --node-config")
                reports[rep.group] = rep
        missing = [g for g in groups if g not in reports]
        if not missing:
            return reports
        if time.monotonic() >= deadline:
            raise DataError(f"no node holds group(s) {missing} after waiting {wait_s:g} s "
                            f"({len(asked)} node(s) connected" + (f"; errors: {errors}" if errors else "") + ")",
                            "start one SuperNode per group (--node-config \"group='NAME' ...\"), name fewer "
                            "groups with --train_groups/--eval_groups, or wait longer with --node_wait")
        time.sleep(0.2)


@dataclass
class RemoteGroup:
    """What the server knows of a group: its size (for the same checks as in-process), not its data."""

    name: str
    num_questions: int
    num_points: int
    node_id: int


@dataclass
class FederatedData(ExperimentData):
    """ExperimentData whose groups live on nodes: run_method validates and records it as usual."""

    grid: Grid | None = None
    setup: str = ""
    nodes: dict[str, int] = field(default_factory=dict)
    # Filled by the FlowerTrainer as it runs, read by the ServerApp for federation.json.
    failures: list[dict] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    log: Callable[[str], None] = print  # where the trainer reports clients left out
    # Evaluate one group at a time, in name order (evaluation groups, then training groups): on the
    # simulation's thread backend all nodes share one process and its torch thread pool, and
    # concurrent evaluations there rounded differently from the in-process engine's (8e-10, issue 22).
    serial_eval: bool = False


def federated_data(dataset: str, grid: Grid, setup: str, reports: dict[str, NodeReport], train: list[str],
                   evals: list[str], log=print) -> FederatedData:
    used = [reports[g] for g in train + evals]
    for key in ("dim_x", "has_ordinals"):
        values = {getattr(r, key) for r in used}
        if len(values) > 1:
            raise DataError(f"nodes disagree on {key}: " + ", ".join(f"{r.group}={getattr(r, key)}" for r in used),
                            "every node must load the same dataset version and embedding model")
    hashes = {r.info.get("source_hash") for r in used}
    if len(hashes) > 1:
        raise DataError(f"nodes hold different versions of the {dataset} data (content hashes {sorted(hashes)})",
                        "point every SuperNode at the same release of the data files")
    remote = lambda names: {g: RemoteGroup(g, reports[g].num_questions, reports[g].num_points,  # noqa: E731
                                           reports[g].node_id) for g in names}
    info = dict(used[0].info)
    info["federation"] = {"engine": "flower", "nodes": {r.group: r.node_id for r in used}}
    return FederatedData(dataset, remote(train), remote(evals), used[0].dim_x, used[0].has_ordinals,
                         info, grid=grid, setup=setup, nodes={r.group: r.node_id for r in used}, log=log)


# --- FedAvg over the Grid ----------------------------------------------------------------

class FlowerTrainer(FedAvgRound):
    def __init__(self, data: FederatedData, cfg: ClientConfig, model_cfg: GPOConfig, *,
                 weighting: str = "dataset_size", client_fraction: float = 1.0, min_clients: int = 1,
                 round_timeout: float = 0.0, server: ServerRules | None = None):
        super().__init__(cfg, model_cfg, sorted(data.train), weighting, client_fraction, server)
        self.data, self.grid, self.weighting, self.eval_names = data, data.grid, weighting, sorted(data.eval)
        self.min_clients, self.timeout = max(1, min_clients), round_timeout if round_timeout > 0 else None
        self.sampled_per_round = num_sampled_clients(len(self.train_names), client_fraction)
        check_min_clients(self.min_clients, self.sampled_per_round)

    def _ask(self, kind: str, names: list[str], round_: int, fit_config: dict | None = None) -> dict[str, Message]:
        """Send `kind` to each group's node; return the good replies, log and record the rest."""
        msgs = {n: instruction(kind, self.data.nodes[n], self.data.setup, round_, self.global_state, fit_config)
                for n in names}
        replies = exchange(self.grid, msgs, self.timeout)
        good = {}
        for name in names:
            reply = replies.get(name)
            reason = f"no reply within --round_timeout {self.timeout:g} s" if reply is None else failure(reply)
            if reason is None:
                good[name] = reply
            else:
                self.left_out(round_, kind, name, reason)
        return good

    def left_out(self, round_: int, phase: str, name: str, reason: str) -> None:
        self.data.failures.append({"round": round_, "phase": phase, "client": name, "reason": reason})
        self.data.log(f"flower: round {round_} {phase}: client {name} left out ({reason})")

    def train_round(self, round_: int) -> dict:
        t0 = time.perf_counter()
        stats = super().train_round(round_)
        self.data.round_seconds.append(time.perf_counter() - t0)
        return stats

    def fit_sampled(self, sampled: list[str], round_: int, fit_config: dict) -> list[FitResult]:
        """The replies that arrive; fewer than --min_clients stop the run before aggregation."""
        results = [read_fit_reply(n, m) for n, m in self._ask(TRAIN, sampled, round_, fit_config).items()]
        if len(results) < self.min_clients:
            raise DataError(f"round {round_}: {len(results)} of {len(sampled)} sampled clients replied, fewer than "
                            f"--min_clients {self.min_clients}; the round is not aggregated",
                            "check the SuperNodes' logs; the run folder keeps the last checkpoint")
        return results

    def evaluate(self, round_: int) -> tuple[dict[str, GroupEval], dict[str, GroupEval]]:
        t0 = time.perf_counter()
        names = self.eval_names + self.train_names
        batches = [[n] for n in names] if self.data.serial_eval else [names]  # serial: one group after the other
        scored = {n: read_eval_reply(n, m) for batch in batches for n, m in self._ask(EVALUATE, batch, round_).items()}
        evals = {n: scored[n] for n in self.eval_names if scored.get(n) is not None}
        trains = {n: scored[n] for n in self.train_names if scored.get(n) is not None}
        if not evals:
            raise DataError(f"round {round_}: no evaluation group replied", "check the evaluation groups' SuperNodes")
        self.data.eval_seconds.append(time.perf_counter() - t0)
        return evals, trains

    def load_global(self, weights: dict) -> None:
        self.global_state = {k: v.detach().cpu() for k, v in weights.items()}

    # The clients' Adam states live on their nodes, so a checkpoint holds only the weights.
    def state_dict(self) -> dict:
        return {"clients": {}, "server": self.server.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("clients"):
            raise DataError("this checkpoint holds in-process clients' optimizer states",
                            "resume it with --engine inprocess")
        self.server.load_state_dict(state["server"])
