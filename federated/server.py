"""The server's rules for one run: strategy (optionally wrapped in DP) and simulated attackers.

Every engine's FedAvg round (federated.fedavg.FedAvgRound) calls one ServerRules the same way, so they aggregate
identically and none knows which strategy runs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .aggregation import Tensors, client_update, l2_norm, num_sampled_clients
from .aggregation import aggregate as fedavg_aggregate
from .attacks import AttackConfig, choose_byzantine, corrupt_replies
from .client import FitResult
from .privacy import DPFedAvg, PrivacyConfig, build_dp
from .strategies import Strategy, StrategyConfig


def step_ratio(global_state: Tensors, new_state: Tensors, fedavg_state: Tensors) -> float | None:
    """||new - w|| / ||fedavg - w|| over the replies as received (attacked ones included): 1 for fedavg, how far
    another rule steps compared with it; None when FedAvg would not move."""
    ref = l2_norm(client_update(global_state, fedavg_state))
    return l2_norm(client_update(global_state, new_state)) / ref if ref > 0 else None


@dataclass
class ServerRules:
    strategy: Strategy | DPFedAvg = field(default_factory=Strategy)
    weighting: str = "dataset_size"
    byzantine: list[str] = field(default_factory=list)  # clients whose replies are replaced by an attack
    attack: AttackConfig = AttackConfig()
    seed: int = 0
    last_step_ratio: float | None = None

    def fit_config(self, round_: int) -> dict:
        return {**self.strategy.client_config(round_), "metrics": list(self.strategy.required_metrics)}

    def aggregate(self, global_state: dict[str, torch.Tensor], replies: list[FitResult],
                  round_: int) -> dict[str, torch.Tensor]:
        if self.byzantine:
            # Simulated Byzantine clients: their replies are swapped for the attack's before the
            # server sees them, which for the aggregate is the same as the clients sending them.
            a = self.attack
            replies = corrupt_replies(replies, global_state, self.byzantine, a.attack, scale=a.scale, std=a.std,
                                      seed=self.seed, round_=round_, eps=a.eps, report=a.report)
        new = self.strategy.aggregate(global_state, replies, round_, self.weighting)
        self.last_step_ratio = step_ratio(global_state, new, fedavg_aggregate(replies, self.weighting))
        return new

    def info(self) -> dict:
        info = dict(self.strategy.last_info)
        if self.last_step_ratio is not None:
            info["server_step_ratio"] = self.last_step_ratio
        return info

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server's rules are built from."""

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
    byzantine = choose_byzantine(sorted(train_names), cfg.attack.byzantine, cfg.seed) if cfg.attack.byzantine else []
    return ServerRules(strategy=dp or strategy, weighting=cfg.weighting, byzantine=byzantine, attack=cfg.attack,
                       seed=cfg.seed)
