"""Byzantine clients for robustness experiments (issue 14): who attacks, and what they send (the formulas:
docs/strategies_privacy.md). The attackers are drawn once from (seed, "byzantine"), so the same clients attack
on every engine and after a resume; alie and ipm know the round's honest updates (the strongest case)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch

from data_loaders.schema import DataError
from utils.seeding import generator

from .aggregation import Tensors
from .client import HELDOUT_ALIGNMENT  # the metric report_score lies about
from .strategies import StrategyConfig

ATTACKS = ("sign_flip", "gaussian", "scale", "alie", "ipm", "report_score")
IN_RANGE = ("alie", "ipm")        # computed from the honest updates of the round


def choose_byzantine(names: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` distinct training clients, in name order, from (seed, 'byzantine') alone."""
    names = sorted(names)
    if not 0 <= count <= len(names):
        raise ValueError(f"cannot pick {count} Byzantine clients among {len(names)}")
    pick = torch.randperm(len(names), generator=generator(seed, "byzantine"))[:count].tolist()
    return sorted(names[i] for i in pick)


def corrupt_state(global_state: Tensors, client_state: Tensors, attack: str, *, scale: float, std: float,
                  gen: torch.Generator | None = None) -> Tensors:
    """The weights a Byzantine client sends instead of `client_state` (float64 math, dtypes kept); noise is
    drawn on the CPU in sorted key order, the same on every device and engine."""
    if attack not in ("sign_flip", "scale", "gaussian"):
        raise ValueError(f"corrupt_state: --attack {attack!r} is not a per-client attack (sign_flip, scale, "
                         "gaussian); alie and ipm need the round's honest updates (corrupt_replies)")
    if attack == "gaussian" and gen is None:
        raise ValueError("the gaussian attack needs a generator")

    def new(key: str) -> torch.Tensor:
        w, w_k = global_state[key].to(torch.float64), client_state[key].to(torch.float64)
        if attack == "sign_flip":
            return w - scale * (w_k - w)
        if attack == "scale":
            return w + scale * (w_k - w)
        return w_k + std * torch.randn(w_k.shape, generator=gen, dtype=torch.float64).to(w_k.device)
    return per_key(client_state, new)


def per_key(ref: Tensors, new) -> Tensors:
    """new(key) for each floating tensor of `ref` in sorted key order (float64, cast back to its dtype);
    other tensors copied."""
    return {k: new(k).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in sorted(ref.items())}


def alie_z(n: int, m: int) -> float:
    """ALIE's z_max = Φ⁻¹((n - s)/n), s = ⌊n/2 + 1⌋ - m kept in [1, n - 1]: with n = 10, m = 1 it is
    Φ⁻¹(0.5) = 0 (the attack is the honest mean and does nothing), m = 2: 0.253, m = 3: 0.524."""
    if n < 2:
        return 0.0
    s = min(max(n // 2 + 1 - m, 1), n - 1)
    return NormalDist().inv_cdf((n - s) / n)


def in_range_state(global_state: Tensors, honest: Sequence[Tensors], attack: str, *, z: float = 0.0,
                   eps: float = 0.0) -> Tensors:
    """The weights every ALIE (w + μ - z·σ) or IPM (w - ε·μ) attacker sends, from the honest states."""
    if attack not in IN_RANGE or not honest:
        raise ValueError(f"in_range_state needs --attack alie or ipm and at least one honest state, got {attack!r}")

    def new(key: str) -> torch.Tensor:
        w = global_state[key].to(torch.float64)
        updates = torch.stack([h[key].to(torch.float64) - w for h in honest])
        mu = updates.mean(dim=0)
        return w + mu - z * updates.std(dim=0, correction=0) if attack == "alie" else w - eps * mu
    return per_key(honest[0], new)


def corrupt_replies(replies: Sequence, global_state: Tensors, byzantine: Sequence[str], attack: str, *,
                    scale: float, std: float, seed: int, round_: int, eps: float = 0.5,
                    report: float = 0.0) -> list:
    """The replies with each Byzantine client's state (report_score: its reported score) replaced, as
    copies; ALIE's and IPM's honest statistics are taken in name order, whoever replied first."""
    bad = set(byzantine)
    sent = None
    if attack in IN_RANGE and any(r.name in bad for r in replies):
        ordered = sorted(replies, key=lambda r: r.name)
        honest = [r.state for r in ordered if r.name not in bad] or [r.state for r in ordered]
        m = sum(r.name in bad for r in replies)
        sent = in_range_state(global_state, honest, attack, z=alie_z(len(replies), m), eps=eps)
    out = []
    for r in replies:
        if r.name in bad:
            if attack == "report_score":
                r = dataclasses.replace(r, metrics={**(getattr(r, "metrics", None) or {}), HELDOUT_ALIGNMENT: report})
            elif sent is not None:
                r = dataclasses.replace(r, state={k: v.clone() for k, v in sent.items()})
            else:
                gen = generator(seed, "attack", r.name, round_)
                r = dataclasses.replace(r, state=corrupt_state(global_state, r.state, attack, scale=scale, std=std,
                                                               gen=gen))
        out.append(r)
    return out


@dataclass(frozen=True)
class AttackConfig:
    """Simulated Byzantine clients: how many, and what they send (--byzantine, --attack*)."""

    byzantine: int = 0
    attack: str = "sign_flip"
    scale: float = 10.0
    std: float = 1.0
    eps: float = 0.5       # ipm
    report: float = 0.0    # report_score

    def validate(self, num_train_clients: int, strategy: StrategyConfig, m: int) -> list[str]:
        """Raise DataError for unusable settings; return warnings about weak defences (m clients sampled)."""
        n = self.byzantine
        if n < 0:
            raise DataError(f"--byzantine {n} must be >= 0", "0 means no attacker")
        if n >= num_train_clients and n > 0:
            raise DataError(f"--byzantine {n} leaves no honest client among the {num_train_clients} training clients",
                            f"use at most {num_train_clients - 1}")
        if self.scale < 0:
            raise DataError(f"--attack_scale {self.scale} must be >= 0",
                            "sign_flip already reverses the update; use --attack scale to boost it")
        if self.std < 0:
            raise DataError(f"--attack_std {self.std} must be >= 0", "try 1.0")
        if not self.eps >= 0:
            raise DataError(f"--attack_eps {self.eps} must be >= 0",
                            "0.5 stays inside the honest range; ~100 defeats the mean")
        if not math.isfinite(self.report):
            raise DataError(f"--attack_report {self.report} must be finite (the server refuses a non-finite report: "
                            "the run would stop at once)", "try 0.0, the worst possible score")
        warnings = []
        name, trim = strategy.name, strategy.trim_fraction
        if n and self.attack == "alie" and alie_z(m, min(n, m)) == 0:
            warnings.append(f"--attack alie with {n} Byzantine client(s) among {m} sampled is void: z = Φ⁻¹(0.5) = 0, "
                            "so the attackers send the honest mean (use more --byzantine, e.g. 3 of 10 gives z = 0.52)")
        if n and self.attack == "report_score" and name not in ("qfedavg", "adaptive"):
            warnings.append(f"--attack report_score does nothing with --strategy {name}, which reads no reported "
                            "scores (qfedavg and adaptive do)")
        if n and name == "trimmed_mean" and int(trim * m) < min(n, m):
            warnings.append(f"--trim_fraction {trim} drops {int(trim * m)} value(s) per end "
                            f"of {m}, fewer than the {n} Byzantine client(s): the trimmed mean is not bounded")
        if n and name == "median" and 2 * min(n, m) >= m:
            warnings.append(f"median with {n} Byzantine client(s) among {m} sampled: at least half may be Byzantine")
        return warnings
