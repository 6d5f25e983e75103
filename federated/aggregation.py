"""FedAvg aggregation as pure functions (method.md §5): θ ← Σ_g p_g θ_g, p_g ∝ the client's local
training questions (dataset_size, paper), the points of its first local episode of the round
(episode_points, released code) or equal (uniform); and the float64 helpers the other rules share."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

WEIGHTINGS = ("dataset_size", "episode_points", "uniform")
Tensors = dict[str, torch.Tensor]


def float_keys(state: Tensors) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def client_update(global_state: Tensors, client_state: Tensors) -> Tensors:
    """Δ = θ_k - θ over the floating tensors, in float64."""
    return {k: client_state[k].to(torch.float64) - global_state[k].to(torch.float64) for k in float_keys(global_state)}


def l2_norm(update: Tensors) -> float:
    """||Δ||₂ over all tensors jointly, keys in sorted order."""
    return math.sqrt(sum(float(update[k].pow(2).sum()) for k in sorted(update)))


def raw_weights(dataset_sizes: Sequence[float], episode_points: Sequence[float], mode: str) -> list[float]:
    """Unnormalised p_g for each replying client (SecAgg+ sums them in the clear and normalises itself)."""
    if mode not in WEIGHTINGS:
        raise ValueError(f"--weighting {mode!r}: choose one of {', '.join(WEIGHTINGS)}")
    by_mode = {"dataset_size": dataset_sizes, "episode_points": episode_points, "uniform": [1.0] * len(dataset_sizes)}
    return [float(n) for n in by_mode[mode]]


def aggregation_weights(dataset_sizes: Sequence[float], episode_points: Sequence[float], mode: str) -> list[float]:
    """Normalised p_g for each replying client."""
    raw = raw_weights(dataset_sizes, episode_points, mode)
    total = sum(raw)
    if not raw or total <= 0:
        raise ValueError(f"cannot aggregate: weights {raw} (mode {mode}) have no positive mass")
    return [r / total for r in raw]


def weighted_average(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_g w_g · state_g per tensor in float64, cast back to each dtype; clients summed in the given
    order (callers sort them by name, so the result never depends on who replied first)."""
    if len(states) != len(weights) or not states:
        raise ValueError("need one weight per state and at least one state")
    out = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():  # e.g. integer buffers: take the first client's
            out[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += w * state[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def aggregate(replies: Sequence, weighting: str) -> dict[str, torch.Tensor]:
    """FedAvg's server update on both engines: replies (federated.client.FitResult) in name order,
    never reply order, weights from `weighting`, float64 sums."""
    replies = sorted(replies, key=lambda r: r.name)
    w = aggregation_weights([r.num_examples for r in replies], [r.episode_points for r in replies], weighting)
    return weighted_average([r.state for r in replies], w)


def num_sampled_clients(num_clients: int, fraction: float) -> int:
    """How many clients a round samples: max(1, round(fraction·n)), the one place this is decided
    (the sampler, DP's sampling rate, the strategy and attack checks all read it)."""
    return max(1, round(fraction * num_clients))


def sample_clients(names: Sequence[str], fraction: float, gen: torch.Generator) -> list[str]:
    """num_sampled_clients clients without replacement, in name order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--client_fraction {fraction} must be in (0, 1]")
    n = num_sampled_clients(len(names), fraction)
    if n == len(names):
        return sorted(names)
    pick = torch.randperm(len(names), generator=gen)[:n].tolist()
    return sorted(names[i] for i in pick)
