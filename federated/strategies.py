"""Server aggregation strategies beyond FedAvg (issue 14), each optionally followed by a server optimizer (FedOpt) on
the aggregate's delta. Every rule is a pure function of the replies (sorted by name, sums in float64); what must
survive a --resume lives in `Strategy.state_dict()`. Formulas, defaults and sources: docs/strategies_privacy.md."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from data_loaders.schema import DataError

from .aggregation import Tensors, aggregation_weights, float_keys, weighted_average
from .aggregation import aggregate as fedavg_aggregate
from .client import HELDOUT_ALIGNMENT

STRATEGIES = ("fedavg", "fedprox", "qfedavg", "adaptive", "trimmed_mean", "median")
SERVER_OPTS = ("none", "sgd", "adam", "yogi")
# sgd 1.0 is FedAvg itself; adam/yogi move a coordinate by at most about server_lr per round
# (|m|/(sqrt(v)+tau) <= ~1), so 1e-3 is about one round of client progress (6 Adam steps at 3e-4).
DEFAULT_SERVER_LR = {"sgd": 1.0, "adam": 1e-3, "yogi": 1e-3}
QFFL_MIN_LOSS = 1e-10  # F_k floor: with every client perfect (F = 0) the weights ω_k F_k^q would sum to 0
DEFAULT_MAX_WEIGHT_RATIO = 3.0  # one liar of 10 under adaptive: weight 0.997 uncapped, 0.3 capped


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01
    qffl_q: float = 0.1
    adaptive_temperature: float = 0.1
    adaptive_window: int = 5
    trim_fraction: float = 0.2
    max_weight_ratio: float = DEFAULT_MAX_WEIGHT_RATIO  # qfedavg/adaptive: p_k <= ratio · (FedAvg weight)
    server_opt: str = "none"
    server_lr: float | None = None   # None: DEFAULT_SERVER_LR[server_opt]
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3

    def validate(self) -> None:
        c = self

        def bad(flag, value, why, hint):
            raise DataError(f"{flag} {value}: {why}", hint)

        if c.name not in STRATEGIES:
            bad("--strategy", c.name, "unknown", f"choose one of {', '.join(STRATEGIES)}")
        if c.server_opt not in SERVER_OPTS:
            bad("--server_opt", c.server_opt, "unknown", f"choose one of {', '.join(SERVER_OPTS)}")
        if not c.proximal_mu >= 0:
            bad("--proximal_mu", c.proximal_mu, "must be >= 0", "the FedProx paper tries 0.001, 0.01, 0.1, 1")
        if not c.qffl_q >= 0:
            bad("--qffl_q", c.qffl_q, "must be >= 0", "q = 0 is uniform averaging; Flower's QFedAvg default is 0.1")
        if not c.max_weight_ratio >= 1:
            bad("--max_weight_ratio", c.max_weight_ratio, "must be >= 1 (below 1 the capped weights cannot sum to 1)",
                f"{DEFAULT_MAX_WEIGHT_RATIO} lets a client count at most {DEFAULT_MAX_WEIGHT_RATIO:g} times its FedAvg share")
        if not c.adaptive_temperature > 0:
            bad("--adaptive_temperature", c.adaptive_temperature, "must be > 0", "try 0.1")
        if c.adaptive_window < 1:
            bad("--adaptive_window", c.adaptive_window, "must be >= 1", "try 5")
        if not 0 <= c.trim_fraction < 0.5:
            bad("--trim_fraction", c.trim_fraction, "must be in [0, 0.5)", "0.2 drops 1 of 5-9 clients at each end")
        if c.server_lr is not None and not c.server_lr > 0:
            bad("--server_lr", c.server_lr, "must be > 0", "leave it out for the per-optimizer default")
        if c.server_lr is not None and c.server_opt == "none":  # the plain aggregate takes no step size
            bad("--server_lr", c.server_lr, "has no effect without --server_opt (it is the server optimizer's step)",
                "add --server_opt sgd (1.0 is FedAvg), adam or yogi, or drop --server_lr")
        for flag, value in (("--server_beta1", c.server_beta1), ("--server_beta2", c.server_beta2)):
            if not 0 <= value < 1:
                bad(flag, value, "must be in [0, 1)", "Reddi et al. use 0.9 and 0.99")
        if not c.server_tau > 0:
            bad("--server_tau", c.server_tau, "must be > 0", "Reddi et al. and Flower use 1e-3")

    def warnings(self, m: int) -> list[str]:
        """What is worth printing about these settings with `m` clients sampled per round."""
        c = self
        warnings = []
        if c.name == "trimmed_mean" and trim_count(m, c.trim_fraction) == 0:
            warnings.append(f"--trim_fraction {c.trim_fraction} trims nothing with {m} sampled clients "
                            f"(floor({c.trim_fraction}·{m}) = 0): trimmed_mean is the plain mean here")
        if c.name in ("trimmed_mean", "median") and m < 3:
            warnings.append(f"--strategy {c.name} with {m} sampled client(s) cannot discard anyone")
        if c.name not in ("qfedavg", "adaptive") and c.max_weight_ratio != StrategyConfig.max_weight_ratio:
            warnings.append(f"--max_weight_ratio {c.max_weight_ratio} has no effect with --strategy {c.name}")
        if c.name != "fedprox" and c.proximal_mu != StrategyConfig.proximal_mu:
            warnings.append(f"--proximal_mu {c.proximal_mu} has no effect with --strategy {c.name}")
        return warnings


def reported_score(reply) -> tuple[float, bool]:
    """(the client's held-out alignment clamped to [0, 1], whether it had to be). Outside [0, 1] a score
    is a lie or a bug, and unclamped it would buy the client all the weight (AS = -50 under adaptive)."""
    metrics = getattr(reply, "metrics", None) or {}
    if HELDOUT_ALIGNMENT not in metrics:
        raise ValueError(f"client {reply.name!r} sent no {HELDOUT_ALIGNMENT!r} metric, which this strategy needs "
                         "(the client reports it when the strategy lists it in required_metrics)")
    value = float(metrics[HELDOUT_ALIGNMENT])
    if not math.isfinite(value):
        raise DataError(f"client {reply.name!r} reported {HELDOUT_ALIGNMENT} = {value}: a non-finite score is refused, "
                        "not clamped (it is a broken or lying client)",
                        "check that client's held-out questions, or leave it out of --train_groups")
    clamped = min(max(value, 0.0), 1.0)
    return clamped, clamped != value


def _finish(agg64: Tensors, ref: Tensors, first_client: Tensors) -> Tensors:
    """float64 results cast back to `ref`'s dtypes; non-float tensors from the first client, as weighted_average."""
    return {k: agg64[k].to(v.dtype) if k in agg64 else first_client[k].clone() for k, v in ref.items()}


def order_statistic_mean(states: Sequence[Tensors], cut: int) -> Tensors:
    """Per coordinate: sort the n client values, drop `cut` from each end, average the rest (float64)."""
    n = len(states)
    if not 0 <= 2 * cut < n:
        raise ValueError(f"cannot drop {cut} values from each end of {n}")
    out = {}
    for key in float_keys(states[0]):
        stacked = torch.stack([s[key].to(torch.float64) for s in states])
        out[key] = stacked.sort(dim=0).values[cut:n - cut].mean(dim=0)
    return out


def trim_count(n: int, beta: float) -> int:
    """floor(beta·n) as Flower's trim_mean computes it (int() of the float product)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim fraction {beta} must be in [0, 0.5)")
    return int(beta * n)


def trimmed_mean(states: Sequence[Tensors], beta: float) -> Tensors:
    return _finish(order_statistic_mean(states, trim_count(len(states), beta)), states[0], states[0])


def coordinate_median(states: Sequence[Tensors]) -> Tensors:
    # keeping the middle one (odd n) or two (even n) values is numpy's median
    return _finish(order_statistic_mean(states, (len(states) - 1) // 2), states[0], states[0])


def qffl_losses(alignments: Sequence[float]) -> list[float]:
    """F_k = 1 - AS_k (the client's mean held-out distance, AS_k clamped), floored at QFFL_MIN_LOSS."""
    return [max(1.0 - a, QFFL_MIN_LOSS) for a in alignments]


def qffl_weights(base: Sequence[float], losses: Sequence[float], q: float) -> list[float]:
    """q-FFL's p_k = ω_k F_k^q / Σ_j ω_j F_j^q, ω the FedAvg weights; q = 0 returns ω itself, bit for bit."""
    if q == 0:
        return list(base)
    tilted = [w * math.pow(f, q) for w, f in zip(base, losses)]
    total = sum(tilted)
    return [t / total for t in tilted]


def cap_weights(weights: Sequence[float], base: Sequence[float], ratio: float) -> tuple[list[float], int]:
    """(weights with p_k <= ratio·base_k, how many were capped): a capped client sits at its cap, the rest of
    the mass goes to the others in proportion, until none exceeds its cap; uncapped weights come back as given."""
    if ratio < 1:
        raise ValueError(f"a weight cap of {ratio} times the FedAvg weight cannot hold total weight 1")
    caps = [ratio * b for b in base]
    capped: set[int] = set()
    out = list(weights)
    while True:
        over = {i for i, (p, c) in enumerate(zip(out, caps)) if i not in capped and p > c}
        if not over:
            return out, len(capped)
        capped |= over
        # room stays > 0 and someone stays free: the newly capped held more than their caps
        free = [i for i in range(len(out)) if i not in capped]
        room = 1.0 - sum(caps[i] for i in capped)
        share = weights if sum(weights[i] for i in free) > 0 else base  # all-zero weights: by base
        mass = sum(share[i] for i in free)
        out = [caps[i] if i in capped else share[i] * room / mass for i in range(len(out))]


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    e = [math.exp(s - top) for s in scores]
    total = sum(e)
    return [x / total for x in e]


def adaptive_weights(history: Mapping[str, Sequence[float]], names: Sequence[str],
                     temperature: float, window: int) -> list[float]:
    """p_k = softmax_k((1 - mean of client k's last `window` alignments) / T): the worse, the heavier."""
    means = []
    for n in names:
        recent = list(history[n])[-window:]
        means.append(sum(recent) / len(recent))
    return softmax([(1.0 - m) / temperature for m in means])


def weighted_delta(global_state: Tensors, states: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Σ_k p_k (w_k - w) in float64, clients in the given order."""
    out = {}
    for key in float_keys(global_state):
        w = global_state[key].to(torch.float64)
        acc = torch.zeros_like(w)
        for state, p in zip(states, weights):
            acc += p * (state[key].to(torch.float64) - w)
        out[key] = acc
    return out


# --- server optimizer (FedOpt) ---------------------------------------------------------

def server_opt_step(global_state: Tensors, delta: Tensors, cfg: StrategyConfig, opt: dict) -> Tensors:
    """w + the server optimizer's step on the aggregate delta Δ (float64), updating `opt` ({"step", "m", "v"})
    as Flower's FedAdam/FedYogi do (formulas: docs/strategies_privacy.md)."""
    lr = DEFAULT_SERVER_LR[cfg.server_opt] if cfg.server_lr is None else cfg.server_lr
    opt["step"] += 1
    t, b1, b2, tau = opt["step"], cfg.server_beta1, cfg.server_beta2, cfg.server_tau
    if cfg.server_opt == "adam":
        lr = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    out = {}
    for key, d in delta.items():
        w = global_state[key].to(torch.float64)
        if cfg.server_opt == "sgd":
            out[key] = w + lr * d
            continue
        m = opt["m"].get(key, torch.zeros_like(d)).to(d.device)
        v = opt["v"].get(key, torch.zeros_like(d)).to(d.device)
        m = b1 * m + (1 - b1) * d
        d2 = d * d
        v = b2 * v + (1 - b2) * d2 if cfg.server_opt == "adam" else v - (1 - b2) * d2 * torch.sign(v - d2)
        opt["m"][key], opt["v"][key] = m, v
        out[key] = w + lr * m / (v.sqrt() + tau)
    return out


# --- the strategy object ----------------------------------------------------------------

class Strategy:
    """One aggregation rule and its server state; a DP wrapper calls `apply_delta` with its noisy mean delta."""

    def __init__(self, cfg: StrategyConfig = StrategyConfig()):
        cfg.validate()
        self.cfg = cfg
        self.history: dict[str, list[float]] = {}   # adaptive: last W alignments per client
        self.opt: dict = {"step": 0, "m": {}, "v": {}}
        self.last_info: dict = {}                   # the last round's numbers for the logs

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """Metrics each client must put in its reply (computed only when listed)."""
        return (HELDOUT_ALIGNMENT,) if self.cfg.name in ("qfedavg", "adaptive") else ()

    def client_config(self, round_: int) -> dict:
        return {"proximal_mu": self.cfg.proximal_mu} if self.cfg.name == "fedprox" else {}

    def aggregate(self, global_state: Tensors, replies: Sequence, round_: int, weighting: str) -> Tensors:
        if not replies:
            raise ValueError("cannot aggregate: no client replied")
        replies = sorted(replies, key=lambda r: r.name)
        states = [r.state for r in replies]
        name, opt = self.cfg.name, self.cfg.server_opt
        self.last_info = {}
        if name in ("fedavg", "fedprox") and opt == "none":
            return fedavg_aggregate(list(replies), weighting)
        if name in ("trimmed_mean", "median"):
            cut = (trim_count(len(states), self.cfg.trim_fraction) if name == "trimmed_mean"
                   else (len(states) - 1) // 2)
            agg = order_statistic_mean(states, cut)
            if opt == "none":
                return _finish(agg, global_state, states[0])
            return self.apply_delta(global_state, {k: agg[k] - global_state[k].to(torch.float64) for k in agg},
                                    round_, states[0])
        weights = self._weights(replies, weighting)
        if opt == "none":  # w + Σ p_k (w_k - w) = Σ p_k w_k: summed as FedAvg sums, so q = 0 is FedAvg exactly
            return weighted_average(states, weights)
        return self.apply_delta(global_state, weighted_delta(global_state, states, weights), round_, states[0])

    def _weights(self, replies: Sequence, weighting: str) -> list[float]:
        """The averaging weights: --weighting's, or qfedavg's and adaptive's (capped, reported in last_info)."""
        base = aggregation_weights([r.num_examples for r in replies], [r.episode_points for r in replies], weighting)
        if self.cfg.name not in ("qfedavg", "adaptive"):
            return base
        scores = [reported_score(r) for r in replies]
        if self.cfg.name == "qfedavg":
            raw = qffl_weights(base, qffl_losses([a for a, _ in scores]), self.cfg.qffl_q)
        else:
            base = [1.0 / len(replies)] * len(replies)  # adaptive ignores --weighting: its cap is ratio / n
            for r, (a, _) in zip(replies, scores):
                self.history[r.name] = (self.history.get(r.name, []) + [a])[-self.cfg.adaptive_window:]
            raw = adaptive_weights(self.history, [r.name for r in replies], self.cfg.adaptive_temperature,
                                   self.cfg.adaptive_window)
        weights, capped = cap_weights(raw, base, self.cfg.max_weight_ratio)
        self.last_info = {"max_client_weight": max(weights), "capped_clients": capped,
                          "clamped_reports": sum(c for _, c in scores)}
        return weights

    def apply_delta(self, global_state: Tensors, delta: Tensors, round_: int,
                    non_float_from: Tensors | None = None) -> Tensors:
        """w + Δ (server_opt none) or the server optimizer's step on Δ (float64 in, dtypes out)."""
        if self.cfg.server_opt == "none":
            new = {k: global_state[k].to(torch.float64) + d for k, d in delta.items()}
        else:
            new = server_opt_step(global_state, delta, self.cfg, self.opt)
        return _finish(new, global_state, non_float_from or global_state)

    def state_dict(self) -> dict:
        return {"name": self.cfg.name, "server_opt": self.cfg.server_opt,
                "history": {k: list(v) for k, v in self.history.items()},
                "opt": {"step": self.opt["step"], "m": dict(self.opt["m"]), "v": dict(self.opt["v"])}}

    def load_state_dict(self, state: dict) -> None:
        for key, flag in (("name", "--strategy"), ("server_opt", "--server_opt")):
            if state[key] != getattr(self.cfg, key):
                raise DataError(f"the checkpoint was written with {flag} {state[key]}, this run asks for "
                                f"{getattr(self.cfg, key)}",
                                f"resume with {flag} {state[key]}, or start a new run (--out_dir)")
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.opt = {"step": int(state["opt"]["step"]), "m": dict(state["opt"]["m"]), "v": dict(state["opt"]["v"])}
