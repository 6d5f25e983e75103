"""Many clients' local steps as one batched computation (`--client_engine vmap`).

The sampled clients' weights are stacked along a leading client axis; each local step
computes every client's gradient on its own episode with torch.func (vmap of grad over
functional_call) and applies Adam to the stacked tensors. Adam is elementwise, so this is
per-client Adam; each client keeps its own step count and cosine learning rate. Episodes
come from the same per-(seed, client, round) generators as the loop engine, padded to a
common size across clients (padding is masked, so it changes no number), and the client
state is stored in torch.optim.Adam's format, so the two engines are interchangeable —
mid-run, across a resume, or in a Flower client.
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad_and_value, vmap

from data_loaders.episodes import sample_episode
from models.gpo import GPO, Episode
from training.local import OptimConfig, cosine_lr, episode_points
from utils.seeding import generator

from .client import FitResult, GroupClient

EPISODE_FIELDS = ("xc", "yc", "ctx_mask", "xt", "yt", "tgt_mask", "tgt_seg")
ADAM_EPS = 1e-8


def stack_episodes(episodes: list[Episode]) -> tuple[dict[str, torch.Tensor], int]:
    """Pad single-episode batches to common sizes and stack them: fields [C, 1, ...]."""
    nc = max(e.xc.shape[1] for e in episodes)
    nt = max(e.xt.shape[1] for e in episodes)
    out = {}
    for name in EPISODE_FIELDS:
        width = nc if name in ("xc", "yc", "ctx_mask") else nt
        parts = []
        for e in episodes:
            t = getattr(e, name)
            pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
            parts.append(torch.nn.functional.pad(t, pad))
        out[name] = torch.stack(parts)
    return out, max(e.num_tgt_q for e in episodes)


def _adam_state(client: GroupClient, names: list[str], params: dict[str, torch.Tensor]):
    """(step, exp_avg per param, exp_avg_sq per param) of one client, zeros when fresh."""
    adam = client.optim_state.adam
    if adam is None:
        return 0.0, [torch.zeros_like(params[n]) for n in names], [torch.zeros_like(params[n]) for n in names]
    state = adam["state"]
    step = float(state[0]["step"]) if 0 in state else 0.0
    # .to(): a checkpoint loads on the CPU while the weights may live on a GPU
    m = [state[i]["exp_avg"].to(params[n].device) if i in state else torch.zeros_like(params[n])
         for i, n in enumerate(names)]
    v = [state[i]["exp_avg_sq"].to(params[n].device) if i in state else torch.zeros_like(params[n])
         for i, n in enumerate(names)]
    return step, m, v


def _torch_adam_dict(template: dict, step: float, m: list[torch.Tensor], v: list[torch.Tensor]) -> dict:
    """One client's state in torch.optim.Adam.state_dict() layout."""
    state = {i: {"step": torch.tensor(step), "exp_avg": mi.clone(), "exp_avg_sq": vi.clone()}
             for i, (mi, vi) in enumerate(zip(m, v))}
    return {"state": state, "param_groups": [dict(g) for g in template["param_groups"]]}


def clip_per_client(grads: dict[str, torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each client of stacked gradients [C, ...], in place."""
    sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)))


class VmapClientEngine:
    """Runs `fit` for a list of clients at once; returns what each client's fit would."""

    def __init__(self, model: GPO, optim: OptimConfig, chunk: int = 0):
        self.model, self.optim, self.chunk = model, optim, chunk or None
        self.names = [n for n, _ in model.named_parameters()]
        # The param_groups half of an Adam state dict, as torch writes it.
        self.template = torch.optim.Adam(model.parameters(), lr=optim.lr, betas=optim.betas).state_dict()

    def _loss(self, params: dict, fields: dict, num_tgt_q: int) -> torch.Tensor:
        ep = Episode(**fields, num_tgt_q=num_tgt_q)
        nll = functional_call(self.model, params, (ep,)).sum()
        # A client's own episode has no padding (its Nt slots are all real); the stacking pads
        # to the largest client, so count the client's real target points, not the padded width.
        return nll / ep.tgt_mask.sum() if self.model.config.loss_reduction == "slot_mean" else nll

    def fit(self, clients: list[GroupClient], global_state: dict, round_: int, steps: int,
            seed: int) -> list[FitResult]:
        C = len(clients)
        params = {n: global_state[n].unsqueeze(0).repeat(C, *[1] * global_state[n].dim()) for n in self.names}
        states = [_adam_state(c, self.names, {n: global_state[n] for n in self.names}) for c in clients]
        m = [torch.stack([s[1][i] for s in states]) for i in range(len(self.names))]
        v = [torch.stack([s[2][i] for s in states]) for i in range(len(self.names))]
        adam_steps = [s[0] for s in states]
        gens = [generator(seed, "episodes", c.name, round_) for c in clients]
        grad_fn = vmap(grad_and_value(self._loss), in_dims=(0, 0, None), chunk_size=self.chunk)
        losses: list[list[float]] = [[] for _ in clients]
        first_points, points = [0] * C, [0] * C  # first episode's and all episodes' points
        self.model.train()
        with self.model.explicit_attention():
            self._steps(clients, params, m, v, adam_steps, gens, grad_fn, losses, first_points, points, steps)
        return self._results(clients, params, m, v, adam_steps, losses, first_points, points, steps)

    def _steps(self, clients, params, m, v, adam_steps, gens, grad_fn, losses, first_points, points, steps) -> None:
        for i in range(steps):
            eps = [sample_episode(c.local, c.cfg.sizes, g) for c, g in zip(clients, gens)]
            counts = [episode_points(e) for e in eps]
            for c, n in enumerate(counts):
                points[c] += n
            if i == 0:
                first_points[:] = counts
            fields, num_tgt_q = stack_episodes(eps)
            lrs = [cosine_lr(c.optim_state.step + i, self.optim) for c in clients]
            grads, loss = grad_fn(params, fields, num_tgt_q)
            if self.optim.grad_clip > 0:
                clip_per_client(grads, self.optim.grad_clip)
            adam_steps[:] = [s + 1 for s in adam_steps]
            self._adam_update(params, grads, m, v, adam_steps, lrs)
            for c, value in enumerate(loss.tolist()):
                losses[c].append(value)

    def _adam_update(self, params, grads, m, v, steps, lrs) -> None:
        """torch.optim.Adam's (non-amsgrad) update, per client, on the stacked tensors."""
        b1, b2 = self.optim.betas
        dev = m[0].device
        step_size = torch.tensor([lr / (1 - b1 ** s) for lr, s in zip(lrs, steps)], device=dev)
        bc2_sqrt = torch.tensor([math.sqrt(1 - b2 ** s) for s in steps], device=dev)
        for i, name in enumerate(self.names):
            g, p = grads[name], params[name]
            shape = (-1,) + (1,) * (p.dim() - 1)
            m[i].lerp_(g, 1 - b1)
            v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v[i].sqrt() / bc2_sqrt.view(shape)).add_(ADAM_EPS)
            p.sub_(step_size.view(shape) * m[i] / denom)

    def _results(self, clients, params, m, v, adam_steps, losses, first_points, points, steps) -> list[FitResult]:
        out = []
        for c, client in enumerate(clients):
            client.optim_state.adam = _torch_adam_dict(self.template, adam_steps[c],
                                                       [mi[c] for mi in m], [vi[c] for vi in v])
            client.optim_state.step += steps
            state = {n: params[n][c].clone() for n in self.names}
            out.append(FitResult(client.name, state, client.num_examples, first_points[c], losses[c], points[c]))
        return out
