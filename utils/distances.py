"""The per-question distances between predicted and true answer distributions (method.md §7, §9),
and METRICS, their one table (name → function, needs ordinals, label) that every caller reads.

Distances take the CSR layout of `GroupData` (question q owns points offsets[q]:offsets[q+1]),
compute in float64 on a padded [Q, K] matrix (row reductions: deterministic on CUDA), and raise
`MetricError` naming the question for NaN/inf, negative or all-zero distributions (the released
code counted a NaN distance as a perfect score; method.md §8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch

from utils.errors import UserError

SQRT_LN2 = float(np.sqrt(np.log(2.0)))
MAX_LISTED = 10  # indices quoted in an error message

T = TypeVar("T")


class MetricError(UserError, ValueError):
    """A metric got inputs it cannot score (NaN/inf, negative or all-zero distributions)."""


class NonFiniteError(MetricError):
    """A distribution holds NaN/inf; a NaN 'pred' means the model diverged. `group`: set by the evaluation."""

    def __init__(self, name: str, questions: str):
        super().__init__(f"{name} is NaN/inf in question(s) {questions}")
        self.name, self.questions, self.group = name, questions, None


def listed(idx: torch.Tensor) -> str:
    """Indices for an error message: the first MAX_LISTED, and how many more."""
    values = idx.tolist()
    more = f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else ""
    return f"{values[:MAX_LISTED]}{more}"


def segment_ids(offsets: torch.Tensor) -> torch.Tensor:
    """Question index of every point: [P] long, from CSR `offsets` [Q+1]."""
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(sizes), device=offsets.device), sizes)


def _check_dist(values: torch.Tensor, name: str, seg: torch.Tensor, num_q: int) -> torch.Tensor:
    """Validated float64 copy of one per-point distribution; errors name the questions."""
    v = values.detach().to(torch.float64)
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise NonFiniteError(name, listed(seg[bad].unique()))
    neg = v < 0
    if bool(neg.any()):
        raise MetricError(f"{name} has negative probabilities in question(s) {listed(seg[neg].unique())}")
    sums = torch.zeros(num_q, dtype=torch.float64, device=v.device).index_add_(0, seg, v)
    zero = torch.nonzero(sums == 0).flatten()
    if zero.numel():
        raise MetricError(f"{name} sums to zero in question(s) {listed(zero)}: "
                          "cannot normalise a distribution with no mass")
    huge = torch.nonzero(~torch.isfinite(sums)).flatten()
    if huge.numel():
        raise MetricError(f"{name} overflows when summed in question(s) {listed(huge)}: "
                          "pass probabilities or counts, not values near the float limit")
    return v


def _dense(values: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, shape: tuple[int, int],
           fill: float) -> torch.Tensor:
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[seg, pos] = values
    return out


def _padded_pair(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """pred/true validated, as row-normalised [Q, K] matrices (zero padding), and (seg, pos, mask)."""
    if pred.shape != true.shape or pred.dim() != 1:
        raise MetricError(f"pred and true must be 1-D tensors of the same length, "
                          f"got {tuple(pred.shape)} and {tuple(true.shape)}")
    offsets = offsets.to(pred.device)
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


def js_distance(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon distance per question, [Q] float64, natural log: scipy's `jensenshannon(pred_q, true_q)`."""
    p, t, _ = _padded_pair(pred, true, offsets)
    total = torch.where(p + t > 0, p + t, 1.0)  # padding has p = t = 0; its terms are masked
    kl_p = torch.where(p > 0, p * _log_ratio(p, t, total), 0.0).sum(1)
    kl_t = torch.where(t > 0, t * _log_ratio(t, p, total), 0.0).sum(1)
    # Rounding can push the result a hair outside [0, sqrt(ln 2)]; the true value is inside.
    return (0.5 * (kl_p + kl_t)).clamp_min(0.0).sqrt().clamp_max(SQRT_LN2)


def _log_ratio(a: torch.Tensor, b: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """log(a/m), m = (a+b)/2: log1p near a ≈ b (identical distributions give exactly 0), log(2a/(a+b))
    far from it (a tiny a stays finite)."""
    d = (a - b) / total
    return torch.where(d.abs() < 0.5, torch.log1p(d), torch.log(2 * a / total))


def wasserstein_distance_normalised(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor,
                                    ordinals: torch.Tensor) -> torch.Tensor:
    """scipy's `wasserstein_distance(o, o, pred_q, true_q) / (max o − min o)` per question, [Q] float64
    (GPO's OpinionQA score, method.md §9); 0 where the ordinals span nothing."""
    p, t, (seg, pos, mask) = _padded_pair(pred, true, offsets)
    if p.shape[0] == 0:
        return p.new_zeros(0)
    ordinals = ordinals.detach().to(device=p.device, dtype=torch.float64)
    if ordinals.shape != pred.shape:
        raise MetricError(f"ordinals must have one value per point: got {tuple(ordinals.shape)}, "
                          f"pred has {tuple(pred.shape)}")
    bad = ~torch.isfinite(ordinals)
    if bool(bad.any()):
        raise MetricError(f"ordinals are NaN/inf in question(s) {listed(seg[bad].unique())}")
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


@dataclass(frozen=True)
class Metric:
    name: str                               # --metric and the run config's "metric"
    distance: Callable[..., torch.Tensor]   # (pred, true, offsets[, ordinals]) -> [Q] float64
    needs_ordinals: bool                    # scores over option ordinals: data without them cannot use it
    label: str                              # in figures and model cards ("1 − mean <label>")
    default_for: tuple[str, ...] = ()       # datasets `--metric auto` scores with it (their own paper's metric)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("jsd", js_distance, False, "Jensen–Shannon distance"),
    Metric("wasserstein", wasserstein_distance_normalised, True, "normalised Wasserstein distance",
           default_for=("opinionqa",)),
)}
DEFAULT_METRIC = "jsd"  # PluralLLM's (GlobalOpinionQA), needs no ordinals; a run config naming none used it


def metric_named(name: str) -> Metric:
    if name not in METRICS:
        raise MetricError(f"unknown metric {name!r}; choose one of {tuple(METRICS)}")
    return METRICS[name]


def metric_label(name: str) -> str:
    """The label; an unknown name (a later version's card) as it is."""
    return METRICS[name].label if name in METRICS else name


def auto_metric(dataset: str) -> str:
    return next((m.name for m in METRICS.values() if dataset in m.default_for), DEFAULT_METRIC)


def auto_rule() -> str:
    """auto_metric in words, for the flag's help."""
    picks = [f"{m.name} for {', '.join(m.default_for)}" + (" (ordinal options)" if m.needs_ordinals else "")
             for m in METRICS.values() if m.default_for]
    return ", ".join([*picks, f"{DEFAULT_METRIC} otherwise"])


def needed_ordinals(metric: str, gather: Callable[[], T]) -> T | None:
    """`gather()` when `metric` needs option ordinals, else None (without calling it)."""
    return gather() if metric_named(metric).needs_ordinals else None


def score_questions(pred: torch.Tensor, true: torch.Tensor, offsets: torch.Tensor, *,
                    metric: str = DEFAULT_METRIC, ordinals: torch.Tensor | None = None) -> torch.Tensor:
    m = metric_named(metric)
    if not m.needs_ordinals:
        return m.distance(pred, true, offsets)
    if ordinals is None:
        raise MetricError(f"metric {metric!r} needs option ordinals; this data has none "
                          f"(use metric={DEFAULT_METRIC!r}, or load a dataset with ordinals such as opinionqa)")
    return m.distance(pred, true, offsets, ordinals)
