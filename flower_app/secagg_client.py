"""The ClientApp side of `--secagg`: Flower's secaggplus_mod around the node's own train handler.

Of SecAgg+'s four legacy FitIns/FitRes stages, the third calls the node's ordinary train handler
through `_train_for_secagg` (FitIns in, a FitRes whose `num_examples` is the raw aggregation weight
out); the mod then scales, quantises and masks the weights, and only the masked integers leave the
node. Every other message passes through. Flower's stochastic rounding draws from NumPy's global
RNG, seeded here from (seed, group, round), so a SecAgg+ run is reproducible bit for bit.
"""
from __future__ import annotations

import copy
import json
import threading

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat

from data_loaders.schema import DataError
from federated.aggregation import raw_weights
from training.local import check_finite
from utils.seeding import derive_seed

# Keys of the FitIns config the server sends (flower_app/secagg_server.py builds it).
SETUP, ROUND, KEYS, CLIP, MAX_WEIGHT = "setup", "round", "keys", "clip_range", "max_weight"
# Reasons on which the server stops the run instead of leaving the client out: a setting,
# or a diverged client (training.local.DivergenceError), which it cannot see through the masks.
CLIP_ERROR, DIVERGED = "exceeds --secagg_clip_range", "training diverged at round"

_NP_RNG_LOCK = threading.Lock()  # the thread backend runs several nodes' mods at once


def is_secagg_message(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def make_secagg_mod(partition_groups: list[str] | None = None):
    """A ClientApp mod: Flower's secaggplus_mod for SecAgg+ messages, nothing for the rest."""

    def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
        if not is_secagg_message(msg):
            return call_next(msg, ctxt)
        # Flower's workflow sends one RecordDict object to every node of a stage and the mod pops
        # keys from it; a runtime that does not serialise (the thread backend) would share it.
        msg = message_from_proto(message_to_proto(msg))
        saved: list = []

        def train(m: Message, c: Context) -> Message:
            reply, seed = _train_for_secagg(m, c, call_next, partition_groups)
            # Flower quantises right after this returns; hold NumPy's global RNG until it has.
            _NP_RNG_LOCK.acquire()
            saved.append(np.random.get_state())
            np.random.seed(seed)
            return reply

        try:
            return secaggplus_mod(msg, ctxt, train)
        finally:
            if saved:
                np.random.set_state(saved[0])
                _NP_RNG_LOCK.release()

    return secagg_mod


def _train_for_secagg(msg: Message, ctxt: Context, call_next,
                      partition_groups: list[str] | None) -> tuple[Message, int]:
    """FitIns -> the node's train handler -> FitRes (weights as float64, raw weight as num_examples)."""
    import torch

    from .node import node_identity
    from .protocol import TRAIN, instruction, read_fit_reply

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    keys = json.loads(str(cfg[KEYS]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"SecAgg+ instruction carries {len(arrays)} arrays for {len(keys)} weight names")
    state = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays)}
    setup, round_ = str(cfg[SETUP]), int(cfg[ROUND])
    plain = instruction(TRAIN, msg.metadata.dst_node_id, setup, round_, state)
    reply = call_next(Message(content=plain.content, metadata=copy.copy(msg.metadata)), ctxt)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)

    group = node_identity(dict(ctxt.node_config), partition_groups).group
    run = json.loads(setup)
    res = read_fit_reply(group, reply)
    weight = int(raw_weights([res.num_examples], [res.episode_points], run["weighting"])[0])
    clip, max_weight = float(cfg[CLIP]), float(cfg[MAX_WEIGHT])
    if weight > max_weight:  # the server's bound is wrong: the masked sum could wrap around
        raise ValueError(f"group {group}: aggregation weight {weight} above the server's max_weight {max_weight:g}")
    check_finite(round_, group, res.losses, res.state)  # masked, a NaN would corrupt the sum unseen
    largest = max(float(v.abs().max()) for v in res.state.values()) * weight / max_weight
    if largest > clip:
        raise DataError(f"group {group} round {round_}: a weight of magnitude {largest:.4g} (after scaling by "
                        f"{weight}/{max_weight:g}) {CLIP_ERROR} {clip:g}; SecAgg+ would clip it",
                        "raise --secagg_clip_range (the quantisation step grows with it)")
    metrics = {"num_examples": res.num_examples, "episode_points": res.episode_points, "points": res.points,
               "losses": json.dumps(res.losses)}
    params = ndarrays_to_parameters([res.state[k].double().cpu().numpy() for k in keys])
    fitres = FitRes(Status(Code.OK, ""), params, weight, metrics)
    seed = derive_seed(run["client"]["seed"], "secagg_rounding", group, round_) % 2 ** 32
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg), seed
