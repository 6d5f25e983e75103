"""The server's rules for one run: strategy (optionally wrapped in DP) and simulated attackers.

Both engines (in-process and Flower) hold one ServerRules and call the same three things
each round, so they aggregate identically and neither knows which strategy runs:

    fit_config(round)              sent to every sampled client with the weights
    aggregate(global, replies, r)  the new global weights
    info()                         numbers for the logs (DP: noise std, clipped count, ε spent)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attacks import choose_byzantine, corrupt_replies
from .client import FitResult
from .privacy import DPFedAvg, build_dp
from .strategies import Strategy, build_strategy


@dataclass
class ServerRules:
    strategy: Strategy | DPFedAvg = field(default_factory=Strategy)
    weighting: str = "dataset_size"
    byzantine: list[str] = field(default_factory=list)  # clients whose replies are replaced by an attack
    attack: str = "sign_flip"
    attack_scale: float = 10.0
    attack_std: float = 1.0
    seed: int = 0

    def fit_config(self, round_: int) -> dict:
        return {**self.strategy.client_config(round_), "metrics": list(self.strategy.required_metrics)}

    def aggregate(self, global_state: dict[str, torch.Tensor], replies: list[FitResult],
                  round_: int) -> dict[str, torch.Tensor]:
        if self.byzantine:
            # Simulated Byzantine clients: their replies are swapped for the attack's before the
            # server sees them, which for the aggregate is the same as the clients sending them.
            replies = corrupt_replies(replies, global_state, self.byzantine, self.attack, scale=self.attack_scale,
                                      std=self.attack_std, seed=self.seed, round_=round_)
        return self.strategy.aggregate(global_state, replies, round_, self.weighting)

    def info(self) -> dict:
        return dict(getattr(self.strategy, "last_info", {}))

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
                       attack_std=getattr(args, "attack_std", 1.0), seed=args.seed)
