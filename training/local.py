"""A client's local steps: Adam with a cosine learning rate that persists across rounds.

The rate is CosineAnnealingLR(T_max=num_steps) in closed form at the client's step count, so the
schedule's state is one integer that travels with the optimizer state (tests/test_training.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data_loaders.episodes import EpisodeSizes, sample_episode
from data_loaders.schema import GroupData
from models.gpo import GPO


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    num_steps: int = 100  # T_max of the cosine schedule
    grad_clip: float = 0.0  # max L2 norm of one step's gradient (0 = off, the paper)


class StopTraining(Exception):
    """A clean early end of a run, not a failure (e.g. the privacy budget is spent): the run
    loop evaluates the last trained round and finishes the run folder there."""


DIVERGENCE_HINT = "lower --lr (the paper uses 3e-4), or bound each step with --grad_clip (e.g. 1.0)"


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, weights or predictions; names the round and the client."""

    def __init__(self, round_: int, client: str, what: str):
        self.round, self.client = round_, client
        super().__init__(f"training diverged at round {round_}: {what} (client {client!r})\n  hint: {DIVERGENCE_HINT}")


def check_finite(round_: int, client: str, losses, state: dict[str, torch.Tensor] | None = None) -> None:
    """Raise DivergenceError on a NaN/inf loss or weight, before it reaches aggregation or a log."""
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise DivergenceError(round_, client, f"loss is {losses[bad[0]]} at local step {bad[0] + 1}")
    for name, t in (state or {}).items():  # one fused check per tensor
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DivergenceError(round_, client, f"weight {name!r} holds NaN/inf")


@dataclass
class OptimState:
    """What a client (or the centralized trainer) keeps between rounds."""

    adam: dict | None = None
    step: int = 0


@dataclass
class LocalResult:
    losses: list[float] = field(default_factory=list)
    first_episode_points: int = 0
    points: int = 0  # real (unpadded) points over all local episodes, for compute-normalised curves


def cosine_lr(step: int, cfg: OptimConfig, eta_min: float = 0.0) -> float:
    return eta_min + (cfg.lr - eta_min) * (1 + math.cos(math.pi * step / cfg.num_steps)) / 2


def make_adam(model: GPO, cfg: OptimConfig, state: OptimState) -> torch.optim.Adam:
    # fused: one kernel for all parameters (the per-tensor loop was ~10% of a step at paper scale)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True)
    if state.adam is not None:
        opt.load_state_dict(state.adam)
    return opt


def proximal_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu/2)·||w - w_global||² over the floating tensors of `params`, differentiable
    in `params` only (the anchor is the global weights the client received)."""
    ref = next(iter(params.values()))
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    if mu == 0:
        return zero
    return 0.5 * mu * sum(((p - anchor[k].detach().to(p.dtype)).pow(2).sum()
                           for k, p in params.items() if p.is_floating_point()), zero)


def adam_step(model: GPO, opt: torch.optim.Adam, episode, cfg: OptimConfig, state: OptimState,
              proximal: tuple[float, dict] | None = None) -> float:
    """One optimizer step on one (batched) episode; advances the schedule. With `proximal`
    (mu, anchor) the FedProx term joins the objective; the returned loss is the model's alone,
    so curves compare across strategies."""
    for group in opt.param_groups:
        group["lr"] = cosine_lr(state.step, cfg)
    opt.zero_grad(set_to_none=True)
    loss = model.loss(episode)
    if proximal is None:
        loss.backward()
    else:
        mu, anchor = proximal
        (loss + proximal_penalty(dict(model.named_parameters()), anchor, mu)).backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    state.step += 1
    return float(loss.detach())


def episode_points(ep) -> int:
    """Real context and target points in an (optionally batched) episode."""
    return int(ep.ctx_mask.sum() + ep.tgt_mask.sum())


def local_train(model: GPO, data: GroupData, steps: int, sizes: EpisodeSizes, cfg: OptimConfig,
                state: OptimState, gen: torch.Generator, proximal: tuple[float, dict] | None = None) -> LocalResult:
    """`steps` local steps, one sampled episode each (method.md §5). Updates `state` in place."""
    model.train()
    opt = make_adam(model, cfg, state)
    result = LocalResult()
    for i in range(steps):
        ep = sample_episode(data, sizes, gen)
        points = episode_points(ep)
        result.points += points
        if i == 0:
            result.first_episode_points = points
        result.losses.append(adam_step(model, opt, ep, cfg, state, proximal))
    state.adam = opt.state_dict()
    return result
