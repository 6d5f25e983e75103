"""The one data representation: a `QuestionBank` (questions and options, shared by all groups) and
per group its answer distributions, which `build_group_data` turns into tensors once, at load time;
episodes and evaluation batches are index slices of them. Points are flat in CSR layout: question q
of a group owns points `offsets[q]:offsets[q+1]`, one per option, in option order.
"""
from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.errors import DataError  # noqa: F401  (re-exported: data_loaders.schema.DataError, as before)


@dataclass
class QuestionBank:
    """Questions with their options, in the order embeddings are stored."""

    qkeys: np.ndarray  # a stable integer key per question (GlobalOpinionQA: the CSV row index)
    questions: list[str]
    options: list[list[str]]
    ordinals: list[list[float]] | None = None  # per question one number per option (OpinionQA), or None

    def __post_init__(self) -> None:
        self.qkeys = np.asarray(self.qkeys, dtype=np.int64)
        sizes = np.array([len(o) for o in self.options], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._row_of_qkey = {int(k): i for i, k in enumerate(self.qkeys)}

    def __len__(self) -> int:
        return len(self.qkeys)

    @property
    def num_points(self) -> int:
        return int(self.offsets[-1])

    def row(self, qkey: int) -> int:
        return self._row_of_qkey[int(qkey)]


@dataclass
class GroupPrefs:
    """One group's answers: `probs[i]` is its distribution over the options of `qkeys[i]`."""

    name: str
    qkeys: np.ndarray
    probs: list[np.ndarray]


@dataclass
class LoadReport:
    """What a loader kept and dropped, in counts, with reasons: printed, never silent."""

    source: str
    kept_questions: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def skip(self, strict: bool, reason: str, what: str, hint: str, warn: bool = False) -> None:
        """--strict: raise. Otherwise count under `reason` (and warn, for a problem worth a console line)."""
        if strict:
            raise DataError(what, hint)
        if warn:
            warnings.warn(f"{what}; skipped and counted (--strict stops instead)", stacklevel=3)
        self.drop(reason)

    def lines(self) -> list[str]:
        out = [f"{self.source}: kept {self.kept_questions} questions"]
        out += [f"  dropped {n}: {reason}" for reason, n in sorted(self.dropped.items())]
        out += [f"  note: {note}" for note in self.notes]
        return out


@dataclass
class RawDataset:
    """A parsed dataset before embedding: shared questions plus per-group answers."""

    name: str
    bank: QuestionBank
    groups: dict[str, GroupPrefs]
    report: LoadReport
    source_hash: str  # content hash of the files it was read from (keys the embedding cache)


@dataclass
class GroupData:
    """One group as tensors: everything a client, an episode or an evaluation needs."""

    name: str
    x: torch.Tensor        # [P, D] option embeddings, P = options over the group's questions
    y: torch.Tensor        # [P] the group's probability of each option (sums to 1 per question)
    offsets: torch.Tensor  # [Q+1] CSR offsets
    qkeys: torch.Tensor    # [Q] question keys, ascending
    ordinals: torch.Tensor | None = None  # [P] option ordinals (Wasserstein scoring)

    @property
    def num_questions(self) -> int:
        return int(self.qkeys.numel())

    @property
    def num_points(self) -> int:
        return int(self.y.numel())

    @property
    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def subset(self, q_idx: torch.Tensor) -> "GroupData":
        q_idx = torch.as_tensor(q_idx, dtype=torch.long)
        sizes = self.sizes[q_idx]
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        return self._points(gather_points(self.offsets, q_idx)[0], offsets, self.qkeys[q_idx])

    def split(self, fraction: float) -> tuple["GroupData", "GroupData"]:
        """Client-local split (method.md §4): the first `fraction` of questions in qkey order, and the
        rest; both are views of this group's tensors (the questions are contiguous)."""
        n_train = int(self.num_questions * fraction)
        return self._range(0, n_train), self._range(n_train, self.num_questions)

    def _range(self, start: int, stop: int) -> "GroupData":
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return self._points(slice(lo, hi), self.offsets[start:stop + 1] - lo, self.qkeys[start:stop])

    def _points(self, points, offsets: torch.Tensor, qkeys: torch.Tensor) -> "GroupData":
        ords = None if self.ordinals is None else self.ordinals[points]
        return GroupData(self.name, self.x[points], self.y[points], offsets, qkeys, ords)

    def to(self, device: torch.device | str) -> "GroupData":
        ords = None if self.ordinals is None else self.ordinals.to(device)
        return GroupData(self.name, self.x.to(device), self.y.to(device), self.offsets.to(device),
                         self.qkeys.to(device), ords)


def close_names(unknown: list[str], known) -> str:
    """"'x': did you mean 'y'?" for every unknown name with a close known one ("" when none has)."""
    close = {u: difflib.get_close_matches(u, sorted(known), n=3) for u in unknown}
    return "; ".join(f"{u!r}: did you mean {', '.join(map(repr, c))}?" for u, c in close.items() if c)


def given_path(data_path: str | None, env_var: str) -> tuple[str, Path] | None:
    """(where it came from, path) of --data_path, else of $env_var; None when neither is set."""
    for origin, value in (("--data_path", data_path), (f"${env_var}", os.environ.get(env_var))):
        if value:
            return origin, Path(value).expanduser()
    return None


def gather_points(offsets: torch.Tensor, q_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point indices of questions `q_idx` (in that order) and each point's position in q_idx."""
    starts = offsets[q_idx]
    sizes = offsets[q_idx + 1] - starts
    seg = torch.repeat_interleave(torch.arange(len(q_idx), device=offsets.device), sizes)
    first = torch.cumsum(sizes, 0) - sizes
    points = starts[seg] + torch.arange(int(sizes.sum()), device=offsets.device) - first[seg]
    return points, seg


def build_group_data(raw: RawDataset, name: str, embeddings: torch.Tensor) -> GroupData:
    """Tensors for one group from the shared embedding table (rows in bank order)."""
    prefs, bank = raw.groups[name], raw.bank
    order = np.argsort(prefs.qkeys, kind="stable")
    ords = None if bank.ordinals is None else torch.tensor([o for q in bank.ordinals for o in q], dtype=torch.float32)
    whole = GroupData(name, embeddings.float(), torch.zeros(bank.num_points), torch.from_numpy(bank.offsets),
                      torch.from_numpy(bank.qkeys), ords)
    group = whole.subset(torch.tensor([bank.row(k) for k in prefs.qkeys[order]], dtype=torch.long))
    group.y = torch.from_numpy(np.concatenate([prefs.probs[i] for i in order]).astype(np.float32)) \
        if len(order) else torch.zeros(0)
    return group
