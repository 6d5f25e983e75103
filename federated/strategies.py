"""Server aggregation strategies beyond FedAvg: pure rules plus a small server state (issue 14).

A `Strategy` turns the global weights and the sampled clients' replies into the next global
weights. Every rule is a pure function of its inputs (clients sorted by name, sums in
float64); what must survive a --resume (server-optimizer moments, the adaptive rule's
alignment history) lives in `Strategy.state_dict()`, tensors and plain values only.

  fedavg        today's federated.fedavg.aggregate, bit for bit (the default)
  fedprox       server: fedavg; client: adds proximal_penalty() to its local loss
  qfedavg       q-FFL server step (Li et al., ICLR 2020) with F_k = 1 - held-out alignment
  adaptive      p_k = softmax_k((1 - mean of the client's last W alignments) / T)
  trimmed_mean  coordinate-wise mean after dropping floor(beta*n) lowest and highest values
  median        coordinate-wise median (numpy: mean of the two middle values for even n)

A server optimizer (FedOpt, Reddi et al., ICLR 2021: sgd, adam, yogi) can be applied to
the aggregate's delta for every rule but qfedavg, whose step already has its own size.
Formulas, defaults and sources: docs/strategies_privacy.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from data_loaders.schema import DataError
from training.local import proximal_penalty  # noqa: F401 - the client side of fedprox, kept with local steps

from .aggregation import aggregation_weights, weighted_average

STRATEGIES = ("fedavg", "fedprox", "qfedavg", "adaptive", "trimmed_mean", "median")
SERVER_OPTS = ("none", "sgd", "adam", "yogi")
# sgd 1.0 is FedAvg itself; adam/yogi move a coordinate by at most about server_lr per round
# (|m|/(sqrt(v)+tau) <= ~1), so 1e-3 is about one round of client progress (6 Adam steps at 3e-4).
DEFAULT_SERVER_LR = {"sgd": 1.0, "adam": 1e-3, "yogi": 1e-3}
ALIGNMENT_KEY = "heldout_alignment"
QFFL_MIN_LOSS = 1e-10  # F_k floor: a perfectly aligned client (F = 0) would make F^(q-1) infinite

Tensors = dict[str, torch.Tensor]


class Reply(Protocol):
    """What a strategy reads from a client's reply (federated.client.FitResult plus `metrics`)."""

    name: str
    state: Tensors
    num_examples: int
    episode_points: int
    losses: list[float]


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01
    qffl_q: float = 0.1
    client_lr: float = 3e-4          # q-FFL's Lipschitz estimate is L = 1 / client_lr
    adaptive_temperature: float = 0.1
    adaptive_window: int = 5
    trim_fraction: float = 0.2
    server_opt: str = "none"
    server_lr: float | None = None   # None: DEFAULT_SERVER_LR[server_opt]
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3


# --- pure rules ------------------------------------------------------------------------

def float_keys(state: Tensors) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def client_metric(reply: Reply, key: str) -> float:
    """A number the client reported in reply.metrics, checked finite; names the client if absent."""
    metrics = getattr(reply, "metrics", None) or {}
    if key not in metrics:
        raise ValueError(f"client {reply.name!r} sent no {key!r} metric, which this strategy needs "
                         "(the client reports it when the strategy lists it in required_metrics)")
    value = float(metrics[key])
    if not math.isfinite(value):
        raise ValueError(f"client {reply.name!r} reported {key} = {value}")
    return value


def _finish(agg64: Tensors, ref: Tensors, first_client: Tensors) -> Tensors:
    """Cast float64 results back to each tensor's dtype; non-float tensors from the first client
    in name order, as weighted_average does."""
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


def qffl_losses(alignments: Sequence[float], names: Sequence[str]) -> list[float]:
    """F_k = 1 - AS_k (the client's mean held-out distance under the global weights), floored at
    QFFL_MIN_LOSS; an alignment above 1 is not a score and is refused."""
    out = []
    for a, name in zip(alignments, names):
        if a > 1:
            raise ValueError(f"client {name!r} reported {ALIGNMENT_KEY} = {a} > 1, so F = 1 - AS < 0; "
                             "q-FFL needs F > 0 (an alignment score is 1 - a distance in [0, 1])")
        out.append(max(1.0 - a, QFFL_MIN_LOSS))
    return out


def qffl_update(global_state: Tensors, states: Sequence[Tensors], losses: Sequence[float],
                q: float, lipschitz: float) -> Tensors:
    """q-FFL server step in float64: Δ_k = L(w - w_k), h_k = q F_k^(q-1) ||Δ_k||² + L F_k^q,
    w <- w - Σ F_k^q Δ_k / Σ h_k.  With q = 0 every h_k = L and the step is the uniform mean."""
    keys = float_keys(global_state)
    w = {k: global_state[k].to(torch.float64) for k in keys}
    sum_delta = {k: torch.zeros_like(w[k]) for k in keys}
    sum_h = 0.0
    for state, f in zip(states, losses):
        if not f > 0:
            raise ValueError(f"q-FFL needs every F_k > 0, got {f}")
        delta = {k: lipschitz * (w[k] - state[k].to(torch.float64)) for k in keys}
        norm2 = sum(float(delta[k].pow(2).sum()) for k in sorted(delta))
        f_q = math.pow(f, q)
        sum_h += q * math.pow(f, q - 1) * norm2 + lipschitz * f_q
        for k in keys:
            sum_delta[k] += f_q * delta[k]
    return {k: w[k] - sum_delta[k] / sum_h for k in keys}


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    e = [math.exp(s - top) for s in scores]
    total = sum(e)
    return [x / total for x in e]


def adaptive_weights(history: Mapping[str, Sequence[float]], names: Sequence[str],
                     temperature: float, window: int) -> list[float]:
    """p_k = softmax_k((1 - mean of the last `window` alignments of client k) / T): the worse a
    client's recent held-out alignment, the more its weights count."""
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
    """w <- w + server step on the aggregate delta Δ (float64); `opt` ({"step", "m", "v"}) is updated.

    sgd:  w + η Δ
    adam: m = β1 m + (1-β1) Δ, v = β2 v + (1-β2) Δ², w + η sqrt(1-β2^t)/(1-β1^t) · m / (sqrt(v) + τ)
    yogi: m as adam, v = v - (1-β2) Δ² sign(v - Δ²), w + η m / (sqrt(v) + τ)
    with t the number of server steps so far, m and v starting at 0 (as Flower's FedAdam/FedYogi).
    """
    lr = resolved_server_lr(cfg)
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


def resolved_server_lr(cfg: StrategyConfig) -> float:
    return DEFAULT_SERVER_LR[cfg.server_opt] if cfg.server_lr is None else cfg.server_lr


# --- the strategy object ----------------------------------------------------------------

class Strategy:
    """One aggregation rule and its server state.  The engine calls, each round:
    `client_config(round_)` (sent with the weights), then `aggregate(global, replies, round_,
    weighting)`; a DP wrapper calls `apply_delta` with its noisy mean delta instead."""

    def __init__(self, cfg: StrategyConfig = StrategyConfig()):
        check_strategy_config(cfg)
        self.cfg = cfg
        self.history: dict[str, list[float]] = {}   # adaptive: last W alignments per client
        self.opt: dict = {"step": 0, "m": {}, "v": {}}

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def uses_weighting(self) -> bool:
        """Only the FedAvg-style rules read --weighting; the others ignore it."""
        return self.cfg.name in ("fedavg", "fedprox")

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """Metrics each client must put in its reply (costly ones are computed only when listed)."""
        return (ALIGNMENT_KEY,) if self.cfg.name in ("qfedavg", "adaptive") else ()

    def client_config(self, round_: int) -> dict:
        return {"proximal_mu": self.cfg.proximal_mu} if self.cfg.name == "fedprox" else {}

    def aggregate(self, global_state: Tensors, replies: Sequence[Reply], round_: int,
                  weighting: str) -> Tensors:
        if not replies:
            raise ValueError("cannot aggregate: no client replied")
        replies = sorted(replies, key=lambda r: r.name)
        states = [r.state for r in replies]
        name, opt = self.cfg.name, self.cfg.server_opt
        if name in ("fedavg", "fedprox") and opt == "none":
            # imported here: fedavg.py will import this module to wire strategies in
            from .fedavg import aggregate as fedavg_aggregate
            return fedavg_aggregate(list(replies), weighting)
        if name == "qfedavg":
            f = qffl_losses([client_metric(r, ALIGNMENT_KEY) for r in replies], [r.name for r in replies])
            new = qffl_update(global_state, states, f, self.cfg.qffl_q, 1.0 / self.cfg.client_lr)
            return _finish(new, global_state, states[0])
        if name in ("trimmed_mean", "median"):
            cut = (trim_count(len(states), self.cfg.trim_fraction) if name == "trimmed_mean"
                   else (len(states) - 1) // 2)
            agg = order_statistic_mean(states, cut)
            if opt == "none":
                return _finish(agg, global_state, states[0])
            return self.apply_delta(global_state, {k: agg[k] - global_state[k].to(torch.float64) for k in agg},
                                    round_, states[0])
        weights = self._weights(replies, weighting)
        if opt == "none":  # adaptive without a server optimizer
            return weighted_average(states, weights)
        return self.apply_delta(global_state, weighted_delta(global_state, states, weights), round_, states[0])

    def _weights(self, replies: Sequence[Reply], weighting: str) -> list[float]:
        if self.cfg.name != "adaptive":
            return aggregation_weights([r.num_examples for r in replies], [r.episode_points for r in replies],
                                       weighting)
        for r in replies:
            value = client_metric(r, ALIGNMENT_KEY)
            self.history[r.name] = (self.history.get(r.name, []) + [value])[-self.cfg.adaptive_window:]
        return adaptive_weights(self.history, [r.name for r in replies], self.cfg.adaptive_temperature,
                                self.cfg.adaptive_window)

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


# --- flags ------------------------------------------------------------------------------

def add_strategy_arguments(group) -> None:
    """--strategy and its knobs, on an argparse parser or argument group."""
    g = group
    g.add_argument("--strategy", default="fedavg", choices=STRATEGIES,
                   help="server aggregation: fedavg (paper), fedprox (fedavg + a proximal term in the local loss), "
                        "qfedavg (q-FFL), adaptive (weights from held-out alignment history), trimmed_mean, "
                        "median (the last four ignore --weighting)")
    g.add_argument("--proximal_mu", type=float, default=0.01,
                   help="fedprox: mu of the local term (mu/2)·||w - w_global||²")
    g.add_argument("--qffl_q", type=float, default=0.1,
                   help="qfedavg: fairness exponent q (0 = uniform averaging; larger favours worse-aligned clients)")
    g.add_argument("--adaptive_temperature", type=float, default=0.1,
                   help="adaptive: softmax temperature T over (1 - mean held-out alignment)")
    g.add_argument("--adaptive_window", type=int, default=5,
                   help="adaptive: rounds of each client's held-out alignment history averaged")
    g.add_argument("--trim_fraction", type=float, default=0.2,
                   help="trimmed_mean: share beta of values dropped at each end per coordinate (floor(beta·n))")
    g.add_argument("--server_opt", default="none", choices=SERVER_OPTS,
                   help="server optimizer on the aggregate's delta (FedOpt): none (plain aggregate), sgd, adam, yogi")
    g.add_argument("--server_lr", type=float, default=None,
                   help="server learning rate (default: sgd 1.0 = FedAvg, adam/yogi 1e-3)")
    g.add_argument("--server_beta1", type=float, default=0.9, help="adam/yogi: first-moment decay")
    g.add_argument("--server_beta2", type=float, default=0.99, help="adam/yogi: second-moment decay")
    g.add_argument("--server_tau", type=float, default=1e-3, help="adam/yogi: adaptivity tau added to sqrt(v)")


def config_from_args(args) -> StrategyConfig:
    return StrategyConfig(name=args.strategy, proximal_mu=args.proximal_mu, qffl_q=args.qffl_q, client_lr=args.lr,
                          adaptive_temperature=args.adaptive_temperature, adaptive_window=args.adaptive_window,
                          trim_fraction=args.trim_fraction, server_opt=args.server_opt, server_lr=args.server_lr,
                          server_beta1=args.server_beta1, server_beta2=args.server_beta2, server_tau=args.server_tau)


def build_strategy(args) -> Strategy:
    return Strategy(config_from_args(args))


def check_strategy_config(c: StrategyConfig) -> None:
    """DataError naming the flag, for values no run could use."""
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
    if c.name == "qfedavg" and not c.client_lr > 0:
        bad("--lr", c.client_lr, "qfedavg needs a positive client learning rate (L = 1/lr)", "use --lr 3e-4")
    if not c.adaptive_temperature > 0:
        bad("--adaptive_temperature", c.adaptive_temperature, "must be > 0", "try 0.1")
    if c.adaptive_window < 1:
        bad("--adaptive_window", c.adaptive_window, "must be >= 1", "try 5")
    if not 0 <= c.trim_fraction < 0.5:
        bad("--trim_fraction", c.trim_fraction, "must be in [0, 0.5)", "0.2 drops 1 of 5-9 clients at each end")
    if c.server_opt != "none" and c.name == "qfedavg":
        bad("--server_opt", c.server_opt, "does not compose with --strategy qfedavg, whose step 1/Σh_k "
            "is already its own server step size", "use --server_opt none with qfedavg")
    if c.server_lr is not None and not c.server_lr > 0:
        bad("--server_lr", c.server_lr, "must be > 0", "leave it out for the per-optimizer default")
    for flag, value in (("--server_beta1", c.server_beta1), ("--server_beta2", c.server_beta2)):
        if not 0 <= value < 1:
            bad(flag, value, "must be in [0, 1)", "Reddi et al. use 0.9 and 0.99")
    if not c.server_tau > 0:
        bad("--server_tau", c.server_tau, "must be > 0", "Reddi et al. and Flower use 1e-3")


def check_strategy_flags(args, num_train_clients: int) -> list[str]:
    """Raise DataError for unusable strategy flags; return warnings (strings) worth printing."""
    c = config_from_args(args)
    check_strategy_config(c)
    warnings = []
    m = max(1, round(getattr(args, "client_fraction", 1.0) * num_train_clients))
    if c.name == "trimmed_mean" and trim_count(m, c.trim_fraction) == 0:
        warnings.append(f"--trim_fraction {c.trim_fraction} trims nothing with {m} sampled clients "
                        f"(floor({c.trim_fraction}·{m}) = 0): trimmed_mean is the plain mean here")
    if c.name in ("trimmed_mean", "median") and m < 3:
        warnings.append(f"--strategy {c.name} with {m} sampled client(s) cannot discard anyone")
    if c.name != "fedprox" and c.proximal_mu != StrategyConfig.proximal_mu:
        warnings.append(f"--proximal_mu {c.proximal_mu} has no effect with --strategy {c.name}")
    return warnings
