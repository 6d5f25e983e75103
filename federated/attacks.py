"""Byzantine clients for robustness experiments (issue 14): who attacks, and what they send.

The attackers are drawn once from (seed, "byzantine") among the training clients, so the
same clients attack on every engine and after a resume. An attacker trains honestly, then
replaces its weights w_k before replying, given the global weights w it received:

  sign_flip  w - c·(w_k - w)     its update reversed and scaled
  scale      w + c·(w_k - w)     its update boosted (model replacement when c ≈ #clients)
  gaussian   w_k + N(0, σ²)      per coordinate, from generator(seed, "attack", client, round)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from data_loaders.schema import DataError
from utils.seeding import generator

ATTACKS = ("sign_flip", "gaussian", "scale")
Tensors = dict[str, torch.Tensor]


def choose_byzantine(names: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` distinct training clients, in name order, from (seed, 'byzantine') alone."""
    names = sorted(names)
    if not 0 <= count <= len(names):
        raise ValueError(f"cannot pick {count} Byzantine clients among {len(names)}")
    pick = torch.randperm(len(names), generator=generator(seed, "byzantine"))[:count].tolist()
    return sorted(names[i] for i in pick)


def corrupt_state(global_state: Tensors, client_state: Tensors, attack: str, *, scale: float, std: float,
                  gen: torch.Generator | None = None) -> Tensors:
    """The weights a Byzantine client sends instead of `client_state` (float64 math, dtypes kept).
    Noise is drawn on the CPU in sorted key order, so every device and engine (a state dict's
    order changes through checkpoints and Flower records) gets the same values."""
    if attack not in ATTACKS:
        raise ValueError(f"--attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    if attack == "gaussian" and gen is None:
        raise ValueError("the gaussian attack needs a generator")
    out = {}
    for key in sorted(client_state):
        wk = client_state[key]
        if not wk.is_floating_point():
            out[key] = wk.clone()
            continue
        w, w_k = global_state[key].to(torch.float64), wk.to(torch.float64)
        if attack == "sign_flip":
            new = w - scale * (w_k - w)
        elif attack == "scale":
            new = w + scale * (w_k - w)
        else:
            noise = torch.randn(wk.shape, generator=gen, dtype=torch.float64)
            new = w_k + std * noise.to(wk.device)
        out[key] = new.to(wk.dtype)
    return out


def corrupt_replies(replies: Sequence, global_state: Tensors, byzantine: Sequence[str], attack: str, *,
                    scale: float, std: float, seed: int, round_: int) -> list:
    """The replies with each Byzantine client's state replaced (dataclass copies; others untouched)."""
    bad = set(byzantine)
    out = []
    for r in replies:
        if r.name in bad:
            gen = generator(seed, "attack", r.name, round_)
            r = dataclasses.replace(r, state=corrupt_state(global_state, r.state, attack, scale=scale, std=std,
                                                           gen=gen))
        out.append(r)
    return out


def add_attack_arguments(group) -> None:
    group.add_argument("--byzantine", type=int, default=0,
                       help="number of Byzantine training clients, drawn once from --seed (0 = none)")
    group.add_argument("--attack", default="sign_flip", choices=ATTACKS,
                       help="what a Byzantine client sends: sign_flip w - c(w_k - w), scale w + c(w_k - w), "
                            "gaussian w_k + N(0, std²)")
    group.add_argument("--attack_scale", type=float, default=10.0,
                       help="c of sign_flip and scale (10 ≈ the number of clients: enough for one attacker "
                            "to outweigh FedAvg's 1/n)")
    group.add_argument("--attack_std", type=float, default=1.0,
                       help="gaussian: noise std per coordinate (far above one round's update, ~1e-3)")


def check_attack_flags(args, num_train_clients: int) -> list[str]:
    """Raise DataError for unusable attack flags; return warnings about weak defences."""
    n = args.byzantine
    if n < 0:
        raise DataError(f"--byzantine {n} must be >= 0", "0 means no attacker")
    if n >= num_train_clients and n > 0:
        raise DataError(f"--byzantine {n} leaves no honest client among the {num_train_clients} training clients",
                        f"use at most {num_train_clients - 1}")
    if args.attack_scale < 0:
        raise DataError(f"--attack_scale {args.attack_scale} must be >= 0",
                        "sign_flip already reverses the update; use --attack scale to boost it")
    if args.attack_std < 0:
        raise DataError(f"--attack_std {args.attack_std} must be >= 0", "try 1.0")
    warnings = []
    strategy = getattr(args, "strategy", "fedavg")
    m = max(1, round(getattr(args, "client_fraction", 1.0) * num_train_clients))
    if n and strategy == "trimmed_mean" and int(args.trim_fraction * m) < min(n, m):
        warnings.append(f"--trim_fraction {args.trim_fraction} drops {int(args.trim_fraction * m)} value(s) per end "
                        f"of {m}, fewer than the {n} Byzantine client(s): the trimmed mean is not bounded")
    if n and strategy == "median" and 2 * min(n, m) >= m:
        warnings.append(f"median with {n} Byzantine client(s) among {m} sampled: at least half may be Byzantine")
    return warnings
