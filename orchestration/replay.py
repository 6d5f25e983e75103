"""Replay the first rounds of a recorded run on the current code and compare its losses.

A record is reused only if this code still computes its numbers: its first REPLAY_ROUNDS rounds are
trained again (same seed, flags, data and torch thread count) and every logged loss is compared.
On the recording CPU model a replay agrees to 1e-5 relative (in practice exactly); another CPU
model's kernels differ in the last bits, which training amplifies (AMD EPYC records moved by up to
3.4e-4 on an Intel Xeon), so it gets 1e-3; a changed formula moves far more.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestration.config import RunConfig, run_config
from orchestration.experiment import run_method
from utils.jsonl_log import read_metrics

REPLAY_ROUNDS = 2
TOLERANCE = 1e-5             # relative, a replay on the CPU model that recorded the run (issue 21)
CROSS_HOST_TOLERANCE = 1e-3  # relative, on another CPU model (measured above)
SCALE_FLOOR = 1e-3           # the smallest scale a difference is measured against: near 0, absolute


def tolerance_for(recorded_cpu: str | None, here_cpu: str) -> float:
    """TOLERANCE on the CPU model that made the record, CROSS_HOST_TOLERANCE elsewhere (or unknown)."""
    return TOLERANCE if recorded_cpu and recorded_cpu == here_cpu else CROSS_HOST_TOLERANCE


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


def replay_losses(run: RunConfig, data, rounds: int, threads: int | None) -> list[dict]:
    """losses.jsonl of the first `rounds` rounds of this run, trained again in a temporary folder."""
    quiet = {"wandb": "off", "no_plots": True, "quiet": True, "log_every": 0, "keep_checkpoints": 1, "resume": False}
    with tempfile.TemporaryDirectory(prefix="plurallm-replay-") as tmp, torch_threads(threads):
        folder = Path(tmp) / "run"
        run = run_config(argparse.Namespace(**{**run.flags, **quiet, "out_dir": str(folder)}), run.method)
        run_method(run, data, folder, log=lambda *_: None, stop_after=rounds)
        return read_metrics(folder / "losses.jsonl")


def _values(rows: list[dict]) -> dict[str, tuple[int, float]]:
    """'round R train_loss' and 'round R train_loss_per_client[NAME]' -> (R, value), in round order."""
    out = {}
    for r in rows:
        out[f"round {r['round']} train_loss"] = (r["round"], r.get("train_loss"))
        for name, v in sorted((r.get("train_loss_per_client") or {}).items()):
            out[f"round {r['round']} train_loss_per_client[{name!r}]"] = (r["round"], v)
    return out


def _round_scales(values: dict[str, tuple[int, float]]) -> dict[int, float]:
    """Each round's largest |loss|: the scale its losses are compared on. Per-client losses cross
    zero during training and their mean cancels (round 1 of an OpinionQA run: clients from -28 to
    +28, mean -2.5), so a value's own size would turn a last-bit change into a large ratio."""
    scales: dict[int, float] = {}
    for rnd, v in values.values():
        if v is not None and math.isfinite(v):
            scales[rnd] = max(scales.get(rnd, SCALE_FLOOR), abs(v))
    return scales


def relative_difference(a, b, scale: float = SCALE_FLOOR) -> float:
    """|a - b| over the larger of |a|, |b| and `scale`; inf when only one side has a value (or NaN)."""
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), scale)


def compare_losses(recorded: list[dict], replayed: list[dict], tolerance: float = TOLERANCE) -> Comparison:
    """Each loss of the replayed rounds against the record's, by round and client."""
    rounds = {r["round"] for r in replayed}
    want = _values([r for r in recorded if r["round"] in rounds])
    got = _values(replayed)
    scales = _round_scales(want)
    worst, first = 0.0, None
    for key in [*want, *(k for k in got if k not in want)]:
        rnd, a = want.get(key, (None, None))
        b = got.get(key, (None, None))[1]
        rel = relative_difference(a, b, scales.get(rnd, SCALE_FLOOR))
        worst = max(worst, rel)
        if rel > tolerance and first is None:
            first = f"{key}: record {a!r}, replay {b!r} (relative difference {rel:.3g})"
    return Comparison(len(want), worst, first)
