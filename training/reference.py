"""What a model must beat, and which questions it has seen, from the training side only (README.md,
"Metrics"): a question is seen when some training group trains on it; `uniform` and `consensus` (the
training groups' mean answer, uniform where none trains on it) need no model. A model no better than
`consensus` on an evaluation group has learnt a table lookup, not the group.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from data_loaders.schema import GroupData, gather_points
from utils.distances import score_questions

from .evaluation import target_ordinals

BASELINES = ("uniform", "consensus")


@dataclass
class QuestionReference:
    """The training groups' questions as one table: sorted keys, CSR sizes, mean answers."""

    qkeys: torch.Tensor    # [K] sorted keys of the seen questions
    offsets: torch.Tensor  # [K+1] CSR offsets into `mean`
    mean: torch.Tensor     # [P_K] float64 mean distribution over the training groups holding each question

    @classmethod
    def from_groups(cls, groups: Iterable[GroupData]) -> QuestionReference:
        groups = [g.to("cpu") for g in groups if g.num_questions]
        if not groups:
            empty = torch.zeros(0, dtype=torch.long)
            return cls(empty, torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.float64))
        keys = torch.cat([g.qkeys for g in groups]).numpy()
        qkeys, first = (torch.from_numpy(a) for a in np.unique(keys, return_index=True))  # first occurrences
        sizes = torch.cat([g.sizes for g in groups])[first]
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        total = torch.zeros(int(offsets[-1]), dtype=torch.float64)
        count = torch.zeros(len(qkeys), dtype=torch.float64)
        for g in groups:  # one vectorised scatter per group, not a loop over questions
            rows = torch.searchsorted(qkeys, g.qkeys)
            _check_sizes(g, offsets, rows)
            points, _ = gather_points(offsets, rows)
            total.index_add_(0, points, g.y.double())
            count.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
        per_point = torch.repeat_interleave(count, sizes)
        return cls(qkeys, offsets, total / per_point)

    def seen(self, qkeys: torch.Tensor) -> torch.Tensor:
        """[Q] bool: whether each key is a training question of at least one training group."""
        return torch.isin(qkeys.cpu(), self.qkeys)

    def predict(self, kind: str, tgt: GroupData, tgt_q: torch.Tensor) -> torch.Tensor:
        """[points of tgt_q] float64: the baseline's distribution for each target question."""
        tgt_q = tgt_q.cpu()
        sizes = tgt.sizes.cpu()[tgt_q]
        uniform = torch.repeat_interleave(1.0 / sizes.double(), sizes)
        if kind == "uniform":
            return uniform
        if kind != "consensus":
            raise ValueError(f"baseline {kind!r}: choose one of {', '.join(BASELINES)}")
        keys = tgt.qkeys.cpu()[tgt_q]
        known = self.seen(keys)
        pred = uniform.clone()
        if known.any():
            rows = torch.searchsorted(self.qkeys, keys[known])
            src, _ = gather_points(self.offsets, rows)
            dst, _ = gather_points(torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]), known.nonzero().squeeze(1))
            pred[dst] = self.mean[src]
        return pred

    def distances(self, kind: str, tgt: GroupData, tgt_q: torch.Tensor, metric: str) -> torch.Tensor:
        """[Q_target] float64 per-question distances of the baseline, as score_group's for a model."""
        tgt_q = tgt_q.cpu()
        tgt_cpu = tgt.to("cpu")
        sizes = tgt_cpu.sizes[tgt_q]
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        points, _ = gather_points(tgt_cpu.offsets, tgt_q)
        return score_questions(self.predict(kind, tgt_cpu, tgt_q), tgt_cpu.y[points].double(), offsets,
                               metric=metric, ordinals=target_ordinals(tgt_cpu, tgt_q, metric))


def _check_sizes(group: GroupData, offsets: torch.Tensor, rows: torch.Tensor) -> None:
    """Every group holding a question must give it the same number of options (one bank)."""
    table = offsets[rows + 1] - offsets[rows]
    bad = (table != group.sizes).nonzero()
    if len(bad):
        q = int(bad[0])
        raise ValueError(f"group {group.name!r}: question key {int(group.qkeys[q])} has {int(group.sizes[q])} "
                         f"options, another training group's has {int(table[q])}")
