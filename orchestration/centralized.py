"""The centralized baseline (method.md §6): one model trained on the training groups' pooled local splits.

  sequential (paper)  each epoch, one step per training group, each on its own episode
  batched (code)      each epoch, one step per batch of up to train_batch_size groups,
                      one episode per group, n_ctx / n_tar drawn once per batch

`central_steps` K repeats that K times per epoch, so with K = FedAvg's local steps an epoch takes
the gradient steps of a FedAvg round: the compute-matched baseline. K = 1 is the paper's epoch.
"""
from __future__ import annotations

import torch

from data_loaders.datasets import ExperimentData
from data_loaders.episodes import sample_batch, sample_episode
from federated.comm import pooling_bytes
from federated.fedavg import evaluate_clients, init_global_state, make_clients, make_diagnostics
from models.gpo import GPO, GPOConfig
from training.config import ClientConfig
from training.local import OptimState, adam_step, check_finite, episode_points, make_adam
from utils.seeding import generator

CENTRAL_MODES = ("sequential", "batched")


class CentralizedTrainer:
    method = "centralized"

    def __init__(self, data: ExperimentData, cfg: ClientConfig, model_cfg: GPOConfig, *,
                 central_mode: str = "sequential", train_batch_size: int = 32, central_steps: int = 1,
                 device="cpu"):
        if central_mode not in CENTRAL_MODES:
            raise ValueError(f"--central_mode {central_mode!r}: choose one of {', '.join(CENTRAL_MODES)}")
        if central_steps < 1:
            raise ValueError(f"--central_steps {central_steps} must be >= 1")
        self.cfg, self.mode, self.batch_size = cfg, central_mode, max(1, train_batch_size)
        self.central_steps = central_steps
        self.device = torch.device(device)
        # Clients here are only data holders and evaluators; training pools their local splits.
        self.clients, self.eval_clients = make_clients(data, cfg, self.device)
        self.model = GPO(model_cfg).to(self.device)
        self.model.load_state_dict(init_global_state(model_cfg, cfg.seed))
        self.optim_state = OptimState()
        self._eval_model = GPO(model_cfg).to(self.device)  # evaluation never touches the trained model
        self.diagnostics = make_diagnostics(self._eval_model, cfg, self.eval_clients, self.clients)
        self.pooling_bytes = pooling_bytes(c.local for c in self.clients.values())  # moved once, before training

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def train_round(self, epoch: int) -> dict:
        self.model.train()
        opt = make_adam(self.model, self.cfg.optim, self.optim_state)
        names = list(self.clients)
        per_group: dict[str, list[float]] = {n: [] for n in names}
        steps = points = 0
        for ep, groups in self._episodes(names, epoch):
            points += episode_points(ep)
            loss = adam_step(self.model, opt, ep, self.cfg.optim, self.optim_state)
            for n in groups:
                per_group[n].append(loss)
            steps += 1
        self.optim_state.adam = opt.state_dict()
        for n in names:  # the first group whose step went non-finite is named
            check_finite(epoch, n, per_group[n])
        check_finite(epoch, "centralized model", [], self.model.state_dict())
        per_client = {n: sum(v) / len(v) for n, v in per_group.items()}
        return {"train_loss": sum(per_client.values()) / len(per_client),
                "train_loss_per_client": per_client, "grad_steps": steps, "points": points, "clients": names}

    def _episodes(self, names: list[str], epoch: int):
        """(episode, the groups it holds) for each step of the epoch. One generator per group (sequential)
        or batch (batched) and epoch: the k-th step draws its k-th episode, so K = 1 is the paper's epoch."""
        if self.mode == "sequential":
            gens = {n: generator(self.cfg.seed, "central_episodes", n, epoch) for n in names}
            for _ in range(self.central_steps):
                for n in names:
                    yield sample_episode(self.clients[n].local, self.cfg.sizes, gens[n]), (n,)
            return
        chunks = [names[start:start + self.batch_size] for start in range(0, len(names), self.batch_size)]
        gens = [generator(self.cfg.seed, "central_batch", i * self.batch_size, epoch) for i in range(len(chunks))]
        for _ in range(self.central_steps):
            for chunk, gen in zip(chunks, gens):
                yield sample_batch([self.clients[n].local for n in chunk], self.cfg.sizes, gen), tuple(chunk)

    def evaluate(self, epoch: int):
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return evaluate_clients(self._eval_model, state, self.eval_clients, self.clients, epoch)

    def state_dict(self) -> dict:
        return {"adam": self.optim_state.adam, "step": self.optim_state.step}

    def load_state_dict(self, state: dict) -> None:
        self.optim_state = OptimState(state["adam"], int(state["step"]))

    def load_global(self, weights: dict) -> None:
        self.model.load_state_dict(weights)
