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
from training.evaluation import GroupEval, context_questions, score_group
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
    """role 'train': trains on its first data_split of questions, scores the rest.
    role 'eval': never trains; adapts in context and scores its other questions."""

    def __init__(self, group: GroupData, cfg: ClientConfig, role: str, heldout_qkeys: torch.Tensor | None = None):
        """`heldout_qkeys` (--question_split): questions no group trains on. A training group then
        trains on its other questions and scores these; an evaluation group draws its context from
        its other questions and scores these. None: the paper's split (the last 1 - data_split of a
        training group's questions in key order; an evaluation group scores all but its context)."""
        self.name, self.cfg, self.role = group.name, cfg, role
        if role not in ("train", "eval"):
            raise ValueError(f"role must be 'train' or 'eval', not {role!r}")
        held = None if heldout_qkeys is None else torch.isin(group.qkeys, heldout_qkeys.to(group.qkeys.device))
        self.context_pool = self.target_mask = None
        if role == "train":
            self.local, self.heldout = (group.split(cfg.data_split) if held is None else
                                        (group.subset(_where(~held)), group.subset(_where(held))))
        else:
            self.local, self.heldout = group, None
            if held is not None:
                self.context_pool, self.target_mask = _where(~held).cpu(), held.cpu()
        self.optim_state = OptimState()
        self._fixed_ctx: torch.Tensor | None = None

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
        return FitResult(self.name, state, self.num_examples, res.first_episode_points, res.losses, res.points,
                         metrics)

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
        """(context questions of `local`, the target group, its target questions) at evaluation:
        an eval group scores all its non-context questions, a training group its held-out ones."""
        ctx_q = self._context(round_)
        if self.role == "train":
            return ctx_q, self.heldout, torch.arange(self.heldout.num_questions)
        mask = torch.ones(self.local.num_questions, dtype=torch.bool)
        mask[ctx_q] = False
        if self.target_mask is not None:
            mask &= self.target_mask
        return ctx_q, self.local, mask.nonzero().squeeze(1)

    def _context(self, round_: int) -> torch.Tensor:
        c = self.cfg
        pool = self.context_pool
        if c.eval_resample:
            return context_questions(self.local.num_questions, c.eval_num_qs, c.eval_seed, self.name, round_,
                                     self.role, pool)
        if self._fixed_ctx is None:  # drawn once from eval_seed, reused at every evaluation
            self._fixed_ctx = context_questions(self.local.num_questions, c.eval_num_qs, c.eval_seed,
                                                self.name, None, self.role, pool)
        return self._fixed_ctx

    # what a checkpoint needs to resume this client exactly
    def state_dict(self) -> dict:
        return {"adam": self.optim_state.adam, "step": self.optim_state.step}

    def load_state_dict(self, state: dict) -> None:
        self.optim_state = OptimState(state["adam"], int(state["step"]))


def _where(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().squeeze(1)
