"""Client-level DP-FedAvg (McMahan et al., ICLR 2018) and its accountant (issue 15).

Each round the server clips each sampled client's update Δ_k = θ_k - θ to norm S, averages over the m clients sampled,
adds N(0, (z·S/m)²) per coordinate and hands the noisy mean to the strategy's server optimizer: one group moves the
clipped sum by at most S (central DP, a trusted server). Mechanism and accounting: docs/strategies_privacy.md."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import log_ndtr

from training.local import StopTraining
from utils.errors import DataError
from utils.seeding import generator

from .aggregation import Tensors, client_update, float_keys, l2_norm, num_sampled_clients
from .strategies import Strategy

DP_STRATEGIES = ("fedavg", "fedprox")   # averaging rules whose sensitivity is S/m
OPACUS_HINT = "pip install opacus==1.6.0 (the RDP accountant; it leaves torch as it is)"


class PrivacyBudgetExhausted(DataError, StopTraining):
    """The next release would spend more than --dp_epsilon."""


def check_dp_strategy(name: str) -> None:
    if name not in DP_STRATEGIES:
        raise DataError(f"--dp does not compose with --strategy {name}: its sensitivity to one client is "
                        "not S/m (the noise would not cover it)", f"use --strategy {' or '.join(DP_STRATEGIES)}")


def clip_update(update: Tensors, clip: float) -> tuple[Tensors, float]:
    """(Δ · min(1, S/||Δ||), ||Δ||) with the norm over all tensors jointly."""
    norm = l2_norm(update)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: d * factor for k, d in update.items()}, norm


def gaussian_noise(like: Tensors, std: float, gen: torch.Generator | None) -> Tensors:
    """N(0, std²) per coordinate in float64 from `gen`, or from the OS CSPRNG when gen is None. Drawn on
    the CPU in sorted key order: a state dict's order changes through a checkpoint or a Flower record."""
    def draw(t: torch.Tensor) -> torch.Tensor:
        if gen is None:
            return torch.from_numpy(secure_standard_normal(t.numel())).reshape(t.shape)
        return torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return {k: (std * draw(like[k])).to(like[k].device) for k in sorted(like)}


SECURE_DRAWS = 4  # Opacus secure_mode: each coordinate is the normalised sum of 2n = 4 Gaussian draws


def os_uniform(n: int) -> np.ndarray:
    """n float64 uniforms from os.urandom, 53 bits each, offset by half a step: never 0 (Box-Muller takes its log)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(2 ** 53)


def secure_standard_normal(n: int) -> np.ndarray:
    """n N(0, 1) draws by Box-Muller from os.urandom, each the sum of SECURE_DRAWS draws over
    sqrt(SECURE_DRAWS): Opacus's secure_mode defence against floating-point attacks (arXiv 2107.10138 §5.1)."""
    pairs = (n * SECURE_DRAWS + 1) // 2
    u1, u2 = os_uniform(pairs), os_uniform(pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    draws = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n * SECURE_DRAWS]
    return draws.reshape(SECURE_DRAWS, n).sum(axis=0) / math.sqrt(SECURE_DRAWS)


def dp_mean_delta(global_state: Tensors, client_states: Sequence[Tensors], *, clip: float,
                  noise_multiplier: float, num_sampled: int, gen: torch.Generator | None) -> tuple[Tensors, dict]:
    """(noisy mean clipped update, diagnostics), clients in the given order, noise from `gen` (None: the OS
    CSPRNG). The denominator is the number sampled, fixed in advance, so one client moves the sum by at most S
    whoever replies."""
    if len(client_states) > num_sampled:
        raise ValueError(f"{len(client_states)} replies but only {num_sampled} clients were sampled")
    total = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in float_keys(global_state)}
    norms = []
    for state in client_states:
        clipped, norm = clip_update(client_update(global_state, state), clip)
        norms.append(norm)
        for k, d in clipped.items():
            total[k] += d
    std = noise_multiplier * clip / num_sampled
    noise = gaussian_noise(total, std, gen)
    mean = {k: total[k] / num_sampled + noise[k] for k in total}
    # diagnostics for choosing S (not covered by the guarantee) and the per-round signal-to-noise ratio
    info = {"dp_noise_std": std, "dp_clipped": sum(n > clip for n in norms),
            "dp_median_norm": sorted(norms)[len(norms) // 2] if norms else 0.0,
            "dp_signal_norm": l2_norm({k: t / num_sampled for k, t in total.items()}),
            "dp_noise_norm": l2_norm({k: n.double() for k, n in noise.items()}),
            "dp_params": sum(t.numel() for t in total.values())}
    return mean, info


class DPFedAvg:
    """DP-FedAvg around a Strategy: the clipped, noised uniform mean instead of its averaging, then its
    server optimizer. With max_epsilon, a round over the budget raises PrivacyBudgetExhausted unreleased."""

    def __init__(self, strategy: Strategy, *, clip: float, noise_multiplier: float, seed: int, num_sampled: int,
                 accountant: PrivacyAccountant | None = None, max_epsilon: float | None = None,
                 secure_noise: bool = False, clip_quantile: float | None = None, clip_lr: float = 0.2,
                 count_std: float | None = None):
        check_dp_strategy(strategy.name)
        self.strategy, self.clip, self.seed, self.num_sampled = strategy, clip, seed, num_sampled
        self.accountant, self.max_epsilon = accountant, max_epsilon
        self.secure_noise = secure_noise  # OS randomness: nothing about the noise is kept or reproducible
        # adaptive clipping (Andrew et al. 2021): C follows the clip_quantile of the update norms
        self.clip_quantile, self.clip_lr = clip_quantile, clip_lr
        # σ_b of the noised unclipped count: by default m/20, Andrew et al.'s and Flower's
        self.count_std = num_sampled / 20 if count_std is None else count_std
        self.update_noise = (noise_multiplier if clip_quantile is None
                             else update_noise_multiplier(noise_multiplier, self.count_std))
        self.last_info: dict = {}

    @property
    def name(self) -> str:
        return f"dp_{self.strategy.name}"

    @property
    def required_metrics(self) -> tuple[str, ...]:
        return self.strategy.required_metrics

    def client_config(self, round_: int) -> dict:
        return self.strategy.client_config(round_)

    def aggregate(self, global_state: Tensors, replies: Sequence, round_: int, weighting: str) -> Tensors:
        if weighting != "uniform":
            raise ValueError(f"DP-FedAvg averages uniformly; got weighting {weighting!r}")
        if self.accountant is not None and self.max_epsilon is not None:
            self.accountant.check_next(self.max_epsilon)
        replies = sorted(replies, key=lambda r: r.name)
        delta, self.last_info = dp_mean_delta(global_state, [r.state for r in replies], clip=self.clip,
                                              noise_multiplier=self.update_noise, num_sampled=self.num_sampled,
                                              gen=None if self.secure_noise else generator(self.seed, "dp", round_))
        new = self.strategy.apply_delta(global_state, delta, round_)
        if self.clip_quantile is not None:
            self._adapt_clip(len(replies) - self.last_info["dp_clipped"], len(replies), round_)
        if self.accountant is not None:
            self.accountant.step()
            acc = self.accountant
            self.last_info.update(dp_epsilon=acc.epsilon(), dp_epsilon_exact=acc.epsilon_exact(),
                                  dp_epsilon_replace_one=acc.epsilon_replace_one())
        return new

    def _adapt_clip(self, unclipped: int, replied: int, round_: int) -> None:
        """C ← C·exp(-η(b̃ - γ)), b̃ = ½ + (Σ_k (b_k - ½) + N(0, σ_b²))/m the noised share of unclipped
        updates (centred bits: a zeroed-out group moves the sum by ½). The new C applies from the next round."""
        gen = None if self.secure_noise else generator(self.seed, "dp_count", round_)
        noise = float(gaussian_noise({"count": torch.zeros(1, dtype=torch.float64)}, 1.0, gen)["count"])
        share = 0.5 + (unclipped - 0.5 * replied + self.count_std * noise) / self.num_sampled
        self.last_info.update(dp_clip=self.clip, dp_unclipped_share=share)
        self.clip = self.clip * math.exp(-self.clip_lr * (share - self.clip_quantile))

    def state_dict(self) -> dict:
        return {"strategy": self.strategy.state_dict(), "clip": self.clip,
                "accountant": None if self.accountant is None else self.accountant.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state["strategy"])
        if self.clip_quantile is not None:  # the adapted clip norm continues where it was
            self.clip = float(state["clip"])
        if self.accountant is not None:
            if state["accountant"] is None:
                raise DataError("the checkpoint holds no privacy accountant", "resume with the flags it was run with")
            self.accountant.load_state_dict(state["accountant"])


def update_noise_multiplier(z: float, count_std: float) -> float:
    """z_Δ with z_Δ⁻² + (2σ_b)⁻² = z⁻² (Andrew et al. 2021, §3): update and count together cost what z
    alone would, so the accountant keeps counting z. 0 for z = 0."""
    if z == 0:
        return 0.0
    if not z < 2 * count_std:
        raise DataError(f"adaptive clipping with --dp_noise {z:.4g} needs the count's noise std σ_b above z/2 = "
                        f"{z / 2:.4g} (got {count_std:.4g}): z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2) would not exist",
                        f"raise --dp_clip_count_std to {z:.4g} or more")
    return (z ** -2 - (2 * count_std) ** -2) ** -0.5


# RDP orders beyond Opacus's default (which stop at 63): with them alone ε cannot go below about
# 0.1 at δ = 1e-5 however large the noise (log(1/δ)/(α-1) at α = 63). Up to 1e4 the floor is
# 1.3e-4; higher orders make Opacus's RDP-to-ε conversion go negative, so they stop there.
EXTRA_ORDERS = tuple(float(a) for a in np.geomspace(64, 1e4, 40)[1:])


def _opacus():
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as err:
        raise DataError(f"--dp needs Opacus for privacy accounting ({err})", OPACUS_HINT) from err
    return RDPAccountant, get_noise_multiplier


def rdp_orders() -> list[float]:
    rdp, _ = _opacus()
    return [*rdp.DEFAULT_ALPHAS, *EXTRA_ORDERS]


def epsilon_floor(delta: float) -> float:
    """The smallest ε the accountant certifies at δ, reached only as the noise grows without bound."""
    from opacus.accountants.analysis.rdp import get_privacy_spent
    orders = rdp_orders()
    return float(get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)[0])


class PrivacyAccountant:
    """ε spent after `steps` DP-FedAvg rounds at (noise_multiplier z, sample rate m/n, δ). A round is counted
    without amplification (`accounted_noise`): noise z with every client (zero-out neighbours, sensitivity S),
    z/2 with sampling (replace-one neighbours, a swapped group moves the sum by 2S)."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float):
        if not noise_multiplier >= 0 or not 0 < sample_rate <= 1 or not 0 < delta < 1:
            raise ValueError(f"bad accountant settings z={noise_multiplier}, q={sample_rate}, delta={delta}")
        self.noise_multiplier, self.sample_rate, self.delta = noise_multiplier, sample_rate, delta
        self.steps = 0
        self.neighbouring = "zero_out" if sample_rate >= 1 else "replace_one"
        self.accounted_noise = noise_multiplier if sample_rate >= 1 else noise_multiplier / 2

    def step(self) -> None:
        self.steps += 1

    def epsilon(self, steps: int | None = None, noise: float | None = None) -> float:
        """RDP ε after `steps` rounds (default: those taken) of noise `noise` (default: accounted_noise)."""
        steps = self.steps if steps is None else steps
        noise = self.accounted_noise if noise is None else noise
        if steps == 0 or noise == 0:
            return 0.0 if steps == 0 else math.inf
        rdp, _ = _opacus()
        acc = rdp()
        acc.history = [(noise, 1.0, steps)]  # one entry = `steps` identical Gaussian rounds (sample rate 1)
        return float(acc.get_epsilon(self.delta, alphas=rdp_orders()))

    def epsilon_replace_one(self, steps: int | None = None) -> float:
        """RDP ε for replace-one neighbours (noise z/2 each round); with sampling this is `epsilon`."""
        return self.epsilon(steps, self.noise_multiplier / 2)

    def epsilon_exact(self, steps: int | None = None) -> float:
        """The tight ε: T Gaussian rounds of noise z' (accounted_noise) compose exactly to μ-GDP with
        μ = √T/z' (Dong, Roth and Su 2022), what Opacus's PRV accountant approximates (tested)."""
        steps = self.steps if steps is None else steps
        if steps == 0 or self.noise_multiplier == 0:
            return 0.0 if steps == 0 else math.inf
        return gdp_epsilon(math.sqrt(steps) / self.accounted_noise, self.delta)

    def check_next(self, max_epsilon: float) -> None:
        spent = self.epsilon(self.steps + 1)
        if spent > max_epsilon:
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: round {self.steps + 1} would spend ε = {spent:.4g} "
                f"> --dp_epsilon {max_epsilon} (δ = {self.delta}); {self.steps} round(s) released, ε = "
                f"{self.epsilon():.4g}", "the last checkpoint is the private model; more rounds need a larger "
                "--dp_epsilon or a new run with more --dp_noise")

    def state_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "delta": self.delta, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for key in ("noise_multiplier", "sample_rate", "delta"):
            if float(state[key]) != float(getattr(self, key)):
                raise DataError(f"the checkpoint's privacy accountant has {key} = {state[key]}, this run "
                                f"{getattr(self, key)}", "resume with the DP flags the run started with")
        self.steps = int(state["steps"])


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2), the second term in log space (e^ε overflows first)."""
    return math.exp(log_ndtr(-epsilon / mu + mu / 2)) - math.exp(epsilon + log_ndtr(-epsilon / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP gives `delta` (δ(ε) falls from δ(0) to 0; 0 if δ(0) <= delta)."""
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def noise_for_epsilon(epsilon: float, delta: float, rounds: int, sample_rate: float) -> float:
    """The smallest z (to Opacus's tolerance 0.01 in ε) whose `rounds` rounds spend at most ε."""
    if not epsilon > 0 or rounds < 1:
        raise ValueError(f"need epsilon > 0 and rounds >= 1, got {epsilon}, {rounds}")
    _, solve = _opacus()
    try:
        z = float(solve(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=rounds, alphas=rdp_orders()))
    except ValueError:  # Opacus gives up past z = 1e6: say what these rounds can reach instead
        from opacus.accountants.utils import MAX_SIGMA
        least = PrivacyAccountant(MAX_SIGMA, 1.0, delta).epsilon(rounds)
        raise DataError(f"--dp_epsilon {epsilon:g} cannot be reached in {rounds} rounds at δ = {delta:g}: even "
                        f"noise z = {MAX_SIGMA:g} spends ε = {least:.3g}",
                        f"raise --dp_epsilon to {least:.3g} or more (the accountant cannot certify less than "
                        f"{epsilon_floor(delta):.2g} at this δ), raise --dp_delta, or lower --comm_round") from None
    return z if sample_rate >= 1 else 2 * z   # the accountant halves z when sampling


def check_budget(accountant: PrivacyAccountant, rounds: int, max_epsilon: float) -> float:
    """Before a run: refuse one whose `rounds` would spend more than max_epsilon; return that ε."""
    eps = accountant.epsilon(rounds)
    if eps > max_epsilon:
        need = noise_for_epsilon(max_epsilon, accountant.delta, rounds, accountant.sample_rate)
        raise DataError(f"--dp_noise {accountant.noise_multiplier} for {rounds} rounds spends ε = {eps:.4g} "
                        f"> --dp_epsilon {max_epsilon} (δ = {accountant.delta})",
                        f"raise --dp_noise to {need:.4g} or more, lower --comm_round, or leave --dp_noise "
                        "out to have it solved from --dp_epsilon")
    return eps


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level DP-FedAvg's settings (the --dp* flags); `enabled` is --dp."""

    enabled: bool = False
    clip: float = 0.5
    noise: float | None = None            # None: solved from `epsilon`
    epsilon: float | None = None
    delta: float = 1e-5
    clip_quantile: float | None = None    # None: a fixed clip
    clip_lr: float = 0.2
    clip_count_std: float | None = None   # None: m/20
    secure_noise: bool | None = None      # None: the runtime's default (off in-process and in simulation)

    def validate(self, num_train_clients: int, *, weighting: str, strategy: str, client_fraction: float) -> list[str]:
        """Raise DataError for unusable DP settings; return warnings (strings) worth printing."""
        if not self.enabled:
            for flag, value in (("dp_noise", self.noise), ("dp_epsilon", self.epsilon),
                                ("dp_secure_noise", self.secure_noise), ("dp_clip_quantile", self.clip_quantile),
                                ("dp_clip_count_std", self.clip_count_std)):
                if value is not None:
                    raise DataError(f"--{flag} has no effect without --dp", "add --dp, or drop the flag")
            return []
        noise, epsilon, delta = self.noise, self.epsilon, self.delta
        if not self.clip > 0:
            raise DataError(f"--dp_clip {self.clip} must be > 0", "set it near the median client update norm, e.g. 1.0")
        if noise is not None and not noise >= 0:
            raise DataError(f"--dp_noise {noise} must be >= 0", "z around 1 or more; see --dp_epsilon")
        if epsilon is not None and not epsilon > 0:
            raise DataError(f"--dp_epsilon {epsilon} must be > 0", "e.g. 10, or leave it out and give --dp_noise")
        if noise is None and epsilon is None:
            raise DataError("--dp needs --dp_noise or --dp_epsilon", "e.g. --dp_noise 1.0, or --dp_epsilon 10 to solve z")
        if noise == 0 and epsilon is not None:
            raise DataError("--dp_noise 0 cannot meet any --dp_epsilon (no noise, ε = ∞)", "give a positive --dp_noise")
        if epsilon is not None and 0 < delta < 1 and epsilon < epsilon_floor(delta):
            raise DataError(f"--dp_epsilon {epsilon:g} is below the smallest ε the RDP accountant can certify "
                            f"at δ = {delta:g} ({epsilon_floor(delta):.2g}, with infinite noise)",
                            "raise --dp_epsilon, or raise --dp_delta")
        quantile, count_std = self.clip_quantile, self.clip_count_std
        if quantile is not None and not 0 < quantile < 1:
            raise DataError(f"--dp_clip_quantile {quantile} must be in (0, 1)", "0.5 clips at the median update norm")
        if quantile is not None and not self.clip_lr > 0:
            raise DataError(f"--dp_clip_lr {self.clip_lr} must be > 0", "0.2 is the paper's")
        if count_std is not None and not count_std > 0:
            raise DataError(f"--dp_clip_count_std {count_std} must be > 0", "leave it out for m/20")
        if not 0 < delta < 1:
            raise DataError(f"--dp_delta {delta} must be in (0, 1)", "1e-5 is the usual choice")
        if weighting != "uniform":
            raise DataError(f"--dp with --weighting {weighting}: a client's weight would scale its influence past "
                            "S/m, and its data size is itself private", "add --weighting uniform")
        check_dp_strategy(strategy)
        warnings = []
        if delta > 1 / num_train_clients:
            warnings.append(f"--dp_delta {delta} exceeds 1/{num_train_clients} clients: a mechanism that "
                            "publishes one client's update outright would satisfy it")
        if noise == 0:
            warnings.append("--dp_noise 0: updates are clipped but not noised, so ε = ∞ (no privacy)")
        if client_fraction < 1:
            warnings.append("--client_fraction < 1 under --dp: rounds are accounted without subsampling "
                            "amplification, as replace-one neighbours (ε is conservative)")
        if not self.secure_noise and noise != 0:
            warnings.append("--dp noise is drawn from --seed (reproducible, for simulations): anyone with config.json "
                            "can subtract it, so ε does not hold for a model you share; add --dp_secure_noise")
        return warnings


def build_dp(cfg: PrivacyConfig, strategy: Strategy, num_train_clients: int, rounds: int, *,
             client_fraction: float, seed: int) -> DPFedAvg | None:
    """The DP wrapper of a `rounds`-round run (None without --dp): z solved from --dp_epsilon without
    --dp_noise, a run over --dp_epsilon refused before it starts."""
    if not cfg.enabled:
        return None
    m = num_sampled_clients(num_train_clients, client_fraction)
    rate = m / num_train_clients
    z = cfg.noise
    if z is None:
        z = noise_for_epsilon(cfg.epsilon, cfg.delta, rounds, rate)
    accountant = None if z == 0 else PrivacyAccountant(z, rate, cfg.delta)  # z = 0: clipping only, ε = ∞ not logged
    if accountant is not None and cfg.epsilon is not None:
        check_budget(accountant, rounds, cfg.epsilon)
    return DPFedAvg(strategy, clip=cfg.clip, noise_multiplier=z, seed=seed, num_sampled=m, accountant=accountant,
                    max_epsilon=cfg.epsilon, secure_noise=bool(cfg.secure_noise), clip_quantile=cfg.clip_quantile,
                    clip_lr=cfg.clip_lr, count_std=cfg.clip_count_std)
