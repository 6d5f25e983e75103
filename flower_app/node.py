"""The client side of the federation: one node holds one group and runs the in-process engine's `GroupClient`
on it, so a round on a node is the same computation as in one process (the client's Adam state is carried across
rounds in the node's own context). The node config names the group (`group`, `dataset`, `data-path`, optionally
`cache-dir` and `device`; in simulation, the partition id); each instruction carries the run's typed configs."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, replace

import torch
from flwr.app import Context, Message

from data_loaders.datasets import DataConfig, data_info, load_embedded
from data_loaders.schema import DataError, GroupData, build_group_data
from federated.client import GroupClient
from models.gpo import GPO, GPOConfig
from training.config import ClientConfig
from utils.device import resolve_device

from .protocol import (
    ADAM_ARRAYS,
    ADAM_META,
    NodeReport,
    adam_from_records,
    adam_to_records,
    eval_reply,
    fit_reply,
    query_reply,
    read_fit_config,
    read_instruction,
)

NODE_CONFIG_HINT = ("start the SuperNode with --node-config \"group='NAME' dataset='DATASET' "
                    "data-path='PATH'\" (see docs/federation.md)")


@dataclass(frozen=True)
class NodeIdentity:
    group: str
    dataset: str | None = None      # None only in simulation: the server's --dataset
    data_path: str | None = None    # None: take the server's --data_path
    cache_dir: str | None = None
    device: str | None = None


def node_identity(node_config: dict, partition_groups: list[str] | None) -> NodeIdentity:
    """From the SuperNode's --node-config, or the simulation's partition id -> group table."""
    given = {k: str(v) for k, v in node_config.items() if v not in (None, "")}
    if "group" in node_config:
        if "dataset" not in given:  # a node must say what it holds; the run checks it
            raise DataError(f"the node config of group {node_config['group']!r} names no dataset", NODE_CONFIG_HINT)
        return NodeIdentity(str(node_config["group"]), given["dataset"], given.get("data-path"),
                            given.get("cache-dir"), given.get("device"))
    if partition_groups is not None and "partition-id" in node_config:
        return NodeIdentity(partition_groups[int(node_config["partition-id"])])
    raise DataError("this SuperNode's node config names no group", NODE_CONFIG_HINT)


def node_data(setup: dict, ident: NodeIdentity) -> DataConfig:
    """The run's data config as this node must apply it: its own data location and cache."""
    data = DataConfig.from_dict(setup["data"])
    if ident.dataset is not None and ident.dataset != data.dataset:
        raise DataError(f"node of group {ident.group!r} holds dataset {ident.dataset!r}, but the run "
                        f"uses --dataset {data.dataset}", f"restart the SuperNode with dataset='{data.dataset}'")
    embedding = replace(data.embedding, cache_dir=ident.cache_dir or data.embedding.cache_dir)
    return replace(data, data_path=ident.data_path or data.data_path, embedding=embedding)


def load_group(cfg: DataConfig, group: str, considered: list[str], log=print) -> tuple[GroupData, bool, dict]:
    """This group's tensors only, identical to what prepare_experiment builds for it.

    Real datasets are parsed with the run's whole group list, because a question is kept
    only when every considered group that answers it has a usable answer; embeddings come
    from the content-keyed cache under the same key as the in-process engine's (question
    texts are public survey items; the answers, which are the private data, stay here).
    """
    t0 = time.perf_counter()
    raw, emb, emb_info = load_embedded(cfg, considered, log, check=lambda r: _check_group(r, group, cfg))
    _check_group(raw, group, cfg)
    data = build_group_data(raw, group, emb)
    info = data_info(raw, emb_info, time.perf_counter() - t0)
    return data, raw.bank.ordinals is not None, info


def _check_group(raw, group: str, cfg: DataConfig) -> None:
    if group not in raw.groups:
        raise DataError(f"group {group!r} not found in the {cfg.dataset} data at {cfg.data_path}",
                        f"available: {', '.join(sorted(raw.groups))}")


@dataclass
class NodeClient:
    client: GroupClient
    model: GPO               # scratch compute for this node's client
    device: torch.device
    report: NodeReport


# Built clients per (run, node, setup): a process that serves several messages (a Ray
# actor in simulation) loads its group once. Deployment starts one process per message,
# so there the data are loaded per message and only the Adam state persists (context.state).
_NODES: dict[tuple, NodeClient] = {}
_NODES_LOCK = threading.Lock()  # the simulation's thread backend serves several nodes at once
# GroupClient.fit seeds dropout from (seed, group, round) in torch's global RNG: concurrent fits in one
# process (thread backend) take turns on it.
_GLOBAL_RNG_LOCK = threading.Lock()


def get_node_client(setup: dict, context: Context, partition_groups: list[str] | None) -> NodeClient:
    ident = node_identity(dict(context.node_config), partition_groups)
    key = (context.run_id, context.node_id, json.dumps(setup, sort_keys=True), ident)
    with _NODES_LOCK:
        node = _NODES.get(key)
    if node is None:
        node = build_node_client(setup, ident, context.node_id)
        with _NODES_LOCK:
            for old in [k for k in _NODES if k[:2] == key[:2] or k[0] != key[0]]:
                del _NODES[old]  # an earlier run, or this node's earlier setup: free its tensors
            _NODES[key] = node
    return node


def build_node_client(setup: dict, ident: NodeIdentity, node_id: int) -> NodeClient:
    train, evals = setup["train_groups"], setup["eval_groups"]
    if ident.group in train:
        role = "train"
    elif ident.group in evals:
        role = "eval"
    else:
        raise DataError(f"this node holds group {ident.group!r}, which is in neither --train_groups "
                        f"{train} nor --eval_groups {evals}", "the server ignores this node for this run")
    data, has_ordinals, info = load_group(node_data(setup, ident), ident.group, train + evals, log=lambda *a: None)
    device = resolve_device(ident.device or setup["device"])
    client = GroupClient(data.to(device), ClientConfig.from_dict(setup["client"]), role)
    model = GPO(GPOConfig(**{**setup["model"], "dim_x": int(data.x.shape[1])})).to(device)
    report = NodeReport(ident.group, node_id, data.num_questions, data.num_points, int(data.x.shape[1]),
                        has_ordinals, info)
    return NodeClient(client, model, device, report)


# --- the three message handlers (the ClientApp registers these) ------------------------

def handle_query(msg: Message, context: Context, partition_groups: list[str] | None = None) -> Message:
    """Opening handshake: load the group, say which it is and how big."""
    setup, _, _ = read_instruction(msg)
    return query_reply(msg, get_node_client(setup, context, partition_groups).report)


def handle_train(msg: Message, context: Context, partition_groups: list[str] | None = None) -> Message:
    """`epochs` local steps from the global weights; the Adam state persists in context.state."""
    setup, round_, state = read_instruction(msg)
    node = get_node_client(setup, context, partition_groups)
    if node.client.role != "train":
        raise DataError(f"group {node.client.name!r} is an evaluation group and never trains",
                        "the server sends train instructions to training groups only")
    if ADAM_ARRAYS in context.state:
        node.client.load_state_dict(adam_from_records(context.state[ADAM_ARRAYS], context.state[ADAM_META]))
    with _GLOBAL_RNG_LOCK if node.model.config.dropout else contextlib.nullcontext():
        res = node.client.fit(node.model, {k: v.to(node.device) for k, v in state.items()}, round_,
                              read_fit_config(msg))
    records = adam_to_records(node.client.state_dict())
    if records is not None:
        context.state[ADAM_ARRAYS], context.state[ADAM_META] = records
    return fit_reply(msg, res)


def handle_evaluate(msg: Message, context: Context, partition_groups: list[str] | None = None) -> Message:
    """Per-question distances of this group under the global weights (nothing else leaves)."""
    setup, round_, state = read_instruction(msg)
    node = get_node_client(setup, context, partition_groups)
    result = node.client.evaluate(node.model, {k: v.to(node.device) for k, v in state.items()}, round_)
    return eval_reply(msg, result)
