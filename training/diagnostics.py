"""What an evaluation's mean hides, logged beside the paper's numbers (each key: README.md, "Metrics"). It needs
the groups' data, so only the in-process engines log it (the Flower server holds none)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models.gpo import GPO
from utils.seeding import generator

from .evaluation import GroupEval, group_stats, score_group
from .reference import BASELINES, QuestionReference

CONTEXT_CURVE = (1, 5, 10, 20, 40)
CONTROLS = ("own", "partner", "uniform", "shuffled")


def seen_unseen(prefix: str, evals: dict[str, GroupEval], reference: QuestionReference) -> dict:
    """`<prefix>_alignment_seen/_unseen`, their worst group and FI, and the question counts."""
    rec = {}
    masks = {n: reference.seen(e.qkeys) for n, e in evals.items() if e.qkeys is not None}
    for part, keep in (("seen", True), ("unseen", False)):
        sub = {n: GroupEval(n, e.distances[masks[n] == keep]) for n, e in evals.items()
               if n in masks and bool((masks[n] == keep).any())}
        stats = group_stats(sub)
        rec[f"{prefix}_alignment_{part}"] = stats["alignment_score"]
        rec[f"{prefix}_worst_alignment_{part}"] = stats["worst"]
        rec[f"{prefix}_fi_{part}"] = stats["fi"]
        rec[f"{prefix}_questions_{part}"] = int(sum(int((m == keep).sum()) for m in masks.values()))
    return rec


@dataclass
class _Pair:
    name: str
    partner: str
    ctx: torch.Tensor      # context question indices in the group's data
    partner_ctx: torch.Tensor  # the same questions' indices in the partner's data
    targets: torch.Tensor  # target question indices in the group's data


def partners(names: list[str], seed: int) -> dict[str, str]:
    """A seeded derangement: each group's partner is the next one along a random cycle."""
    names = sorted(names)
    if len(names) < 2:
        return {}
    order = [names[i] for i in torch.randperm(len(names), generator=generator(seed, "specificity_pairs")).tolist()]
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


class Diagnostics:
    """The extra fields of an evaluation record, from the global weights and the groups' EvalSplits
    (evaluation.eval_split). The training groups' local splits alone define what is seen and the consensus."""

    def __init__(self, model: GPO, eval_clients: dict, train_clients: dict, metric: str, eval_num_qs: int,
                 eval_seed: int, chunk: int = 0):
        self.model, self.metric, self.chunk = model, metric, chunk
        self.eval_clients, self.train_clients = eval_clients, train_clients
        self.reference = QuestionReference.from_groups(c.local for c in train_clients.values())
        self.eval_seed, self.pairs = eval_seed, self._pairs(eval_num_qs, eval_seed)

    def record(self, round_: int, evals: dict[str, GroupEval], trains: dict[str, GroupEval],
               state: dict, final: bool) -> dict:
        rec = {**seen_unseen("eval", evals, self.reference), **seen_unseen("train", trains, self.reference)}
        rec["baselines"] = self.baselines(round_)
        self.model.load_state_dict(state)
        rec.update(self.specificity())
        if final:
            rec["context_controls"] = self.controls()
            rec["context_curve"] = self.context_curve()
        return rec

    def baselines(self, round_: int) -> dict:
        """Each baseline on the model's own targets of this round: mean, seen, unseen, worst, FI."""
        out = {}
        for kind in BASELINES:
            evals = self._baseline_evals(kind, self.eval_clients, round_)
            trains = self._baseline_evals(kind, self.train_clients, round_)
            e, t = group_stats(evals), group_stats(trains)
            parts = seen_unseen("eval", evals, self.reference)
            out[kind] = {"eval_alignment_score": e["alignment_score"], "eval_worst_alignment": e["worst"],
                         "eval_fi": e["fi"], "eval_alignment_seen": parts["eval_alignment_seen"],
                         "eval_alignment_unseen": parts["eval_alignment_unseen"],
                         "train_alignment_score": t["alignment_score"], "eval_group_scores": e["group_scores"]}
        return out

    def _baseline_evals(self, kind: str, clients: dict, round_: int) -> dict[str, GroupEval]:
        out = {}
        for name, client in clients.items():
            _, tgt, tgt_q = client.eval_questions(round_)
            if len(tgt_q):
                out[name] = GroupEval(name, self.reference.distances(kind, tgt, tgt_q, self.metric),
                                      tgt.qkeys.cpu()[tgt_q.cpu()])
        return out

    def _pairs(self, k: int, seed: int) -> list[_Pair]:
        out = []
        for name, partner in sorted(partners(list(self.eval_clients), seed).items()):
            a, b = self.eval_clients[name], self.eval_clients[partner]
            pool = a.pool()
            shared = pool[torch.isin(a.local.qkeys.cpu()[pool], b.local.qkeys.cpu())]
            ctx = shared[torch.randperm(len(shared), generator=generator(seed, "specificity", name))[:k]]
            targets = a.targets(ctx)
            if len(ctx) and len(targets):
                partner_ctx = torch.searchsorted(b.local.qkeys.cpu(), a.local.qkeys.cpu()[ctx])
                out.append(_Pair(name, partner, ctx, partner_ctx, targets))
        return out

    def _score_with(self, pair: _Pair, kind: str) -> GroupEval:
        """The group's targets, predicted from its context questions carrying `kind` answers."""
        group = self.eval_clients[pair.name].local
        ctx = group.subset(pair.ctx.to(group.offsets.device))
        ctx = replace(ctx, y=self._answers(pair, kind).to(ctx.y.device, ctx.y.dtype))
        return score_group(self.model, ctx, torch.arange(len(pair.ctx)), group, pair.targets, self.metric, self.chunk)

    def _answers(self, pair: _Pair, kind: str) -> torch.Tensor:
        group = self.eval_clients[pair.name].local
        own = group.subset(pair.ctx.to(group.offsets.device))
        if kind == "own":
            return own.y
        if kind == "partner":
            other = self.eval_clients[pair.partner].local
            return other.subset(pair.partner_ctx.to(other.offsets.device)).y
        sizes = own.sizes.cpu()
        if kind == "uniform":
            return torch.repeat_interleave(1.0 / sizes.float(), sizes)
        if kind == "shuffled":  # each question's answer probabilities moved to random options
            seg = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
            noise = torch.rand(len(seg), generator=generator(self.eval_seed, "shuffled_context", pair.name))
            return own.y.cpu()[torch.argsort(seg.double() * 2 + noise)]
        raise ValueError(f"context answers {kind!r}: choose one of {', '.join(CONTROLS)}")

    def specificity(self) -> dict:
        """own − partner alignment per group (positive: the group's own answers help), its mean
        over groups, and the standard error of the paired per-question differences."""
        if not self.pairs:
            return {"eval_group_specificity": None}
        per_group, diffs = {}, []
        for pair in self.pairs:
            own, other = (self._score_with(pair, k) for k in ("own", "partner"))
            per_group[pair.name] = own.score - other.score
            diffs.append(other.distances - own.distances)
        d = torch.cat(diffs)
        se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else None
        return {"eval_group_specificity": sum(per_group.values()) / len(per_group),
                "eval_group_specificity_se": se,
                "eval_group_specificity_per_group": per_group,
                "eval_specificity_context": {p.name: [p.partner, len(p.ctx)] for p in self.pairs}}

    def controls(self) -> dict:
        """Mean alignment (question-weighted) of the paired groups under each context answer."""
        out = {}
        for kind in CONTROLS:
            evals = {p.name: self._score_with(p, kind) for p in self.pairs}
            out[kind] = group_stats(evals)["alignment_score"]
        return out

    def context_curve(self) -> dict:
        """Alignment against the number of context questions. Each group's contexts are nested
        prefixes of one seeded draw, its targets fixed across sizes (outside the draw, or under
        --question_split the held-out questions), so only the context size changes."""
        curves = {name: s for name, c in sorted(self.eval_clients.items()) if (s := self._curve_group(name, c))}
        ks = [k for k in CONTEXT_CURVE if curves and all(k in s for s in curves.values())]
        curve = {"k": ks, "alignment": [], "seen": [], "unseen": []}
        for k in ks:
            evals = {name: s[k] for name, s in curves.items()}
            parts = seen_unseen("eval", evals, self.reference)
            curve["alignment"].append(group_stats(evals)["alignment_score"])
            curve["seen"].append(parts["eval_alignment_seen"])
            curve["unseen"].append(parts["eval_alignment_unseen"])
            if k == ks[0]:  # the targets, hence these counts, are the same at every k
                curve["questions_seen"], curve["questions_unseen"] = (parts["eval_questions_seen"],
                                                                      parts["eval_questions_unseen"])
        return curve

    def _curve_group(self, name: str, split) -> dict[int, GroupEval]:
        pool = split.pool()
        order = pool[torch.randperm(len(pool), generator=generator(self.eval_seed, "context_curve", name))]
        # without held-out targets, the targets are the questions outside the largest context
        order = order[:max(CONTEXT_CURVE) if split.target_mask is not None else min(max(CONTEXT_CURVE), len(order) - 1)]
        targets = split.targets(order)
        if len(order) == 0 or not len(targets):
            return {}
        return {k: score_group(self.model, split.local, order[:k], split.local, targets, self.metric, self.chunk)
                for k in CONTEXT_CURVE if k <= len(order)}

