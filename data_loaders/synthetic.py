"""Synthetic groups with planted, learnable structure (README, "Datasets"): p_g(k) = softmax_k(<gamma·w +
beta·u_g, f_k> / sqrt(r)), w shared by all groups, u_g the group's latent vector, f_k the option's latent
features, which its embedding maps linearly plus noise. One generator seeded by `seed` draws everything."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .schema import DataError, GroupPrefs, LoadReport, QuestionBank, RawDataset


@dataclass(frozen=True)
class SyntheticSpec:
    num_groups: int = 14
    num_questions: int = 200      # questions in the bank; each group answers `coverage` of them
    min_options: int = 2
    max_options: int = 7
    dim: int = 64                 # embedding dimension (paper scale: 4096)
    latent_dim: int = 8
    coverage: float = 1.0
    beta: float = 1.0             # strength of group-specific preferences
    gamma: float = 1.0            # strength of the preference shared by all groups
    noise: float = 0.1            # embedding noise relative to signal
    seed: int = 0

    def validate(self) -> None:
        if self.num_groups < 2 or self.num_questions < 1:
            raise DataError(f"synthetic data needs >= 2 groups and >= 1 question, got --syn_groups "
                            f"{self.num_groups} and --syn_questions {self.num_questions}", "raise them")
        if not 2 <= self.min_options <= self.max_options:
            raise DataError(f"--syn_min_options {self.min_options} / --syn_max_options {self.max_options}: "
                            "need 2 <= min <= max", "a question needs at least two options")
        if not 0 < self.coverage <= 1:
            raise DataError(f"synthetic coverage {self.coverage} must be in (0, 1]", "use 1.0")
        if self.dim < 1:
            raise DataError(f"--syn_dim {self.dim} must be >= 1", "the paper's embeddings have 4096")


def group_names(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"g{i:0{width}d}" for i in range(n)]


def make_synthetic(spec: SyntheticSpec) -> tuple[RawDataset, torch.Tensor]:
    """(raw dataset, embeddings [num_points, dim] in bank order)."""
    spec.validate()
    gen = torch.Generator().manual_seed(spec.seed)
    sizes = torch.randint(spec.min_options, spec.max_options + 1, (spec.num_questions,), generator=gen)
    n_points = int(sizes.sum())
    feats = torch.randn(n_points, spec.latent_dim, generator=gen)
    shared = torch.randn(spec.latent_dim, generator=gen)
    proj = torch.randn(spec.latent_dim, spec.dim, generator=gen) / spec.latent_dim ** 0.5
    x = feats @ proj + spec.noise * torch.randn(n_points, spec.dim, generator=gen)
    users = torch.randn(spec.num_groups, spec.latent_dim, generator=gen)

    # /sqrt(r) keeps each term's scale at beta (gamma) whatever the latent size.
    logits = (spec.gamma * shared + spec.beta * users) @ feats.T / spec.latent_dim ** 0.5  # [G, P]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    seg = torch.repeat_interleave(torch.arange(spec.num_questions), sizes)
    probs = _segment_softmax_rows(logits, seg, spec.num_questions)

    answered = torch.rand(spec.num_groups, spec.num_questions, generator=gen) < spec.coverage
    names = group_names(spec.num_groups)
    offs = offsets.numpy()
    probs_np = probs.double().numpy()
    groups = {}
    for g, name in enumerate(names):
        qs = np.flatnonzero(answered[g].numpy())
        groups[name] = GroupPrefs(name, qs.astype(np.int64), [probs_np[g, offs[q]:offs[q + 1]] for q in qs])
    bank = QuestionBank(np.arange(spec.num_questions),
                        [f"synthetic question {q}" for q in range(spec.num_questions)],
                        [[f"option {k}" for k in range(int(s))] for s in sizes])
    report = LoadReport(source=f"synthetic {json.dumps(asdict(spec), sort_keys=True)}",
                        kept_questions=spec.num_questions)
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()
    return RawDataset("synthetic", bank, groups, report, digest), x


def _segment_softmax_rows(logits: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Softmax of each row of `logits` within each segment of columns."""
    index = seg.expand_as(logits)
    peak = logits.new_full((logits.shape[0], n_seg), -torch.inf).scatter_reduce(1, index, logits, reduce="amax")
    e = (logits - peak.gather(1, index)).exp()
    total = torch.zeros_like(peak).scatter_add(1, index, e)
    return e / total.gather(1, index)
