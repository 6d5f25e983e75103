"""What a client's local training and evaluation need: one frozen config, built from the flags
by orchestration/config.py (or rebuilt from its dict on a Flower node)."""
from __future__ import annotations

from dataclasses import dataclass

from data_loaders.episodes import EpisodeSizes
from training.local import OptimConfig
from utils.distances import DEFAULT_METRIC


@dataclass(frozen=True)
class ClientConfig:
    seed: int = 0
    epochs: int = 6                 # local steps per round
    data_split: float = 0.9         # local training share of the group's questions (qkey order)
    sizes: EpisodeSizes = EpisodeSizes()
    optim: OptimConfig = OptimConfig()
    eval_num_qs: int = 20
    eval_seed: int = 0
    eval_resample: bool = False
    eval_batch_size: int = 0        # target questions per evaluation pass (0 = all)
    metric: str = DEFAULT_METRIC

    @classmethod
    def from_dict(cls, d: dict) -> ClientConfig:
        """The inverse of dataclasses.asdict (JSON turns tuples into lists)."""
        optim = OptimConfig(**{**d["optim"], "betas": tuple(d["optim"]["betas"])})
        return cls(**{**d, "sizes": EpisodeSizes(**d["sizes"]), "optim": optim})
