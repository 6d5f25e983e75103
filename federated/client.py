"""A group as a federated client: it holds only its own data and returns only weights and numbers.

The same class serves the in-process engine and the Flower ClientApp. Model compute is borrowed: the caller passes a
scratch GPO whose weights the client overwrites, so a process hosting many clients keeps one model, not one per
client."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from data_loaders.episodes import episode_token_counts
from data_loaders.schema import DataError, GroupData
from models.gpo import GPO
from training.config import ClientConfig
from training.evaluation import GroupEval, eval_split, score_group
from training.local import OptimState, local_train
from utils.seeding import derive_seed, generator


@contextlib.contextmanager
def seeded_dropout(model: GPO, seed: int, name: str, round_: int):
    """Dropout draws from torch's global RNG: seed it from (seed, client, round) for this fit
    only, so masks never depend on client order or process (the Flower nodes do the same)."""
    if not model.config.dropout:
        yield
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "dropout", name, round_))
        yield


@dataclass
class FitResult:
    name: str
    state: dict[str, torch.Tensor]
    num_examples: int           # local training questions (paper's |D_g|)
    episode_points: int         # points in the first local episode (released code's weight)
    losses: list[float]
    points: int = 0             # real points over all local episodes this round
    metrics: dict[str, float] = field(default_factory=dict)  # what the strategy asked for (fit_config)


HELDOUT_ALIGNMENT = "heldout_alignment"


class GroupClient:
    """role 'train': trains on its `local` questions and scores its held-out ones; role 'eval': never trains,
    adapts in context and scores its other questions (which questions: training.evaluation.eval_split)."""

    def __init__(self, group: GroupData, cfg: ClientConfig, role: str, heldout_qkeys: torch.Tensor | None = None):
        self.cfg, self.split = cfg, eval_split(group, cfg, role, heldout_qkeys)
        self.name, self.role, self.local, self.heldout = group.name, role, self.split.local, self.split.heldout
        self.optim_state = OptimState()

    @property
    def num_examples(self) -> int:
        return self.local.num_questions

    def fit(self, model: GPO, global_state: dict, round_: int, fit_config: dict | None = None) -> FitResult:
        """Load the global weights, run `epochs` local steps, return the new weights.

        `fit_config` is what the server's strategy sends with the weights: `proximal_mu` (FedProx's local term) and
        `metrics`, the numbers it wants back, computed here from the global weights before training
        (`heldout_alignment`: 1 − mean distance on this group's own held-out questions)."""
        fit_config = fit_config or {}
        metrics = {}
        if HELDOUT_ALIGNMENT in fit_config.get("metrics", ()):
            scored = self.evaluate(model, global_state, round_)
            if scored is None:
                raise DataError(f"client {self.name!r} has no held-out questions to report {HELDOUT_ALIGNMENT}",
                                "lower --data_split so each training group keeps some questions back")
            metrics[HELDOUT_ALIGNMENT] = scored.score
        model.load_state_dict(global_state)
        mu = float(fit_config.get("proximal_mu", 0.0))
        anchor = {k: v.detach().clone() for k, v in global_state.items()} if mu > 0 else None
        gen = generator(self.cfg.seed, "episodes", self.name, round_)
        with seeded_dropout(model, self.cfg.seed, self.name, round_):
            res = local_train(model, self.local, self.cfg.epochs, self.cfg.sizes, self.cfg.optim,
                              self.optim_state, gen, proximal=(mu, anchor) if anchor is not None else None)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return FitResult(self.name, state, self.num_examples, res.first_episode_points, res.losses, res.points, metrics)

    def round_episodes(self, round_: int) -> list[tuple[int, int]]:
        """(context, target) points of the episodes fit(..., round_) trains on, replayed from the
        same generator without gathering any embedding."""
        return episode_token_counts(self.local, self.cfg.sizes, generator(self.cfg.seed, "episodes", self.name, round_),
                                    self.cfg.epochs)

    def evaluate(self, model: GPO, global_state: dict, round_: int) -> GroupEval | None:
        """Per-question distances under the global model, or None if nothing to score."""
        ctx_q, tgt, tgt_q = self.eval_questions(round_)
        if len(tgt_q) == 0:
            return None
        model.load_state_dict(global_state)
        return score_group(model, self.local, ctx_q, tgt, tgt_q, self.cfg.metric, self.cfg.eval_batch_size)

    def eval_questions(self, round_: int) -> tuple[torch.Tensor, GroupData, torch.Tensor]:
        return self.split.eval_questions(round_)

    # what a checkpoint needs to resume this client exactly
    def state_dict(self) -> dict:
        return {"adam": self.optim_state.adam, "step": self.optim_state.step}

    def load_state_dict(self, state: dict) -> None:
        self.optim_state = OptimState(state["adam"], int(state["step"]))

