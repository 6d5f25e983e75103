"""The ServerApp side of `--secagg`: FlowerTrainer whose training rounds run Flower's SecAgg+.

flwr 1.41 has SecAgg+ only as a legacy workflow driven by a legacy Strategy, so `fit_sampled` runs
SecAggPlusWorkflow for one round with a strategy that carries this round's instructions and catches
the unmasked aggregate; sampling, evaluation, checkpoints and the run folder stay the shared ones.
The server sees each client's counts and losses in the clear, never its weights: the aggregate is
Σ r_g θ_g / Σ r_g with r_g = round(w_g / max_weight · Q) / Q (w_g the --weighting weight), the
in-process engine's weighted FedAvg up to the quantisation of θ and r.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from data_loaders.schema import DataError
from federated.fedavg import round_stats
from training.local import DivergenceError

from .federation import FlowerTrainer, push_and_pull
from .protocol import payload_bytes
from .secagg import MODULUS_RANGE, SecAggConfig
from .secagg_client import CLIP, CLIP_ERROR, DIVERGED, KEYS, MAX_WEIGHT, ROUND, SETUP

MIN_CLIENTS = 3  # the fewest clients whose sum hides each one's update from every other client


def effective_shares(num_shares: int | float, threshold: int | float, sampled: int) -> tuple[int, int]:
    """(shares, threshold) as SecAggPlusWorkflow.setup_stage resolves them for `sampled` clients (flwr 1.41)."""
    if num_shares == 1:
        num_shares = 1.0
    if isinstance(num_shares, float):
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    else:
        shares = num_shares
    if threshold == 1:
        threshold = 1.0
    need = max(round(threshold * shares), 2) if isinstance(threshold, float) else threshold
    if sampled != shares and shares % 2 == 0:  # the workflow makes an even count odd
        shares += 1
    return shares, need


def max_weight(groups: dict, names: list[str], weighting: str) -> float:
    """A bound on every client's raw weight, known before the round: a client trains on part of its
    questions, and an episode holds at most all of its group's points."""
    if weighting == "uniform":
        return 1.0
    attr = "num_questions" if weighting == "dataset_size" else "num_points"
    return float(max(getattr(groups[n], attr) for n in names))


class _RoundStrategy(FedAvg):
    """A legacy Strategy for one SecAgg+ round: fixed instructions in, the unmasked aggregate out. The
    workflow calls only these two methods; FedAvg supplies the others a Strategy must have."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]):
        super().__init__(fraction_evaluate=0.0)
        self.instructions = instructions
        self.results: list = []
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        if results:  # every FitRes holds the same aggregate (SecAggPlusWorkflow.unmask_stage)
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return (results[0][1].parameters if results else None), {}


@dataclass
class SecureReplies:
    """A SecAgg+ round as its server receives it: each client's numbers in the clear, one sum of weights."""
    metrics: dict[str, dict]      # client -> the metrics of its FitRes (counts, losses as JSON)
    aggregate: list[np.ndarray]   # Σ r_g θ_g / Σ r_g, unmasked
    comm: dict                    # the bytes of every message of the four stages


@dataclass
class _FastGrid:
    """The real Grid, polled every POLL_S instead of every 3 s (flwr 1.41's send_and_receive), noting
    every error reply with its stage."""

    grid: object
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (node, stage, reason)
    bytes_down: int = 0  # every message of every SecAgg+ stage (masked vectors, key material, shares)
    bytes_up: int = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(payload_bytes(m) for m in messages)
        stages = {m.metadata.dst_node_id: str(m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
                  for m in messages}
        _, replies = push_and_pull(self.grid, messages, timeout)
        self.bytes_up += sum(payload_bytes(r) for r in replies if not r.has_error())
        for reply in replies:
            if reply.has_error():
                node = reply.metadata.src_node_id
                self.errors.append((node, stages.get(node, "?"), reply.error.reason))
        return replies

    def __getattr__(self, name):  # get_node_ids, run, ...: the real Grid's
        return getattr(self.grid, name)


class SecAggTrainer(FlowerTrainer):
    """FlowerTrainer whose rounds run Flower's SecAgg+ (the server never holds a client's weights)."""

    def __init__(self, secagg: SecAggConfig, data, cfg, model_cfg, **kw):
        """`secagg`: validated settings (SecAggConfig.validate); `kw`: FlowerTrainer's."""
        super().__init__(data, cfg, model_cfg, **kw)
        self.num_shares, self.threshold, self.quant_range = secagg.num_shares, secagg.threshold, int(secagg.quant_range)
        self.clip_range, self.keys = float(secagg.clip_range), list(self.global_state)
        n = self.sampled_per_round
        if n < MIN_CLIENTS:
            raise DataError(f"--secagg needs at least {MIN_CLIENTS} clients per round; {n} sampled (a sum of one "
                            "client is its weights, and of two, each client subtracts its own update from the sum "
                            "and learns the other's), whatever the share settings",
                            "add training groups or raise --client_fraction")
        if n * self.quant_range >= MODULUS_RANGE:
            raise DataError(f"--secagg_quant_range {self.quant_range} times {n} clients reaches 2**32: the masked "
                            "sum would wrap around", f"use --secagg_quant_range below {MODULUS_RANGE // n}")
        shares, need = effective_shares(self.num_shares, self.threshold, n)
        if not 2 <= need <= shares <= n:
            raise DataError(f"--secagg_num_shares {self.num_shares} / --secagg_threshold {self.threshold} give {shares} "
                            f"shares and a threshold of {need} for {n} clients per round",
                            "keep the threshold at or below the shares and the shares at or below the clients")
        self.data.log(f"secagg: SecAgg+ over {n} clients per round, each secret in {shares} shares, {need} to rebuild "
                 f"it (up to {shares - need} may drop out); quantisation step "
                 f"{2 * self.clip_range / self.quant_range:.3g}")

    def fit_sampled(self, sampled: list[str], round_: int, fit_config: dict) -> SecureReplies:
        """One SecAgg+ round; `fit_config` is FedAvg's, which asks a client for nothing (--secagg allows no other)."""
        strategy, grid = self._secure_round(sampled, round_)
        by_node = {self.data.nodes[n]: n for n in sampled}
        replied = {by_node[proxy.node_id]: fitres.metrics for proxy, fitres in strategy.results}
        self._record_failures(by_node, replied, grid, round_)
        if strategy.aggregate is None or len(replied) < self.min_clients:
            raise DataError(f"round {round_}: SecAgg+ aggregated {len(replied)} of {len(sampled)} sampled clients"
                            + ("" if strategy.aggregate is not None else " (the protocol halted: too few clients "
                               "left for the threshold)") + f"; --min_clients {self.min_clients}; the round is not "
                            "aggregated", "check the SuperNodes' logs; the run folder keeps the last checkpoint")
        return SecureReplies(replied, strategy.aggregate,
                             {"comm_bytes_down": grid.bytes_down, "comm_bytes_up": grid.bytes_up})

    def aggregate_replies(self, replies: SecureReplies, sampled: int, round_: int, fit_config: dict) -> dict:
        """The unmasked sum is the new global state (each client checked its weights before masking)."""
        self.global_state = self._to_state(replies.aggregate)
        losses = {n: json.loads(str(m["losses"])) for n, m in replies.metrics.items()}
        return {**round_stats(losses, sum(int(m["points"]) for m in replies.metrics.values())), "comm": replies.comm}

    def _secure_round(self, names: list[str], round_: int) -> tuple[_RoundStrategy, _FastGrid]:
        weight_bound = max_weight(self.data.train, names, self.weighting)
        tensors = [ndarray_to_bytes(self.global_state[k].detach().cpu().numpy()) for k in self.keys]
        config = {SETUP: self.data.setup, ROUND: round_, KEYS: json.dumps(self.keys), CLIP: self.clip_range,
                  MAX_WEIGHT: weight_bound}
        instructions = [(GridClientProxy(self.data.nodes[n], self.grid, 0),
                         FitIns(Parameters(tensors=list(tensors), tensor_type="numpy.ndarray"), dict(config)))
                        for n in names]
        strategy = _RoundStrategy(instructions)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = SecAggPlusWorkflow(self.num_shares, self.threshold, max_weight=weight_bound,
                                      clipping_range=self.clip_range, quantization_range=self.quant_range,
                                      modulus_range=MODULUS_RANGE, timeout=self.timeout)
        grid = _FastGrid(self.grid)
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(max(level, logging.WARNING))  # its INFO lines ("sampled 3 clients (out of 0)") are its loop's
        try:
            workflow(grid, context)
        finally:
            flwr_log.setLevel(level)
        return strategy, grid

    def _record_failures(self, by_node: dict[int, str], replied, grid: _FastGrid, round_: int) -> None:
        reasons: dict[str, str] = {}
        for node, stage, reason in grid.errors:
            name = by_node.get(node, f"node {node}")
            if CLIP_ERROR in reason:
                raise DataError(f"round {round_}: client {name} stopped the run: {reason}")  # its hint included
            if DIVERGED in reason:  # the run folder is marked failed, as when the server sees the NaN itself
                what = re.search(rf"{DIVERGED} \d+: (.*?) \(client ", reason)
                raise DivergenceError(round_, name, what.group(1) if what else reason)
            reasons.setdefault(name, f"SecAgg+ stage {stage}: {reason}")
        for name in by_node.values():
            if name not in replied:
                reason = reasons.get(name, "no reply in one of the SecAgg+ stages"
                                     + (f" within --round_timeout {self.timeout:g} s" if self.timeout else ""))
                self.left_out(round_, "train", name, reason)

    def _to_state(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if len(arrays) != len(self.keys):
            raise DataError(f"SecAgg+ returned {len(arrays)} arrays for {len(self.keys)} weights",
                            "every node must run this project's ClientApp with the SecAgg+ mod")
        return {k: torch.from_numpy(np.asarray(a)).reshape(self.global_state[k].shape).to(self.global_state[k].dtype)
                for k, a in zip(self.keys, arrays)}

