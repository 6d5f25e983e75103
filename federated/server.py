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
from .aggregation import num_sampled_clients
from .attacks import AttackConfig, choose_byzantine, corrupt_replies
from .client import FitResult
from .privacy import DPFedAvg, PrivacyConfig, build_dp
from .strategies import Strategy, StrategyConfig, Tensors, float_keys


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


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server's rules are built from: its strategy, simulated attackers, client-level DP,
    the FedAvg weighting, the share of clients sampled per round and the run's seed."""

    strategy: StrategyConfig = StrategyConfig()
    attack: AttackConfig = AttackConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    weighting: str = "dataset_size"
    client_fraction: float = 1.0
    seed: int = 0

    def validate(self, num_train_clients: int) -> list[str]:
        """Raise DataError for settings no run could use; return warnings worth printing."""
        self.strategy.validate()
        m = num_sampled_clients(num_train_clients, self.client_fraction)
        return [*self.strategy.warnings(m), *self.attack.validate(num_train_clients, self.strategy, m),
                *self.privacy.validate(num_train_clients, weighting=self.weighting, strategy=self.strategy.name,
                                       client_fraction=self.client_fraction)]

    def build_dp(self, strategy: Strategy, num_train_clients: int, rounds: int) -> DPFedAvg | None:
        return build_dp(self.privacy, strategy, num_train_clients, rounds, client_fraction=self.client_fraction,
                        seed=self.seed)


def build_server(cfg: ServerConfig, train_names: list[str], rounds: int) -> ServerRules:
    """The run's server rules for these training clients and a run of `rounds` rounds."""
    strategy = Strategy(cfg.strategy)
    dp = cfg.build_dp(strategy, len(train_names), rounds)
    a = cfg.attack
    return ServerRules(strategy=dp or strategy, weighting=cfg.weighting,
                       byzantine=choose_byzantine(sorted(train_names), a.byzantine, cfg.seed) if a.byzantine else [],
                       attack=a.attack, attack_scale=a.scale, attack_std=a.std, attack_eps=a.eps,
                       attack_report=a.report, seed=cfg.seed)
