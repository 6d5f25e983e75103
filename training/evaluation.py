"""In-context evaluation (method.md §7): a group's context questions in, all its targets scored.

A group is scored in one forward pass: targets attend only to the context, so this
equals predicting each target question on its own (tests/test_model.py pins it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from data_loaders.episodes import collate
from data_loaders.schema import DataError, GroupData, gather_points
from models.gpo import GPO
from utils.distances import NonFiniteError, needed_ordinals, score_questions
from utils.metrics import cov, fairness_index, mean_alignment, worst_group
from utils.seeding import generator

from .config import ClientConfig


@dataclass
class GroupEval:
    """Per-question distances of one group; the score is 1 - their mean."""

    name: str
    distances: torch.Tensor  # [Q_target] float64, CPU
    qkeys: torch.Tensor | None = None  # [Q_target] the scored questions' keys (None: not reported)

    @property
    def score(self) -> float:
        return 1.0 - float(self.distances.mean())


def context_questions(num_q: int, eval_num_qs: int, seed: int, name: str, round_: int | None,
                      role: str, pool: torch.Tensor | None = None) -> torch.Tensor:
    """The evaluation context of a group: drawn from (eval_seed, group), or per round when resampling.

    `pool`: the question indices a context may use (--question_split: the questions outside the
    held-out set); None = all `num_q`. Drawing from `pool = arange(num_q)` gives the same
    questions as drawing from None, so the split at 0 changes no number."""
    if eval_num_qs >= num_q and role == "eval":
        raise DataError(f"evaluation group {name!r} has {num_q} questions; --eval_num_qs {eval_num_qs} "
                        "leaves none to score", "lower --eval_num_qs or drop the group")
    parts = ("eval_context", name) if round_ is None else ("eval_context", name, round_)
    n = num_q if pool is None else len(pool)
    order = torch.randperm(n, generator=generator(seed, *parts))[:min(eval_num_qs, n)]
    return order if pool is None else pool[order]


@dataclass(frozen=True, eq=False)
class EvalSplit:
    """A group's questions as a run uses them. A training group trains on `local` and scores `heldout`; an
    evaluation group adapts on `local` (all of it), draws its context from `context_pool` (None: any question)
    and scores its other questions in `target_mask` (None: all)."""

    name: str
    role: str
    local: GroupData
    heldout: GroupData | None
    context_pool: torch.Tensor | None
    target_mask: torch.Tensor | None
    cfg: ClientConfig

    def eval_questions(self, round_: int) -> tuple[torch.Tensor, GroupData, torch.Tensor]:
        """(context questions of `local`, the target group, its target questions) at round `round_`'s evaluation."""
        c = self.cfg
        ctx_q = context_questions(self.local.num_questions, c.eval_num_qs, c.eval_seed, self.name,
                                  round_ if c.eval_resample else None, self.role, self.context_pool)
        if self.role == "train":
            return ctx_q, self.heldout, torch.arange(self.heldout.num_questions)
        return ctx_q, self.local, self.targets(ctx_q)

    def targets(self, ctx_q: torch.Tensor) -> torch.Tensor:
        """The questions of `local` an evaluation scores beside the context `ctx_q`: the others in target_mask."""
        mask = torch.ones(self.local.num_questions, dtype=torch.bool)
        mask[ctx_q] = False
        if self.target_mask is not None:
            mask &= self.target_mask
        return mask.nonzero().squeeze(1)

    def pool(self) -> torch.Tensor:
        """The questions a context may use."""
        return torch.arange(self.local.num_questions) if self.context_pool is None else self.context_pool


def eval_split(group: GroupData, cfg: ClientConfig, role: str, heldout_qkeys: torch.Tensor | None = None) -> EvalSplit:
    """The one choice of a group's training, context and target questions, for every engine, the predictor and
    the reports. `heldout_qkeys` (--question_split): questions no group trains on; a training group then trains on
    its other questions and scores these, an evaluation group draws its context from its other questions and
    scores these. None: the paper's split (a training group holds back the last 1 - data_split of its questions
    in key order; an evaluation group scores all but its context)."""
    if role not in ("train", "eval"):
        raise ValueError(f"role must be 'train' or 'eval', not {role!r}")
    if heldout_qkeys is None:
        local, heldout = group.split(cfg.data_split) if role == "train" else (group, None)
        return EvalSplit(group.name, role, local, heldout, None, None, cfg)
    held = torch.isin(group.qkeys, heldout_qkeys.to(group.qkeys.device))
    inside, outside = held.nonzero().squeeze(1), (~held).nonzero().squeeze(1)
    if role == "train":
        return EvalSplit(group.name, role, group.subset(outside), group.subset(inside), None, None, cfg)
    return EvalSplit(group.name, role, group, None, outside.cpu(), held.cpu(), cfg)


@torch.no_grad()
def score_group(model: GPO, ctx: GroupData, ctx_q: torch.Tensor, tgt: GroupData, tgt_q: torch.Tensor,
                metric: str, chunk: int = 0) -> GroupEval:
    """Adapt on `ctx_q` of `ctx`, score every question `tgt_q` of `tgt`.

    One forward pass for all targets, or passes of `chunk` target questions to bound memory
    (the numbers are the same either way: targets never attend to each other).
    """
    model.eval()
    # Apply the first layer (x·W_x) once to the points evaluation uses, then gather d_model-wide
    # rows instead of dim_x-wide embeddings. An evaluation group uses all its points; a training
    # group only its few context questions of the local split, which are cut out first.
    if tgt is ctx:
        ctx_p = tgt_p = replace(ctx, x=model.project(ctx.x))
    else:
        ctx, ctx_q = ctx.subset(ctx_q.to(ctx.offsets.device)), torch.arange(len(ctx_q))
        ctx_p, tgt_p = replace(ctx, x=model.project(ctx.x)), replace(tgt, x=model.project(tgt.x))
    step = chunk if chunk and len(tgt_q) > chunk else len(tgt_q)
    try:
        parts = [_distances(model, ctx_p, ctx_q, tgt_p, tgt_q[i:i + step], metric) for i in range(0, len(tgt_q), step)]
    except NonFiniteError as err:
        err.group = err.group or ctx.name  # the run loop names the group that diverged
        raise
    return GroupEval(ctx.name, torch.cat(parts), tgt.qkeys[tgt_q.to(tgt.qkeys.device)].cpu())


def _distances(model: GPO, ctx: GroupData, ctx_q: torch.Tensor, tgt: GroupData, tgt_q: torch.Tensor,
               metric: str) -> torch.Tensor:
    ep = replace(collate([ctx], [ctx_q], [tgt_q], tgt_groups=[tgt]), projected=True)
    pred = model.predict(ep)[0][ep.tgt_mask[0]]
    true = ep.yt[0][ep.tgt_mask[0]]
    sizes = tgt.sizes[tgt_q.to(tgt.offsets.device)]
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    return score_questions(pred.double().cpu(), true.double().cpu(), offsets.cpu(), metric=metric,
                           ordinals=target_ordinals(tgt, tgt_q, metric))


def target_ordinals(tgt: GroupData, tgt_q: torch.Tensor, metric: str) -> torch.Tensor | None:
    """The ordinals of the points of questions `tgt_q`, float64 on the CPU, when `metric` scores with
    them; None when `tgt` has none (score_questions then says the metric needs them)."""
    def gather() -> torch.Tensor | None:
        if tgt.ordinals is None:
            return None
        return tgt.ordinals[gather_points(tgt.offsets, tgt_q.to(tgt.offsets.device))[0]].double().cpu()
    return needed_ordinals(metric, gather)


def group_stats(evals: dict[str, GroupEval]) -> dict:
    """Mean (question-weighted) alignment, per-group scores, CoV, FI and the worst-served groups."""
    if not evals:
        return {"alignment_score": None, "group_scores": {}, "cov": None, "fi": None,
                "worst": None, "gap": None, "bottom_quarter": None}
    scores = {n: e.score for n, e in sorted(evals.items())}
    return {"alignment_score": mean_alignment({n: e.distances for n, e in evals.items()}),
            "group_scores": scores, "cov": cov(list(scores.values())),
            "fi": fairness_index(list(scores.values())), **worst_group(scores)}
