"""Question identities as features (--question_ids, issue 26; off by default, the paper's input).

Every question that training may see gets one column, 1 on its options' rows and 0 elsewhere, after the option
embeddings. The model can then learn per question what the embedding does not say: the training groups' consensus
on it and the directions in which they differ, as collaborative filtering learns an item's factors (a client sends
only weights, so these per-question weights are averaged like any other). The columns' weights start at 0
(GPOConfig.question_ids) and a question no client trains on never moves them, so its options read as unknown, not
as noise. Questions held out by --question_split get no column at all: the leakage-free protocol scores them as
questions that no model here has seen.
"""
from __future__ import annotations

import numpy as np
import torch

from .schema import QuestionBank


def with_question_ids(bank: QuestionBank, emb: torch.Tensor, heldout_qkeys: torch.Tensor | None
                      ) -> tuple[torch.Tensor, int]:
    """([emb, one-hot question column], number of columns); emb's rows are the bank's options in bank order."""
    qkeys = torch.from_numpy(bank.qkeys)
    known = torch.ones(len(qkeys), dtype=torch.bool) if heldout_qkeys is None else ~torch.isin(qkeys, heldout_qkeys)
    n = int(known.sum())
    column = torch.full((len(qkeys),), -1, dtype=torch.long)
    column[known] = torch.arange(n)
    point_column = torch.repeat_interleave(column, torch.from_numpy(np.diff(bank.offsets)))
    rows = (point_column >= 0).nonzero().squeeze(1)
    ids = emb.new_zeros(emb.shape[0], n)
    ids[rows, point_column[rows]] = 1
    return torch.cat([emb, ids], dim=1), n
