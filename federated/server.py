"""The server's rules for one run: strategy (optionally wrapped in DP) and simulated attackers.

Both engines (in-process and Flower) hold one ServerRules, and the FedAvg round they share
(federated.fedavg.FedAvgRound) calls the same three things each round, so they aggregate
identically and neither knows which strategy runs:

    fit_config(round)              sent to every sampled client with the weights
    aggregate(global, replies, r)  the new global weights
    info()                         numbers for the logs (DP: noise std, clipped count, ε spent;
                                   every rule: server_step_ratio)

server_step_ratio = ||new - w|| / ||FedAvg's aggregate - w||, both over the round's replies as the
server received them (attacked ones included) with the run's --weighting: 1 for fedavg, how far a
rule steps compared with FedAvg for the others (q-FFL's old step was 0.1% of it: issue 22).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .aggregation import aggregate as fedavg_aggregate
from .attacks import choose_byzantine, corrupt_replies
from .client import FitResult
from .privacy import DPFedAvg, build_dp
from .strategies import Strategy, Tensors, build_strategy, float_keys


def step_norm(global_state: Tensors, new_state: Tensors) -> float:
    """||new - w||₂ over every floating tensor jointly, in float64, keys in sorted order."""
    total = 0.0
    for k in sorted(float_keys(global_state)):
        total += float((new_state[k].to(torch.float64) - global_state[k].to(torch.float64)).pow(2).sum())
    return math.sqrt(total)


def step_ratio(global_state: Tensors, new_state: Tensors, fedavg_state: Tensors) -> float | None:
    """||new - w|| / ||fedavg - w||; None when FedAvg would not move (nothing to compare with)."""
    ref = step_norm(global_state, fedavg_state)
    return step_norm(global_state, new_state) / ref if ref > 0 else None


@dataclass
class ServerRules:
    strategy: Strategy | DPFedAvg = field(default_factory=Strategy)
    weighting: str = "dataset_size"
    byzantine: list[str] = field(default_factory=list)  # clients whose replies are replaced by an attack
    attack: str = "sign_flip"
    attack_scale: float = 10.0
    attack_std: float = 1.0
    attack_eps: float = 0.5      # ipm
    attack_report: float = 0.0   # report_score
    seed: int = 0
    last_step_ratio: float | None = None

    def fit_config(self, round_: int) -> dict:
        return {**self.strategy.client_config(round_), "metrics": list(self.strategy.required_metrics)}

    def aggregate(self, global_state: dict[str, torch.Tensor], replies: list[FitResult],
                  round_: int) -> dict[str, torch.Tensor]:
        if self.byzantine:
            # Simulated Byzantine clients: their replies are swapped for the attack's before the
            # server sees them, which for the aggregate is the same as the clients sending them.
            replies = corrupt_replies(replies, global_state, self.byzantine, self.attack, scale=self.attack_scale,
                                      std=self.attack_std, seed=self.seed, round_=round_, eps=self.attack_eps,
                                      report=self.attack_report)
        new = self.strategy.aggregate(global_state, replies, round_, self.weighting)
        self.last_step_ratio = step_ratio(global_state, new, fedavg_aggregate(replies, self.weighting))
        return new

    def info(self) -> dict:
        info = dict(getattr(self.strategy, "last_info", {}))
        if self.last_step_ratio is not None:
            info["server_step_ratio"] = self.last_step_ratio
        return info

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)


def build_server(args, train_names: list[str], rounds: int) -> ServerRules:
    """The run's rules from its flags (flags absent from an old config take their defaults)."""
    strategy = build_strategy(args)
    dp = build_dp(args, strategy, len(train_names), rounds) if getattr(args, "dp", False) else None
    count = getattr(args, "byzantine", 0)
    return ServerRules(strategy=dp or strategy, weighting=args.weighting,
                       byzantine=choose_byzantine(sorted(train_names), count, args.seed) if count else [],
                       attack=getattr(args, "attack", "sign_flip"), attack_scale=getattr(args, "attack_scale", 10.0),
                       attack_std=getattr(args, "attack_std", 1.0), attack_eps=getattr(args, "attack_eps", 0.5),
                       attack_report=getattr(args, "attack_report", 0.0), seed=args.seed)
