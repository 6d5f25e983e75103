"""Alignment, fairness and convergence (method.md §7), from per-question distances and loss curves."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from utils.distances import MAX_LISTED, MetricError, listed

# ---------------------------------------------------------------------------------------
# Alignment and fairness


def _finite_array(values: torch.Tensor | Sequence[float], what: str) -> np.ndarray:
    arr = (values.detach().to("cpu", torch.float64).numpy() if isinstance(values, torch.Tensor)
           else np.asarray(values, dtype=np.float64)).reshape(-1)
    if arr.size == 0:
        raise MetricError(f"{what}: nothing to score (empty)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise MetricError(f"{what} is NaN/inf at index {listed(torch.from_numpy(bad))}")
    return arr


def group_alignment(dist_per_q: torch.Tensor | Sequence[float], group: str | None = None) -> float:
    """AS of one group = 1 − mean distance over its target questions (`group` names it in errors)."""
    what = "distance per question" if group is None else f"group {group!r}: distance per question"
    return 1.0 - float(_finite_array(dist_per_q, what).mean())


def mean_alignment(per_group_dists: Mapping[str, torch.Tensor]) -> float:
    """1 − mean distance over all target questions of all groups (question-weighted, §7)."""
    if not per_group_dists:
        raise MetricError("mean_alignment: no groups to score")
    arrays = [_finite_array(d, f"group {g!r}: distance per question") for g, d in per_group_dists.items()]
    return 1.0 - float(np.concatenate(arrays).mean())


def _scores_array(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> np.ndarray:
    if isinstance(scores, Mapping):
        bad = [n for n, v in scores.items() if not math.isfinite(float(v))]
        if bad:
            raise MetricError(f"score is NaN/inf for group(s) {bad}")
        scores = [float(v) for v in scores.values()]
    return _finite_array(scores, "group score")


def cov(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> float:
    """Population std / mean of per-group scores (§7); MetricError for a non-positive mean."""
    arr = _scores_array(scores)
    mean = float(arr.mean())
    if mean <= 0:
        raise MetricError(f"CoV is undefined for a non-positive mean score ({mean})")
    return float(arr.std(ddof=0)) / mean


def fairness_index(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> float:
    """FI = 1 / (1 + CoV²): 1 when all groups score the same, towards 0 as they spread."""
    return 1.0 / (1.0 + cov(scores) ** 2)


def worst_group(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> dict[str, float]:
    """The worst-served groups, which the mean and FI hide: the minimum AS, best minus worst, and the
    mean AS of the ceil(n/4) lowest-scoring groups."""
    arr = np.sort(_scores_array(scores))
    k = max(1, math.ceil(arr.size / 4))
    return {"worst": float(arr[0]), "gap": float(arr[-1] - arr[0]), "bottom_quarter": float(arr[:k].mean())}


# ---------------------------------------------------------------------------------------
# Convergence

SMOOTHINGS = ("centred", "none")


def smooth_curve(losses: Sequence[float], *, smoothing: str = "centred", window: int = 5) -> np.ndarray:
    """Smoothed copy of a loss curve (see `convergence_round` for the choices)."""
    y = np.asarray(losses, dtype=np.float64)
    if smoothing == "none":
        return y.copy()
    if smoothing != "centred":
        raise MetricError(f"unknown smoothing {smoothing!r}; choose one of {SMOOTHINGS}")
    if window < 1 or window % 2 == 0:
        raise MetricError(f"window must be a positive odd number of evaluations, got {window}")
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(y))
    return (csum[hi] - csum[lo]) / (hi - lo)


def convergence_round(rounds: Sequence[int], losses: Sequence[float], *, threshold: float = 0.95,
                      smoothing: str = "centred", window: int = 5) -> int | None:
    """First round t with (S_0 − S_t) / (S_0 − S_final) ≥ `threshold`, S the smoothed loss (§7): progress,
    since the loss can be negative. None for fewer than 2 points or no progress.

    "centred" (the default) averages `window` evaluations (odd, truncated at the ends): computed after
    training, it has no lag on a locally linear curve, where a trailing average or an EMA report convergence
    late. S_0 and S_final are smoothed too; "none" scores the raw curve.
    """
    if len(rounds) != len(losses):
        raise MetricError(f"rounds ({len(rounds)}) and losses ({len(losses)}) differ in length")
    if not 0 < threshold <= 1:
        raise MetricError(f"threshold must be in (0, 1], got {threshold}")
    y = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise MetricError(f"loss is NaN/inf at round(s) {[rounds[i] for i in bad[:MAX_LISTED]]}")
    r = np.asarray(rounds)
    if len(r) > 1 and np.any(np.diff(r) <= 0):
        raise MetricError("rounds must be strictly increasing")
    if len(y) < 2:
        return None
    s = smooth_curve(y, smoothing=smoothing, window=window)
    total = s[0] - s[-1]
    if not total > 0:
        return None
    reached = np.flatnonzero((s[0] - s) / total >= threshold)
    return int(r[reached[0]])


LOSS_WINDOW_ROUNDS = 21  # the centred moving average behind the convergence round (loss logged every round)


def odd_window(window: int, length: int) -> int:
    """`window` cut to a curve of `length` points and made odd, as a centred average needs."""
    w = max(1, min(window, length))
    return w if w % 2 else w - 1


def curve_convergence_round(rounds: Sequence[int], values: Sequence[float], *, threshold: float = 0.95,
                            window: int = LOSS_WINDOW_ROUNDS) -> int | None:
    """convergence_round, centred over `window` points (cut to the curve, made odd); the summary, reports
    and figures use it."""
    if len(values) < 2:
        return None
    return convergence_round(rounds, values, threshold=threshold, smoothing="centred",
                             window=odd_window(window, len(values)))
