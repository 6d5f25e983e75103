"""GPO: a transformer neural process over (option embedding, group probability) points.

method.md §3. Every token attends only to real context tokens, so the layer is computed as attention with queries =
[context; targets] and keys/values = context: the same numbers as the full self-attention with the GPO mask, without
the target-target block (cost O((Nc+Nt)·Nc) instead of O((Nc+Nt)^2)). Targets never see each other, which is why
scoring all of a group's questions in one pass equals scoring them one at a time."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_INITS = ("independent", "clones")
LOSS_REDUCTIONS = ("sum", "slot_mean")
CONTEXT_ANSWERS = ("concat", "product")


@dataclass
class GPOConfig:
    dim_x: int                    # option-embedding size, taken from the data
    dim_y: int = 1
    d_model: int = 128
    emb_depth: int = 4            # linear layers in the input embedder
    dim_feedforward: int = 128
    nhead: int = 4
    dropout: float = 0.0
    num_layers: int = 6
    bound_std: bool = False
    # "independent" (paper): every layer drawn on its own; "clones" (released code): all start as layer 0.
    layer_init: str = "independent"
    # "sum" (GPO): NLL summed over real target points, mean over episodes; "slot_mean" (released
    # code): the same sum divided by B·Nt, every padded target slot counted (method.md §3).
    loss_reduction: str = "sum"
    # How a context answer y enters the embedder. "concat" (paper): the input is [x, y], y one
    # value beside dim_x embedding dimensions. "product" (issue 26): [x, y, y·x], the answer also
    # scales a copy of the option embedding with weights of its own, so a context pooled by
    # attention carries the answer-weighted embedding linearly. Targets (y = 0) are unchanged.
    context_answer: str = "concat"
    # In-context factors (issue 26, docs/group_use.md): F > 0 adds a head x -> (c(x), B(x) in R^F) and adds
    # B(x_t)·a to the target mean logits, a the ridge fit (penalty factor_ridge) of the context residuals
    # y - softmax(c) on B(x_c): a real group is nearly a low-rank mix of the training groups' deviations.
    context_factors: int = 0
    factor_ridge: float = 1e-2
    # --question_ids (issue 26): the last question_ids columns of x are one-hot question identities
    # (data_loaders/question_ids.py). Their input weights start at 0, so a question no client trains on adds nothing.
    question_ids: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def input_dim(self) -> int:
        """Width of the embedder's input: [x, y], and y·x with context_answer "product"."""
        return self.dim_x + self.dim_y + (self.dim_x if self.context_answer == "product" else 0)


@dataclass
class Episode:
    """A padded batch of B episodes. Masks are True for real points.

    tgt_seg gives each target point its question's index within the episode; padded target points carry any valid
    index, their mask keeps them out of every sum."""

    xc: torch.Tensor        # [B, Nc, D]
    yc: torch.Tensor        # [B, Nc]
    ctx_mask: torch.Tensor  # [B, Nc] bool
    xt: torch.Tensor        # [B, Nt, D]
    yt: torch.Tensor        # [B, Nt]
    tgt_mask: torch.Tensor  # [B, Nt] bool
    tgt_seg: torch.Tensor   # [B, Nt] long
    num_tgt_q: int          # max target questions per episode (segment count)
    projected: bool = False  # xc/xt already hold x·W_x + b (see GPO.project), [B, N, d_model]
    ctx_seg: torch.Tensor | None = None  # [B, Nc] long, as tgt_seg (the context factors' softmax needs it)
    num_ctx_q: int = 0

    def to(self, device) -> "Episode":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return Episode(**moved)


def mlp(dim_in: int, dim_hid: int, dim_out: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(dim_in, dim_hid), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(dim_hid, dim_hid), nn.ReLU()]
    layers.append(nn.Linear(dim_hid, dim_out))
    return nn.Sequential(*layers)


class ContextAttentionLayer(nn.Module):
    """Post-norm transformer layer (as nn.TransformerEncoderLayer, ReLU) whose keys are the context.

    Parameter names match nn.TransformerEncoderLayer so weights move between the two."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.nhead = nhead
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, num_ctx: int, key_mask: torch.Tensor,
                targets_only: bool = False) -> torch.Tensor:
        """h: [B, Nc + Nt, d] -> the same, or only the target rows [B, Nt, d] when `targets_only`."""
        d = h.shape[-1]
        hd = d // self.nhead
        w, b = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        kv = F.linear(h[:, :num_ctx], w[d:], b[d:])  # only context tokens are ever keys
        if targets_only:
            h = h[:, num_ctx:]
        B, T, _ = h.shape
        q = F.linear(h, w[:d], b[:d])
        k, v = kv.chunk(2, dim=-1)
        split = lambda t: t.view(B, -1, self.nhead, hd).transpose(1, 2)  # noqa: E731
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=key_mask[:, None, None, :],
                                             dropout_p=p)
        att = self.self_attn.out_proj(att.transpose(1, 2).reshape(B, T, d))
        h = self.norm1(h + F.dropout(att, p, self.training))
        ff = self.linear2(F.dropout(F.relu(self.linear1(h)), p, self.training))
        return self.norm2(h + F.dropout(ff, p, self.training))


class GPO(nn.Module):
    def __init__(self, config: GPOConfig):
        super().__init__()
        self.config = config
        c = config
        for name, choices in (("context_answer", CONTEXT_ANSWERS), ("layer_init", LAYER_INITS),
                              ("loss_reduction", LOSS_REDUCTIONS)):
            if getattr(c, name) not in choices:
                raise ValueError(f"{name} {getattr(c, name)!r}: choose one of {', '.join(choices)}")
        if c.context_factors < 0:
            raise ValueError(f"context_factors {c.context_factors}: give 0 (off) or a positive number of factors")
        if c.context_factors and not c.factor_ridge > 0:  # a context shorter than F makes the fit singular
            raise ValueError(f"factor_ridge {c.factor_ridge}: the context factors need a positive ridge penalty")
        if not 0 <= c.question_ids <= c.dim_x:
            raise ValueError(f"question_ids {c.question_ids}: give 0 (off) or at most dim_x ({c.dim_x}) columns")
        self.product = c.context_answer == "product"
        self.embedder = mlp(c.input_dim, c.d_model, c.d_model, c.emb_depth)
        self.layers = nn.ModuleList(ContextAttentionLayer(c.d_model, c.nhead, c.dim_feedforward, c.dropout)
                                    for _ in range(c.num_layers))
        self.predictor = nn.Sequential(nn.Linear(c.d_model, c.dim_feedforward), nn.ReLU(),
                                       nn.Linear(c.dim_feedforward, c.dim_y * 2))
        if c.layer_init == "clones":
            # nn.TransformerEncoder deep-copies the layer it is given, so all layers start equal.
            for layer in self.layers[1:]:
                layer.load_state_dict(self.layers[0].state_dict())
        # Built last and only when asked for, so that F = 0 draws the same initial weights as before.
        # It reads x alone: a context point's factors must not see its answer.
        self.factor_head = mlp(c.dim_x, c.d_model, 1 + c.context_factors, 2) if c.context_factors else None
        if c.question_ids:
            self._zero_question_id_weights()

    @torch.no_grad()
    def _zero_question_id_weights(self) -> None:
        """After every initial draw, so the other weights are those of the same model without the columns."""
        n, first = self.config.question_ids, self.embedder[0].weight
        first[:, self.config.dim_x - n:self.config.dim_x] = 0
        if self.product:  # the y·x columns come last
            first[:, -n:] = 0
        if self.factor_head is not None:
            self.factor_head[0].weight[:, -n:] = 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x·W_x + b, the embedder's first layer without the y column, for points given once.

        Evaluation embeds a whole group's points with it and then gathers 128-wide rows, instead of gathering
        4096-wide embeddings into an episode first. With context_answer "product" the rows are [x·W_x + b, x·W_p]
        (2·d_model wide): y·(x·W_p) is the product term (y·x)·W_p, so it needs no raw x either. With context
        factors the factor head's 1 + F outputs are appended last."""
        h = self._x_linear(x)
        h = torch.cat([h, self._x_linear(x, product=True)], dim=-1) if self.product else h
        return torch.cat([h, self.factor_head(x)], dim=-1) if self.factor_head is not None else h

    def _x_linear(self, x: torch.Tensor, product: bool = False) -> torch.Tensor:
        """x·W_x + b, or x·W_p (no bias) with `product`: the columns that multiply y·x."""
        first, dim_x = self.embedder[0], self.config.dim_x
        w_x = first.weight[:, dim_x + self.config.dim_y:] if product else first.weight[:, :dim_x]
        return F.linear(x, w_x, None if product else first.bias)

    def embed(self, x: torch.Tensor, y: torch.Tensor | None, projected: bool = False) -> torch.Tensor:
        """The embedder MLP on [x, y] (y = 0 for targets), without building [x, y].

        The first layer is split as x·W_x + y·w_y: concatenating a column to thousands of embedding dimensions would
        copy the whole episode once more per forward pass."""
        first, dim_x = self.embedder[0], self.config.dim_x
        if self.product:
            d = first.weight.shape[0]
            h, hp = (x[..., :d], x[..., d:]) if projected else (self._x_linear(x), None)
        else:
            h = x if projected else self._x_linear(x)
        if y is not None:
            y = y.unsqueeze(-1).to(h.dtype)
            h = h + y * first.weight[:, dim_x]
            if self.product:
                h = h + y * (self._x_linear(x, product=True) if hp is None else hp)
        return self.embedder[1:](h)

    def encode_targets(self, ep: Episode) -> torch.Tensor:
        """Representations of the target tokens, [B, Nt, d_model]."""
        if self._fused_first_layer(ep):
            hc, ht = FirstLayer.apply(ep.xc, ep.yc, ep.xt, self.embedder[0].weight, self.embedder[0].bias)
            h = self.embedder[1:](torch.cat([hc, ht], dim=1))
        else:
            h = torch.cat([self.embed(ep.xc, ep.yc, ep.projected), self.embed(ep.xt, None, ep.projected)], dim=1)
        num_ctx, last = ep.xc.shape[1], len(self.layers) - 1
        # Context rows of the last layer feed nothing (the predictor reads targets only), so
        # that layer computes target rows only: ~1/12 fewer FLOPs, forward and backward.
        for i, layer in enumerate(self.layers):
            h = layer(h, num_ctx, ep.ctx_mask, targets_only=i == last)
        return h

    def _fused_first_layer(self, ep: Episode) -> bool:
        """FirstLayer serves training steps; already-projected episodes and inputs that want their own
        gradient (FirstLayer computes the weights' only) take the plain path (same numbers)."""
        inputs_grad = ep.xc.requires_grad or ep.yc.requires_grad or ep.xt.requires_grad
        return torch.is_grad_enabled() and not ep.projected and not inputs_grad and not self.product

    def predict_raw(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-question softmax of the means, std), both [B, Nt]."""
        if self.factor_head is not None:
            ep, head_c, head_t = self._factor_outputs(ep)
        out = self.predictor(self.encode_targets(ep))
        raw_mean, raw_std = out[..., 0], out[..., 1]
        if self.factor_head is not None:
            raw_mean = raw_mean + fold_in(head_c, head_t, ep, self.config.factor_ridge)
        mean = segment_softmax(raw_mean, ep.tgt_seg, ep.tgt_mask, ep.num_tgt_q)
        std = 0.05 + 0.95 * F.softplus(raw_std) if self.config.bound_std else raw_std.exp()
        return mean, std

    def _factor_outputs(self, ep: Episode) -> tuple[Episode, torch.Tensor, torch.Tensor]:
        """(the episode without the head's columns, head outputs of context and targets [B, N, 1 + F])."""
        if not ep.projected:
            return ep, self.factor_head(ep.xc), self.factor_head(ep.xt)
        k = 1 + self.config.context_factors  # project() appended them
        return replace(ep, xc=ep.xc[..., :-k], xt=ep.xt[..., :-k]), ep.xc[..., -k:], ep.xt[..., -k:]

    def forward(self, ep: Episode) -> torch.Tensor:
        """Per-episode negative log-likelihood summed over real target points, [B]."""
        mean, std = self.predict_raw(ep)
        var = std ** 2
        log_prob = -((ep.yt - mean) ** 2) / (2 * var) - std.log() - 0.5 * math.log(2 * math.pi)
        return -(log_prob * ep.tgt_mask).sum(-1)

    def loss(self, ep: Episode) -> torch.Tensor:
        """Mean over the batch of episodes (method.md §3); `slot_mean` also divides by the
        padded number of target slots Nt, as the released code's `.sum(-1).mean()` does."""
        nll = self.forward(ep)
        if self.config.loss_reduction == "slot_mean":
            return nll.sum() / (nll.shape[0] * ep.yt.shape[1])
        return nll.mean()

    @torch.no_grad()
    def predict(self, ep: Episode) -> torch.Tensor:
        """Predicted distribution of every target question (softmax over its options), [B, Nt]."""
        return self.predict_raw(ep)[0]


class FirstLayer(torch.autograd.Function):
    """The embedder's first layer on context and targets at once: [x, y]·Wᵀ + b with y = 0 for targets, without
    building [x, y] and without slicing W in autograd.

    Autograd through `W[:, :dim_x]` and `W[:, dim_x]` allocates a zeroed [d, dim_x + 1] gradient per slice and per
    call (context, targets) and copies into it, about 6% of a paper-scale step; here the weight gradient is written
    once, in place, with BLAS."""

    @staticmethod
    def forward(ctx, xc, yc, xt, weight, bias):
        dim_x = xc.shape[-1]
        hc, ht = F.linear(xc, weight[:, :dim_x], bias), F.linear(xt, weight[:, :dim_x], bias)
        hc.addcmul_(yc.unsqueeze(-1), weight[:, dim_x])
        ctx.save_for_backward(xc, yc, xt)
        return hc, ht

    @staticmethod
    def backward(ctx, grad_c, grad_t):
        xc, yc, xt = ctx.saved_tensors
        dim_x, d = xc.shape[-1], grad_c.shape[-1]
        gc, gt = grad_c.reshape(-1, d), grad_t.reshape(-1, d)
        grad_w = gc.new_empty(d, dim_x + 1)
        torch.mm(gc.t(), xc.reshape(-1, dim_x), out=grad_w[:, :dim_x])
        grad_w[:, :dim_x].addmm_(gt.t(), xt.reshape(-1, dim_x))
        torch.mv(gc.t(), yc.reshape(-1), out=grad_w[:, dim_x])
        return None, None, None, grad_w, gc.sum(0) + gt.sum(0)


def fold_in(head_c: torch.Tensor, head_t: torch.Tensor, ep: Episode, ridge: float) -> torch.Tensor:
    """B(x_t)·a for every target point, [B, Nt]: a = argmin ||B_c a - r||² + ridge·||a||², r = y_c - softmax(c(x_c))
    per context question, solved in closed form per episode (padded context points drop out of both sums)."""
    if ep.ctx_seg is None:
        raise ValueError("context factors need the context's question segments (Episode.ctx_seg); build the "
                         "episode with data_loaders.episodes.collate")
    mask = ep.ctx_mask.to(head_c.dtype)
    resid = (ep.yc.to(head_c.dtype) - segment_softmax(head_c[..., 0], ep.ctx_seg, ep.ctx_mask, ep.num_ctx_q)) * mask
    b_c = head_c[..., 1:] * mask.unsqueeze(-1)
    eye = torch.eye(b_c.shape[-1], dtype=b_c.dtype, device=b_c.device)
    loadings = torch.linalg.solve(b_c.transpose(1, 2) @ b_c + ridge * eye, (b_c.transpose(1, 2) @ resid.unsqueeze(-1)))
    return (head_t[..., 1:] @ loadings).squeeze(-1)


def segment_softmax(values: torch.Tensor, seg: torch.Tensor, mask: torch.Tensor, num_seg: int) -> torch.Tensor:
    """Softmax of `values` within each (row, segment); masked entries get 0.

    Vectorised with scatter: row b's segment s becomes flat bucket b*num_seg + s."""
    B, N = values.shape
    bucket = (seg + torch.arange(B, device=seg.device)[:, None] * num_seg).reshape(-1)
    flat = values.masked_fill(~mask, -torch.inf).reshape(-1)
    peak = flat.new_full((B * num_seg,), -torch.inf).scatter_reduce(0, bucket, flat, "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = (flat - peak[bucket]).exp()  # exp(-inf) = 0 for masked entries
    total = flat.new_zeros(B * num_seg).index_add(0, bucket, e)
    out = e / total[bucket].clamp_min(torch.finfo(e.dtype).tiny)
    return out.view(B, N)
