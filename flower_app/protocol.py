"""What crosses the wire between the ServerApp and a ClientApp, and how it is encoded.

Only weights and numbers travel, never a group's data. Float64 values travel as Python floats and
float32 weights as raw NumPy bytes, so the Flower engine aggregates exactly what the in-process one does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federated.client import FitResult
from federated.comm import METRIC_PREFIX, fit_config_record, fit_metrics_record, record_bytes
from training.evaluation import GroupEval

# Message types (Flower's built-in ones) and record names.
QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"
WEIGHTS, CONFIG, FIT, SCORES, NODE = "weights", "config", "fit", "scores", "node"
# Keys of the ClientApp's node-local context.state (never sent to the server).
ADAM_ARRAYS, ADAM_META = "plurallm.adam", "plurallm.adam_meta"


@dataclass
class NodeReport:
    """A node's answer to the opening query: which group it holds and the data's shape."""

    group: str
    node_id: int
    num_questions: int
    num_points: int
    dim_x: int
    has_ordinals: bool
    info: dict


# --- weights ------------------------------------------------------------------------

def weights_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_weights(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


# --- server -> client ---------------------------------------------------------------

def instruction(kind: str, node_id: int, setup: str, round_: int,
                state: dict[str, torch.Tensor] | None = None, fit_config: dict | None = None) -> Message:
    """One instruction for one node (`group_id`: the round, as Flower's strategies use it). Each carries
    the whole setup, so a node needs no memory: the deployment starts a ClientApp process per message."""
    content = RecordDict({CONFIG: ConfigRecord({"setup": setup, **fit_config_record(round_, fit_config)})})
    if state is not None:
        content[WEIGHTS] = weights_record(state)
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(round_))


def read_instruction(msg: Message) -> tuple[dict, int, dict[str, torch.Tensor] | None]:
    """(setup, round, weights or None) of an instruction."""
    cfg = msg.content[CONFIG]
    state = record_weights(msg.content[WEIGHTS]) if WEIGHTS in msg.content else None
    return json.loads(str(cfg["setup"])), int(cfg["round"]), state


def read_fit_config(msg: Message) -> dict:
    cfg = msg.content[CONFIG]
    return json.loads(str(cfg["fit_config"])) if "fit_config" in cfg else {}


# --- client -> server ---------------------------------------------------------------

def query_reply(msg: Message, report: NodeReport) -> Message:
    counts = MetricRecord({"num_questions": report.num_questions, "num_points": report.num_points,
                           "dim_x": report.dim_x, "has_ordinals": int(report.has_ordinals)})
    node = ConfigRecord({"group": report.group, "info": json.dumps(report.info, sort_keys=True)})
    return Message(RecordDict({FIT: counts, NODE: node}), reply_to=msg)


def read_query_reply(msg: Message) -> NodeReport:
    counts, node = msg.content[FIT], msg.content[NODE]
    return NodeReport(str(node["group"]), msg.metadata.src_node_id, int(counts["num_questions"]),
                      int(counts["num_points"]), int(counts["dim_x"]), bool(counts["has_ordinals"]),
                      json.loads(str(node["info"])))


def fit_reply(msg: Message, res: FitResult) -> Message:
    metrics = MetricRecord(fit_metrics_record(res))
    return Message(RecordDict({WEIGHTS: weights_record(res.state), FIT: metrics}), reply_to=msg)


def read_fit_reply(name: str, msg: Message) -> FitResult:
    m = msg.content[FIT]
    metrics = {k[len(METRIC_PREFIX):]: float(v) for k, v in m.items() if k.startswith(METRIC_PREFIX)}
    return FitResult(name, record_weights(msg.content[WEIGHTS]), int(m["num_examples"]),
                     int(m["episode_points"]), [float(x) for x in m["losses"]], int(m["points"]), metrics)


def eval_reply(msg: Message, result: GroupEval | None) -> Message:
    """Per-question distances (float64 as Python floats: exact), or scored=0 when nothing to score."""
    if result is None:
        metrics = MetricRecord({"scored": 0})
    else:
        metrics = MetricRecord({"scored": 1, "distances": result.distances.double().tolist()})
    return Message(RecordDict({SCORES: metrics}), reply_to=msg)


def read_eval_reply(name: str, msg: Message) -> GroupEval | None:
    m = msg.content[SCORES]
    if not int(m["scored"]):
        return None
    return GroupEval(name, torch.tensor(list(m["distances"]), dtype=torch.float64))


# --- a client's Adam state in its node's context (stays on the node) ------------------

def adam_to_records(state: dict) -> tuple[ArrayRecord, ConfigRecord] | None:
    """GroupClient.state_dict() -> (tensors, metadata); None before the first local step."""
    adam = state["adam"]
    if adam is None:
        return None
    arrays = {f"{i}/{k}": v for i, per_param in adam["state"].items() for k, v in per_param.items()}
    meta = {"step": int(state["step"]), "param_groups": adam["param_groups"]}
    return ArrayRecord(torch_state_dict=arrays), ConfigRecord({"json": json.dumps(meta)})


def adam_from_records(arrays: ArrayRecord, meta: ConfigRecord) -> dict:
    """Inverse of adam_to_records, in the form GroupClient.load_state_dict takes."""
    info = json.loads(str(meta["json"]))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in arrays.to_torch_state_dict().items():
        idx, name = key.split("/", 1)
        per_param.setdefault(int(idx), {})[name] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]  # JSON made it a list
    return {"adam": {"state": per_param, "param_groups": groups}, "step": info["step"]}


# --- communication cost (federated/comm.py counts the in-process engine's rounds the same way) --

def payload_bytes(msg: Message, skip: tuple[str, ...] = ("setup",)) -> int:
    """Flower's count of a message's records, without the config entries in `skip` (the setup that
    every instruction repeats is not part of a round's cost)."""
    total = 0
    for record in msg.content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:  # legacy names nest the key: "fitins.config.setup"
            total += record_bytes({k: v for k, v in record.items() if k.rsplit(".", 1)[-1] not in skip})
    return total
