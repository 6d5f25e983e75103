"""FedAvg's round, shared by every engine, and FedAvg in one process (method.md §5). The server sees only
what a client returns (weights, counts, losses, distances), so Flower and SecAgg+ run the same round."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from data_loaders.datasets import ExperimentData
from data_loaders.schema import DataError
from models.gpo import GPO, GPOConfig
from training.config import ClientConfig
from training.diagnostics import Diagnostics
from training.evaluation import GroupEval
from training.local import check_finite
from utils.seeding import generator

from .aggregation import sample_clients
from .client import FitResult, GroupClient
from .comm import pooling_bytes, round_comm
from .server import ServerRules
from .thread_engine import ThreadClientEngine, default_workers

CLIENT_ENGINES = ("auto", "loop", "threads")


def init_global_state(model_cfg: GPOConfig, seed: int) -> dict[str, torch.Tensor]:
    """Initial weights from (seed, 'init') alone: the same on every engine and device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator(seed, "init").initial_seed())
        model = GPO(model_cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_clients(data: ExperimentData, cfg: ClientConfig, device) -> tuple[dict, dict]:
    held = data.heldout_qkeys
    train = {n: GroupClient(g.to(device), cfg, "train", held) for n, g in sorted(data.train.items())}
    evals = {n: GroupClient(g.to(device), cfg, "eval", held) for n, g in sorted(data.eval.items())}
    return train, evals


def make_diagnostics(model: GPO, cfg: ClientConfig, eval_clients: dict, train_clients: dict) -> Diagnostics:
    """Seen/unseen scores, baselines and group specificity, on a scratch model evaluation may borrow."""
    return Diagnostics(model, {n: c.split for n, c in eval_clients.items()},
                       {n: c.split for n, c in train_clients.items()}, cfg.metric, cfg.eval_num_qs, cfg.eval_seed,
                       cfg.eval_batch_size)


def round_stats(losses: dict[str, list[float]], points: int) -> dict:
    """The loop's record of a round: each replying client's mean local loss, steps and points."""
    per_client = {n: sum(v) / len(v) for n, v in sorted(losses.items())}
    return {"train_loss": sum(per_client.values()) / len(per_client),
            "train_loss_per_client": per_client,
            "grad_steps": sum(len(v) for v in losses.values()),
            "points": points,
            "clients": sorted(per_client)}


def resolve_client_engine(requested: str, device: torch.device, model_cfg: GPOConfig) -> str:
    """`auto`: threads on a CPU where torch may use more than one thread (thread_engine.py), else loop
    (a GPU runs one client's kernels at a time anyway)."""
    if requested == "auto":
        return "threads" if device.type == "cpu" and default_workers() > 1 and not model_cfg.dropout else "loop"
    if requested not in CLIENT_ENGINES:
        raise ValueError(f"--client_engine {requested!r}: choose one of {', '.join(CLIENT_ENGINES)}")
    if requested == "threads" and model_cfg.dropout:
        raise DataError(f"--dropout {model_cfg.dropout} does not work with --client_engine threads: dropout draws "
                        "from torch's one global RNG, which concurrent clients would share",
                        "use --client_engine loop with dropout (the paper uses --dropout 0)")
    return requested


def check_min_clients(min_clients: int, sampled: int) -> None:
    if min_clients > sampled:
        raise DataError(f"--min_clients {min_clients} exceeds the {sampled} client(s) sampled per round",
                        "lower --min_clients, or raise --client_fraction / add training groups")


class FedAvgRound(ABC):
    """One FedAvg round: sample, fit, check the replies, aggregate, stats. Each trainer fits the sampled
    clients its way (SecAgg+, whose server gets one sum, also aggregates its own way)."""
    method = "fedavg"

    def __init__(self, cfg: ClientConfig, model_cfg: GPOConfig, train_names: list[str], weighting: str,
                 client_fraction: float, server: ServerRules | None):
        self.cfg, self.client_fraction, self.train_names = cfg, client_fraction, train_names
        self.server = server or ServerRules(weighting=weighting)
        self.global_state = init_global_state(model_cfg, cfg.seed)
        self.last_client_states: dict[str, dict] = {}  # for --save_client

    def train_round(self, round_: int) -> dict:
        sampled = sample_clients(self.train_names, self.client_fraction,
                                 generator(self.cfg.seed, "client_sampling", round_))
        fit_config = self.server.fit_config(round_)
        replies = self.fit_sampled(sampled, round_, fit_config)
        return self.aggregate_replies(replies, len(sampled), round_, fit_config)

    @abstractmethod
    def fit_sampled(self, sampled: list[str], round_: int, fit_config: dict):
        """Send the global weights and `fit_config` to the sampled clients; their replies."""

    def aggregate_replies(self, replies: list[FitResult], sampled: int, round_: int, fit_config: dict) -> dict:
        """The server's rules on the replies, once each is known finite; the round's record."""
        for r in sorted(replies, key=lambda r: r.name):  # a NaN/inf stops the run before aggregation spreads it
            check_finite(round_, r.name, r.losses, r.state)
        self.last_client_states = {r.name: r.state for r in replies}
        comm = round_comm(self.global_state, round_, fit_config, sampled, replies)
        self.global_state = self.server.aggregate(self.global_state, replies, round_)
        stats = round_stats({r.name: r.losses for r in replies}, sum(r.points for r in replies))
        return {**stats, "server": self.server.info(), "comm": comm}


class FedAvgTrainer(FedAvgRound):
    def __init__(self, data: ExperimentData, cfg: ClientConfig, model_cfg: GPOConfig, *,
                 weighting: str = "dataset_size", client_fraction: float = 1.0, device="cpu",
                 client_engine: str = "loop", client_workers: int = 0,
                 server: ServerRules | None = None):
        self.device = torch.device(device)
        self.clients, self.eval_clients = make_clients(data, cfg, self.device)
        super().__init__(cfg, model_cfg, list(self.clients), weighting, client_fraction, server)
        self.model = GPO(model_cfg).to(self.device)  # scratch compute shared by local clients
        self.diagnostics = make_diagnostics(self.model, cfg, self.eval_clients, self.clients)
        self.pooling_bytes = pooling_bytes(c.local for c in self.clients.values())  # what centralizing would move
        self.load_global(self.global_state)
        self.client_engine = resolve_client_engine(client_engine, self.device, model_cfg)
        self.threads = (ThreadClientEngine(model_cfg, self.device, client_workers)
                        if self.client_engine == "threads" else None)

    def fit_sampled(self, sampled: list[str], round_: int, fit_config: dict) -> list[FitResult]:
        clients = [self.clients[n] for n in sampled]
        if self.threads is not None:
            return self.threads.fit(clients, self.global_state, round_, fit_config)
        return [c.fit(self.model, self.global_state, round_, fit_config) for c in clients]

    def evaluate(self, round_: int) -> tuple[dict[str, GroupEval], dict[str, GroupEval]]:
        return evaluate_clients(self.model, self.global_state, self.eval_clients, self.clients, round_)

    def load_global(self, weights: dict) -> None:
        self.global_state = {k: v.to(self.device) for k, v in weights.items()}

    def state_dict(self) -> dict:
        return {"clients": {n: c.state_dict() for n, c in self.clients.items()}, "server": self.server.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for n, s in state["clients"].items():
            self.clients[n].load_state_dict(s)
        self.server.load_state_dict(state["server"])


def evaluate_clients(model: GPO, global_state: dict, eval_clients: dict, train_clients: dict,
                     round_: int) -> tuple[dict[str, GroupEval], dict[str, GroupEval]]:
    """Each client scores itself; only per-question distances come back."""
    evals = {n: c.evaluate(model, global_state, round_) for n, c in eval_clients.items()}
    trains = {n: c.evaluate(model, global_state, round_) for n, c in train_clients.items()}
    return evals, {n: e for n, e in trains.items() if e is not None}
