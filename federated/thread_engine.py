"""Sampled clients trained side by side on a thread pool (`--client_engine threads`).

A local step is many small operations, which intra-op threads split poorly (README, Speed), so each worker runs whole
clients on one intra-op thread: a client's numbers then do not depend on the workers and equal the loop engine's
on one thread."""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from models.flops import train_flops
from models.gpo import GPO, GPOConfig

from .client import FitResult, GroupClient


def default_workers() -> int:
    """torch's intra-op thread count (cores, OMP_NUM_THREADS or torch.set_num_threads): one per client."""
    return torch.get_num_threads()


class ThreadClientEngine:
    def __init__(self, model_cfg: GPOConfig, device: torch.device, workers: int = 0):
        self.model_cfg = model_cfg
        self.workers = workers or default_workers()
        # one scratch model per worker: GroupClient.fit overwrites the weights it is given
        self._models: queue.SimpleQueue[GPO] = queue.SimpleQueue()
        for _ in range(self.workers):
            self._models.put(GPO(model_cfg).to(device))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="client")

    def fit(self, clients: list[GroupClient], global_state: dict, round_: int,
            fit_config: dict | None = None) -> list[FitResult]:
        def run(client: GroupClient) -> FitResult:
            model = self._models.get()
            try:
                return client.fit(model, global_state, round_, fit_config)
            finally:
                self._models.put(model)

        # Largest first (LPT): episode sizes vary, and a big client started last would leave
        # the other workers idle at the end of the round. Order changes no client's numbers.
        cost = [sum(train_flops(self.model_cfg, c, t) for c, t in client.round_episodes(round_))
                for client in clients]
        order = sorted(range(len(clients)), key=lambda i: -cost[i])
        threads = torch.get_num_threads()  # process-wide: 1 while the workers run, then restored
        torch.set_num_threads(1)
        futures = {i: self._pool.submit(run, clients[i]) for i in order}
        try:
            wait(futures.values())  # all done before the thread count is restored
        except BaseException:  # Ctrl-C: drop the clients not started, let the running ones end
            for f in futures.values():
                f.cancel()
            wait(futures.values())
            raise
        finally:
            torch.set_num_threads(threads)
        return [futures[i].result() for i in range(len(clients))]  # client order; errors re-raised here
