"""Episodes (method.md §4): draw n_ctx and n_tar, shuffle a group's questions, take the first n_ctx
as context and the next n_tar as targets, and gather their points as padded tensors.

With --virtual_tilt (issue 26; off by default, the paper) a training episode is answered by a virtual
group: the real group's answers tilted along a random direction drawn anew for each episode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.gpo import Episode

from .schema import DataError, GroupData, gather_points

MAX_TILT = 20.0  # exp(20 z) already puts a question's whole mass on one option


@dataclass(frozen=True)
class EpisodeSizes:
    """How a training episode is drawn: bounds on its context / target questions (flags
    *_ctx_num_qs, *_tar_num_qs) and the virtual-group tilt (--virtual_tilt, 0 = the paper)."""

    min_ctx: int = 10
    max_ctx: int = 100
    min_tar: int = 10
    max_tar: int = 100
    virtual_tilt: float = 0.0

    def validate(self) -> None:
        for lo, hi, name in ((self.min_ctx, self.max_ctx, "ctx"), (self.min_tar, self.max_tar, "tar")):
            if not 1 <= lo <= hi:
                raise DataError(f"--min_{name}_num_qs {lo} / --max_{name}_num_qs {hi}: need 1 <= min <= max",
                                "both bounds count questions per episode")
        if not 0 <= self.virtual_tilt <= MAX_TILT:
            raise DataError(f"--virtual_tilt {self.virtual_tilt} must be in [0, {MAX_TILT:g}]",
                            "0 trains on the real groups (the paper); 0.5-2 tilts them moderately")

    def draw(self, gen: torch.Generator) -> tuple[int, int]:
        n_ctx = int(torch.randint(self.min_ctx, self.max_ctx + 1, (1,), generator=gen))
        n_tar = int(torch.randint(self.min_tar, self.max_tar + 1, (1,), generator=gen))
        return n_ctx, n_tar


def choose_questions(num_q: int, n_ctx: int, n_tar: int, min_tar: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, target) question indices of one episode. A group with fewer questions than n_ctx + n_tar
    keeps `min_tar` targets by shortening the context, then gets fewer targets (method.md §4)."""
    n_ctx = max(1, min(n_ctx, num_q - min_tar))
    perm = torch.randperm(num_q, generator=gen)
    return perm[:n_ctx], perm[n_ctx:n_ctx + n_tar]


def collate(groups: list[GroupData], ctx_q: list[torch.Tensor], tgt_q: list[torch.Tensor],
            tgt_groups: list[GroupData] | None = None) -> Episode:
    """Pad one episode per group into a batch, question order kept. Targets come from `tgt_groups` when
    given (a training group's held-out questions are another GroupData than its local ones)."""
    B = len(groups)
    tgt_groups = tgt_groups or groups
    dev = groups[0].offsets.device
    ctx_parts = [gather_points(g.offsets, q.to(dev)) for g, q in zip(groups, ctx_q)]
    tgt_parts = [gather_points(g.offsets, q.to(dev)) for g, q in zip(tgt_groups, tgt_q)]
    if B == 1:  # a client's own episode: nothing to pad
        (cp, cseg), (tp, tseg), g, tg = ctx_parts[0], tgt_parts[0], groups[0], tgt_groups[0]
        ones = lambda n: torch.ones(1, n, dtype=torch.bool, device=dev)  # noqa: E731
        return Episode(g.x[cp][None], g.y[cp][None], ones(len(cp)), tg.x[tp][None], tg.y[tp][None],
                       ones(len(tp)), tseg[None], len(tgt_q[0]), ctx_seg=cseg[None], num_ctx_q=len(ctx_q[0]))
    nc = max(len(p) for p, _ in ctx_parts)
    nt = max(len(p) for p, _ in tgt_parts)
    ref, ref_y = groups[0].x, groups[0].y  # x may be stored in bf16 (bf16_input), y never is
    D = ref.shape[1]
    xc, yc = ref.new_zeros(B, nc, D), ref_y.new_zeros(B, nc)
    xt, yt = ref.new_zeros(B, nt, D), ref_y.new_zeros(B, nt)
    ctx_mask = torch.zeros(B, nc, dtype=torch.bool, device=ref.device)
    tgt_mask = torch.zeros(B, nt, dtype=torch.bool, device=ref.device)
    tgt_seg = torch.zeros(B, nt, dtype=torch.long, device=ref.device)
    ctx_seg = torch.zeros(B, nc, dtype=torch.long, device=ref.device)
    for b, (g, tg, (cp, cseg), (tp, tseg)) in enumerate(zip(groups, tgt_groups, ctx_parts, tgt_parts)):
        xc[b, :len(cp)], yc[b, :len(cp)], ctx_mask[b, :len(cp)] = g.x[cp], g.y[cp], True
        xt[b, :len(tp)], yt[b, :len(tp)], tgt_mask[b, :len(tp)] = tg.x[tp], tg.y[tp], True
        tgt_seg[b, :len(tp)], ctx_seg[b, :len(cp)] = tseg, cseg
    return Episode(xc, yc, ctx_mask, xt, yt, tgt_mask, tgt_seg, max(len(q) for q in tgt_q),
                   ctx_seg=ctx_seg, num_ctx_q=max(len(q) for q in ctx_q))


def virtual_group(group: GroupData, tilt: float, gen: torch.Generator) -> GroupData:
    """The group's answers tilted along a random direction u ~ N(0, I) drawn from `gen`: every episode is
    then a group no one has seen, so a model cannot lower its loss by remembering the few training
    groups (docs/group_use.md)."""
    return tilt_answers(group, torch.randn(group.x.shape[1], generator=gen).to(group.x.device), tilt)


def tilt_answers(group: GroupData, u: torch.Tensor, tilt: float) -> GroupData:
    """y'_k ∝ y_k · exp(tilt · z_k) within each question, z_k = (x_k·u − the mean of x·u over the
    question's options) / rms, the rms taken over all the group's centred scores: `tilt` is in
    units of their spread whatever the embedding's dimension or scale."""
    seg = torch.repeat_interleave(torch.arange(group.num_questions, device=group.x.device), group.sizes)
    score = group.x.float() @ u.float()
    per_q = torch.zeros(group.num_questions, device=score.device)
    centred = score - per_q.index_add(0, seg, score)[seg] / group.sizes[seg]
    z = centred / centred.pow(2).mean().sqrt().clamp_min(torch.finfo(score.dtype).tiny)
    weight = group.y.float() * torch.exp(tilt * z)
    y = weight / per_q.index_add(0, seg, weight)[seg]
    return GroupData(group.name, group.x, y.to(group.y.dtype), group.offsets, group.qkeys, group.ordinals)


def _draws(group: GroupData, sizes: EpisodeSizes, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Everything one client episode draws from `gen`: (context, target) questions, then the
    tilt direction (virtual group) when --virtual_tilt is on."""
    n_ctx, n_tar = sizes.draw(gen)
    c, t = choose_questions(group.num_questions, n_ctx, n_tar, sizes.min_tar, gen)
    return c, t, torch.randn(group.x.shape[1], generator=gen) if sizes.virtual_tilt else None


def sample_episode(group: GroupData, sizes: EpisodeSizes, gen: torch.Generator) -> Episode:
    c, t, u = _draws(group, sizes, gen)
    if u is not None:
        group = tilt_answers(group, u.to(group.x.device), sizes.virtual_tilt)
    return collate([group], [c], [t])


def episode_token_counts(group: GroupData, sizes: EpisodeSizes, gen: torch.Generator,
                         steps: int) -> list[tuple[int, int]]:
    """(context points, target points) of the next `steps` episodes sample_episode would draw
    from `gen`: the same draws, without gathering any embedding (for cost estimates)."""
    q_sizes = group.sizes.cpu()
    draws = (_draws(group, sizes, gen) for _ in range(steps))
    return [(int(q_sizes[c].sum()), int(q_sizes[t].sum())) for c, t, _ in draws]


def sample_batch(groups: list[GroupData], sizes: EpisodeSizes, gen: torch.Generator,
                 shared_sizes: bool = True) -> Episode:
    """One episode per group in one padded batch; shared_sizes draws n_ctx, n_tar once for the batch
    (the released code's centralized batch), else per group."""
    drawn = [sizes.draw(gen)] * len(groups) if shared_sizes else [sizes.draw(gen) for _ in groups]
    picks = [choose_questions(g.num_questions, nc, nt, sizes.min_tar, gen) for g, (nc, nt) in zip(groups, drawn)]
    if sizes.virtual_tilt:
        groups = [virtual_group(g, sizes.virtual_tilt, gen) for g in groups]
    return collate(groups, [c for c, _ in picks], [t for _, t in picks])
