"""Replay the first rounds of a recorded run on the current code and compare its losses.

A record is reused instead of retraining only if this code still computes its numbers: its
first REPLAY_ROUNDS rounds are trained again from the same seed, flags and data, with the
torch thread count the run used (a GEMM's reduction order, and so its last bits, depends on
it), into a temporary folder, and every logged loss (the mean and each client's) is compared.
Machines differ in their last bits as well (another CPU model), hence a tolerance, not
equality: a code change that alters numbers moves them far beyond it.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestration.experiment import run_method
from utils.run_io import read_metrics

REPLAY_ROUNDS = 2
TOLERANCE = 1e-5  # relative; issue 21


@dataclass
class Comparison:
    values: int                 # losses compared
    max_rel: float              # largest relative difference (inf: a value missing on one side)
    first_diff: str | None      # the first value beyond the tolerance, in words; None when all agree

    @property
    def ok(self) -> bool:
        return self.first_diff is None


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to n (None or 0: left as it is) for the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def replay_losses(method: str, args: argparse.Namespace, data, rounds: int, threads: int | None) -> list[dict]:
    """losses.jsonl of the first `rounds` rounds of this run, trained again in a temporary folder."""
    a = argparse.Namespace(**vars(args))
    a.wandb, a.no_plots, a.quiet, a.log_every, a.keep_checkpoints, a.resume = "off", True, True, 0, 1, False
    with tempfile.TemporaryDirectory(prefix="plurallm-replay-") as tmp, torch_threads(threads):
        folder = Path(tmp) / "run"
        a.out_dir = str(folder)
        run_method(method, a, data, folder, log=lambda *_: None, stop_after=rounds)
        return read_metrics(folder / "losses.jsonl")


def _values(rows: list[dict]) -> dict[str, float]:
    """'round R train_loss' and 'round R train_loss_per_client[NAME]' -> value, in round order."""
    out = {}
    for r in rows:
        out[f"round {r['round']} train_loss"] = r.get("train_loss")
        for name, v in sorted((r.get("train_loss_per_client") or {}).items()):
            out[f"round {r['round']} train_loss_per_client[{name!r}]"] = v
    return out


def relative_difference(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    a, b = float(a), float(b)
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare_losses(recorded: list[dict], replayed: list[dict], tolerance: float = TOLERANCE) -> Comparison:
    """Each loss of the replayed rounds against the record's, by round and client."""
    rounds = {r["round"] for r in replayed}
    want = _values([r for r in recorded if r["round"] in rounds])
    got = _values(replayed)
    worst, first = 0.0, None
    for key in [*want, *(k for k in got if k not in want)]:
        rel = relative_difference(want.get(key), got.get(key))
        worst = max(worst, rel)
        if rel > tolerance and first is None:
            first = f"{key}: record {want.get(key)!r}, replay {got.get(key)!r} (relative difference {rel:.3g})"
    return Comparison(len(want), worst, first)
