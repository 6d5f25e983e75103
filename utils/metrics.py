"""Alignment, fairness and convergence metrics (method.md §7 and §9).

Per-question distances work on the CSR layout of `GroupData`: question q owns the points
`offsets[q]:offsets[q+1]`. They are vectorised over questions (no Python loop), run on CPU
or CUDA, and compute in float64. Each question is scattered into one row of a padded
[Q, K] matrix (K = most options of any question), so per-question sums and cumulative
sums are plain row reductions: deterministic on CUDA, unlike atomic scatter-adds.

Bad numbers are errors, never scores: a NaN/inf or negative probability, or a question
whose distribution sums to zero, raises `MetricError` naming the question (the released
code counted a NaN distance as a perfect score; method.md §8).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from utils.errors import UserError

SQRT_LN2 = float(np.sqrt(np.log(2.0)))
_MAX_LISTED = 10  # question indices quoted in an error message


class MetricError(UserError, ValueError):
    """A metric got inputs it cannot score (NaN/inf, negative or all-zero distributions)."""


class NonFiniteError(MetricError):
    """A distribution holds NaN/inf. `name` says which one: a NaN/inf 'pred' means the model
    diverged (the run loop turns it into a DivergenceError); `group` is filled in by the
    evaluation that scored it."""

    def __init__(self, name: str, questions: str):
        super().__init__(f"{name} is NaN/inf in question(s) {questions}")
        self.name, self.questions, self.group = name, questions, None


# ---------------------------------------------------------------------------------------
# CSR helpers


def segment_ids(offsets: torch.Tensor) -> torch.Tensor:
    """Question index of every point: [P] long, from CSR `offsets` [Q+1]."""
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(sizes), device=offsets.device), sizes)


def _check_offsets(offsets: torch.Tensor, num_points: int) -> None:
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise MetricError(f"offsets must be a 1-D tensor [Q+1], got shape {tuple(offsets.shape)}")
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise MetricError(f"offsets must be an integer tensor, got {offsets.dtype}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_points:
        raise MetricError(f"offsets must run from 0 to the number of points ({num_points}), "
                          f"got {int(offsets[0])}..{int(offsets[-1])}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise MetricError("offsets must be non-decreasing (CSR layout)")


def _listed(q_idx: torch.Tensor) -> str:
    idx = q_idx.tolist()
    more = f" (+{len(idx) - _MAX_LISTED} more)" if len(idx) > _MAX_LISTED else ""
    return f"{idx[:_MAX_LISTED]}{more}"


def _check_dist(values: torch.Tensor, name: str, seg: torch.Tensor, num_q: int) -> torch.Tensor:
    """Validated float64 copy of one per-point distribution; errors name the questions."""
    v = values.detach().to(torch.float64)
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise NonFiniteError(name, _listed(seg[bad].unique()))
    neg = v < 0
    if bool(neg.any()):
        raise MetricError(f"{name} has negative probabilities in question(s) {_listed(seg[neg].unique())}")
    sums = torch.zeros(num_q, dtype=torch.float64, device=v.device).index_add_(0, seg, v)
    zero = torch.nonzero(sums == 0).flatten()
    if zero.numel():
        raise MetricError(f"{name} sums to zero in question(s) {_listed(zero)}: "
                          "cannot normalise a distribution with no mass")
    huge = torch.nonzero(~torch.isfinite(sums)).flatten()
    if huge.numel():
        raise MetricError(f"{name} overflows when summed in question(s) {_listed(huge)}: "
                          "pass probabilities or counts, not values near the float limit")
    return v


def _dense(values: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, shape: tuple[int, int],
           fill: float) -> torch.Tensor:
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[seg, pos] = values
    return out


def _padded_pair(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Validate pred/true and lay them out as row-normalised [Q, K] matrices (zero padding).

    Also returns (seg, pos, mask) so callers can place other per-point values alongside.
    """
    if pred.shape != true.shape or pred.dim() != 1:
        raise MetricError(f"pred and true must be 1-D tensors of the same length, "
                          f"got {tuple(pred.shape)} and {tuple(true.shape)}")
    offsets = offsets.to(pred.device)
    _check_offsets(offsets, pred.numel())
    num_q = offsets.numel() - 1
    seg = segment_ids(offsets)
    p = _check_dist(pred, "pred", seg, num_q)
    t = _check_dist(true.to(pred.device), "true", seg, num_q)
    pos = torch.arange(p.numel(), device=p.device) - offsets[seg]
    k = int((offsets[1:] - offsets[:-1]).max()) if num_q else 0
    shape = (num_q, k)
    pd, td = _dense(p, seg, pos, shape, 0.0), _dense(t, seg, pos, shape, 0.0)
    mask = _dense(torch.ones_like(p, dtype=torch.bool), seg, pos, shape, False)
    return pd / pd.sum(1, keepdim=True), td / td.sum(1, keepdim=True), (seg, pos, mask)


# ---------------------------------------------------------------------------------------
# Per-question distances


def js_distance(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon distance per question, [Q] float64, natural log, in [0, sqrt(ln 2)].

    Equals `scipy.spatial.distance.jensenshannon(pred_q, true_q)` for every question:
    each distribution is normalised to sum 1, 0·log 0 = 0, distance = sqrt(divergence).
    """
    p, t, _ = _padded_pair(pred, true, offsets)
    total = torch.where(p + t > 0, p + t, 1.0)  # padding has p = t = 0; its terms are masked
    kl_p = torch.where(p > 0, p * _log_ratio(p, t, total), 0.0).sum(1)
    kl_t = torch.where(t > 0, t * _log_ratio(t, p, total), 0.0).sum(1)
    # Rounding can push the result a hair outside [0, sqrt(ln 2)]; the true value is inside.
    return (0.5 * (kl_p + kl_t)).clamp_min(0.0).sqrt().clamp_max(SQRT_LN2)


def _log_ratio(a: torch.Tensor, b: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """log(a/m) with m = (a+b)/2, accurate both when a ≈ b and when a ≪ b.

    Near equality log1p((a−b)/(a+b)) avoids the cancellation of log(≈1), so identical
    distributions give exactly 0; far from it log(2a/(a+b)) keeps a tiny a finite where
    1 − (b−a)/(a+b) would round to 0.
    """
    d = (a - b) / total
    return torch.where(d.abs() < 0.5, torch.log1p(d), torch.log(2 * a / total))


def wasserstein_distance_normalised(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor,
                                    ordinals: torch.Tensor) -> torch.Tensor:
    """1-D earth mover's distance over option ordinals, divided by the ordinal span, [Q] float64.

    Per question equals `scipy.stats.wasserstein_distance(o, o, pred_q, true_q) / (max o − min o)`
    (GPO's OpinionQA score, method.md §9), so it lies in [0, 1]. A question whose ordinals
    span nothing (one option, or all ordinals equal) scores 0: both distributions sit on one point.
    """
    p, t, (seg, pos, mask) = _padded_pair(pred, true, offsets)
    if p.shape[0] == 0:
        return p.new_zeros(0)
    ordinals = ordinals.detach().to(device=p.device, dtype=torch.float64)
    if ordinals.shape != pred.shape:
        raise MetricError(f"ordinals must have one value per point: got {tuple(ordinals.shape)}, "
                          f"pred has {tuple(pred.shape)}")
    bad = ~torch.isfinite(ordinals)
    if bool(bad.any()):
        raise MetricError(f"ordinals are NaN/inf in question(s) {_listed(seg[bad].unique())}")
    o = _dense(ordinals, seg, pos, tuple(p.shape), -np.inf)
    hi = o.amax(1, keepdim=True)
    # Padding at the row maximum sorts to the end and adds zero-width steps: no effect.
    o = torch.where(mask, o, hi)
    lo = torch.where(mask, o, np.inf).amin(1, keepdim=True)
    o_sorted, order = torch.sort(o, dim=1, stable=True)
    cdf_gap = (p.gather(1, order).cumsum(1) - t.gather(1, order).cumsum(1)).abs()
    dist = (cdf_gap[:, :-1] * o_sorted.diff(dim=1)).sum(1)
    span = (hi - lo).squeeze(1)
    return torch.where(span > 0, dist / torch.where(span > 0, span, 1.0), 0.0)


METRICS = ("jsd", "wasserstein")


def score_questions(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor, *,
                    metric: str = "jsd", ordinals: torch.Tensor | None = None) -> torch.Tensor:
    """Per-question distance [Q] by name: "jsd" (GlobalOpinionQA) or "wasserstein" (OpinionQA)."""
    if metric == "jsd":
        return js_distance(pred, true, offsets)
    if metric == "wasserstein":
        if ordinals is None:
            raise MetricError("metric 'wasserstein' needs option ordinals; this data has none "
                              "(use metric='jsd', or load a dataset with ordinals such as opinionqa)")
        return wasserstein_distance_normalised(pred, true, offsets, ordinals)
    raise MetricError(f"unknown metric {metric!r}; choose one of {METRICS}")


# ---------------------------------------------------------------------------------------
# Alignment and fairness


def _finite_array(values: torch.Tensor | Sequence[float], what: str) -> np.ndarray:
    arr = (values.detach().to("cpu", torch.float64).numpy() if isinstance(values, torch.Tensor)
           else np.asarray(values, dtype=np.float64)).reshape(-1)
    if arr.size == 0:
        raise MetricError(f"{what}: nothing to score (empty)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise MetricError(f"{what} is NaN/inf at index {_listed(torch.from_numpy(bad))}")
    return arr


def group_alignment(dist_per_q: torch.Tensor | Sequence[float], group: str | None = None) -> float:
    """AS of one group = 1 − mean distance over its target questions (`group` names it in errors)."""
    what = "distance per question" if group is None else f"group {group!r}: distance per question"
    return 1.0 - float(_finite_array(dist_per_q, what).mean())


def group_alignments(per_group_dists: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """AS per group, keyed like the input."""
    return {g: group_alignment(d, g) for g, d in per_group_dists.items()}


def mean_alignment(per_group_dists: Mapping[str, torch.Tensor]) -> float:
    """1 − mean distance over all target questions of all groups (question-weighted, §7).

    Differs from the mean of the per-group AS when groups have different question counts.
    """
    if not per_group_dists:
        raise MetricError("mean_alignment: no groups to score")
    arrays = [_finite_array(d, f"group {g!r}: distance per question") for g, d in per_group_dists.items()]
    return 1.0 - float(np.concatenate(arrays).mean())


def _scores_array(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> np.ndarray:
    if isinstance(scores, Mapping):
        names = list(scores)
        arr = np.asarray([float(scores[n]) for n in names], dtype=np.float64)
        bad = [n for n, v in zip(names, arr) if not np.isfinite(v)]
        if bad:
            raise MetricError(f"score is NaN/inf for group(s) {bad}")
        if arr.size == 0:
            raise MetricError("no scores (empty)")
        return arr
    return _finite_array(scores, "group score")


def cov(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> float:
    """Coefficient of variation of per-group scores: population std / mean (§7).

    Defined for a positive mean only (AS are in (0, 1] for JS); otherwise MetricError.
    """
    arr = _scores_array(scores)
    mean = float(arr.mean())
    if mean <= 0:
        raise MetricError(f"CoV is undefined for a non-positive mean score ({mean})")
    return float(arr.std(ddof=0)) / mean


def fairness_index(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> float:
    """FI = 1 / (1 + CoV²): 1 when all groups score the same, towards 0 as they spread."""
    return 1.0 / (1.0 + cov(scores) ** 2)


def worst_group(scores: Mapping[str, float] | Sequence[float] | torch.Tensor) -> dict[str, float]:
    """The worst-served groups, which mean and FI hide (FI stays near 1 when all scores sit near 0.8).

    worst: the minimum group AS; gap: best minus worst; bottom_quarter: the mean AS of the
    ceil(n/4) lowest-scoring groups (at least one group, so with 1-4 groups it is the worst).
    """
    arr = np.sort(_scores_array(scores))
    k = max(1, math.ceil(arr.size / 4))
    return {"worst": float(arr[0]), "gap": float(arr[-1] - arr[0]), "bottom_quarter": float(arr[:k].mean())}


# ---------------------------------------------------------------------------------------
# Convergence

SMOOTHINGS = ("centred", "ema", "none")


def smooth_curve(losses: Sequence[float], *, smoothing: str = "centred", window: int = 5,
                 alpha: float = 0.1) -> np.ndarray:
    """Smoothed copy of a loss curve (see `convergence_round` for the choices)."""
    y = np.asarray(losses, dtype=np.float64)
    if smoothing == "none":
        return y.copy()
    if smoothing == "centred":
        if window < 1 or window % 2 == 0:
            raise MetricError(f"window must be a positive odd number of evaluations, got {window}")
        half = window // 2
        csum = np.concatenate([[0.0], np.cumsum(y)])
        i = np.arange(len(y))
        lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(y))
        return (csum[hi] - csum[lo]) / (hi - lo)
    if smoothing == "ema":
        if not 0 < alpha <= 1:
            raise MetricError(f"alpha must be in (0, 1], got {alpha}")
        out = np.empty_like(y)
        acc = y[0] if len(y) else 0.0
        for j, v in enumerate(y):  # a loop over rounds, not questions: short and sequential
            acc = alpha * v + (1 - alpha) * acc
            out[j] = acc
        return out
    raise MetricError(f"unknown smoothing {smoothing!r}; choose one of {SMOOTHINGS}")


def convergence_round(rounds: Sequence[int], losses: Sequence[float], *, threshold: float = 0.95,
                      smoothing: str = "centred", window: int = 5, alpha: float = 0.1) -> int | None:
    """First round whose smoothed loss has made `threshold` of the total progress (§7).

    With S the smoothed curve, progress(t) = (S_0 − S_t) / (S_0 − S_final); the answer is
    `rounds[t]` for the first t with progress(t) ≥ threshold. Progress rather than "95% of
    the final value" because the loss can be negative.

    Smoothing (default "centred"): a centred moving average over `window` evaluations
    (odd), truncated to the points that exist at either end. Chosen because the round is
    computed after training on the whole curve, and a centred window has no lag on a
    locally linear curve, whereas a trailing average lags by (window−1)/2 evaluations and
    an EMA by about (1−alpha)/alpha, both reporting convergence systematically late. S_0
    and S_final are smoothed too, so one noisy final evaluation does not move the target.
    `window` counts evaluations, not rounds: scale it with how densely the loss is logged
    (window=1 or smoothing="none" uses the raw curve). "ema" (S_0 = L_0,
    S_t = alpha·L_t + (1−alpha)·S_{t−1}) is there for comparison with causal smoothing.

    Returns None when there is nothing to measure: fewer than 2 points, or no progress
    (S_final ≥ S_0: a flat or increasing curve never converged downwards).
    """
    if len(rounds) != len(losses):
        raise MetricError(f"rounds ({len(rounds)}) and losses ({len(losses)}) differ in length")
    if not 0 < threshold <= 1:
        raise MetricError(f"threshold must be in (0, 1], got {threshold}")
    y = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise MetricError(f"loss is NaN/inf at round(s) {[rounds[i] for i in bad[:_MAX_LISTED]]}")
    r = np.asarray(rounds)
    if len(r) > 1 and np.any(np.diff(r) <= 0):
        raise MetricError("rounds must be strictly increasing")
    if len(y) < 2:
        return None
    s = smooth_curve(y, smoothing=smoothing, window=window, alpha=alpha)
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
    """convergence_round on a centred moving average of `window` points (cut to the curve, made odd);
    None for a curve of fewer than 2 points. The run summary, the reports and the run figures use it."""
    if len(values) < 2:
        return None
    return convergence_round(rounds, values, threshold=threshold, smoothing="centred",
                             window=odd_window(window, len(values)))
