"""Numbers over seeds: mean, sample std, Student-t 95% CI; the paper's headline comparisons.

Conventions (written into every table):
  std   sample standard deviation over seeds (ddof = 1)
  CI    mean ± t(0.975, n−1) · std / √n, Student t with n−1 degrees of freedom
  n     seeds with a value (a run whose loss never improved has no convergence round)
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from scipy import stats as sps

from .runs import METHOD_LABELS, METHODS, Run, RunSet

# The paper's numbers (method.md §7): FedAvg converged at round 634, centralized at 1,180,
# ~4% higher mean evaluation alignment, FI ≈ 1 for both. Its protocol: 1,300 rounds, 8 train
# groups, 6 local steps per client per round, centralized one step per group per epoch.
PAPER = {"fedavg_round": 634, "centralized_round": 1180, "alignment_gain_pct": 4.0, "fi": 1.0,
         "rounds": 1300, "train_groups": 8, "epochs": 6, "emb_dim": 4096, "emb_model": "Alpaca-7B"}
PAPER["rounds_fewer_pct"] = 100.0 * (1 - PAPER["fedavg_round"] / PAPER["centralized_round"])
# Gradient steps to convergence implied by the paper's rounds (not reported by the paper).
PAPER["fedavg_steps"] = PAPER["fedavg_round"] * PAPER["train_groups"] * PAPER["epochs"]
PAPER["centralized_steps"] = PAPER["centralized_round"] * PAPER["train_groups"]
PAPER["steps_fewer_pct"] = 100.0 * (1 - PAPER["fedavg_steps"] / PAPER["centralized_steps"])


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...] = ()
    dropped: int = 0            # seeds without a value

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else self.ci_high - self.mean


def describe(values, confidence: float = 0.95) -> Stat:
    """Mean, sample std and Student-t CI of the non-None values."""
    vals = tuple(float(v) for v in values if v is not None)
    dropped = sum(1 for v in values if v is None)
    n = len(vals)
    if n == 0:
        return Stat(0, None, None, None, None, vals, dropped)
    mean = sum(vals) / n
    if n == 1:
        return Stat(1, mean, None, None, None, vals, dropped)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half, vals, dropped)


# ----------------------------------------------------------------------------------------
# per-seed numbers


def wall_time_to_convergence(run: Run) -> float | None:
    """Wall time at the first evaluation at or after the convergence round (includes evaluations)."""
    conv = (run.summary or {}).get("convergence_round")
    if conv is None:
        return None
    later = [r for r in run.metrics if r["round"] >= conv]
    return float(min(later, key=lambda r: r["round"])["wall_time_s"]) if later else None


# (key, label, getter, format); the order is the table's.
def _s(key):
    return lambda run: (run.summary or {}).get(key)


ROWS = (
    ("convergence_round", "Convergence round", _s("convergence_round"), "{:.1f}"),
    ("final_eval_alignment_score", "Final mean eval alignment", _s("final_eval_alignment_score"), "{:.4f}"),
    ("best_eval_alignment_score", "Best mean eval alignment", _s("best_eval_alignment_score"), "{:.4f}"),
    ("final_eval_fi", "FI, eval groups (final)", _s("final_eval_fi"), "{:.5f}"),
    ("final_eval_cov", "CoV, eval groups (final)", _s("final_eval_cov"), "{:.4f}"),
    ("final_train_alignment_score", "Held-out alignment, train groups (final)", _s("final_train_alignment_score"),
     "{:.4f}"),
    ("final_train_fi", "FI, train groups (final)", _s("final_train_fi"), "{:.5f}"),
    ("final_train_cov", "CoV, train groups (final)", _s("final_train_cov"), "{:.4f}"),
    ("wall_time_s", "Wall time, whole run (s)", _s("wall_time_s"), "{:.1f}"),
    ("wall_time_to_convergence_s", "Wall time to convergence (s)", wall_time_to_convergence, "{:.1f}"),
    ("convergence_grad_steps", "Gradient steps to convergence", _s("convergence_grad_steps"), "{:.0f}"),
    ("convergence_points", "Points processed to convergence", _s("convergence_points"), "{:.0f}"),
    ("total_grad_steps", "Gradient steps, whole run", _s("total_grad_steps"), "{:.0f}"),
)


def seed_values(runset: RunSet) -> dict[str, dict[str, dict[int, float | None]]]:
    """{metric key: {method: {seed: value}}} over the finished runs."""
    out: dict[str, dict[str, dict[int, float | None]]] = {}
    for key, _, get, _ in ROWS:
        out[key] = {m: {s: get(r) for s, r in sorted(runset.finished(m).items())} for m in runset.methods}
    return out


def method_stats(runset: RunSet) -> dict[str, dict[str, Stat]]:
    """{metric key: {method: Stat over its seeds}}."""
    vals = seed_values(runset)
    return {k: {m: describe(list(v[m].values())) for m in runset.methods} for k, v in vals.items()}


# ----------------------------------------------------------------------------------------
# headline comparisons


def pct_fewer(fed: float | None, cen: float | None) -> float | None:
    """How many % fewer FedAvg needs than centralized: 100·(1 − fed/cen)."""
    if fed is None or cen is None or cen == 0:
        return None
    return 100.0 * (1.0 - fed / cen)


def pct_gain(fed: float | None, cen: float | None) -> float | None:
    """Relative improvement of FedAvg over centralized, %: 100·(fed − cen)/cen."""
    if fed is None or cen is None or cen == 0:
        return None
    return 100.0 * (fed - cen) / cen


def diff(fed: float | None, cen: float | None) -> float | None:
    return None if fed is None or cen is None else fed - cen


@dataclass
class Headline:
    key: str
    label: str
    measured: float | None          # from the means over seeds
    paired: Stat                    # the same comparison per seed (paired by seed), over seeds
    paper: float | None
    paper_note: str
    unit: str
    verdict: str                    # computed statement: agrees / disagrees / not comparable


HEADLINES = (
    ("rounds_fewer_pct", "FedAvg needs fewer rounds to converge", "convergence_round", pct_fewer, "%"),
    ("steps_fewer_pct", "FedAvg needs fewer gradient steps to converge", "convergence_grad_steps", pct_fewer, "%"),
    ("alignment_gain_pct", "Final mean eval alignment, FedAvg vs centralized", "final_eval_alignment_score",
     pct_gain, "%"),
    ("best_alignment_gain_pct", "Best mean eval alignment, FedAvg vs centralized", "best_eval_alignment_score",
     pct_gain, "%"),
    ("fi_diff", "FI (eval groups, final), FedAvg − centralized", "final_eval_fi", diff, ""),
)


def _size(measured: float, paper: float, tolerance: float) -> str:
    """How a difference that agrees with the paper in direction compares with the paper's."""
    if abs(measured - paper) <= tolerance:
        return "similar size"
    return "smaller" if measured < paper else "larger"


def _verdict(key: str, measured: float | None, paired: Stat, fi: dict[str, float | None]) -> str:
    if measured is None:
        return "not measured (a method has no value)"
    sig = ""
    if paired.n >= 2 and paired.ci_low is not None:
        sig = (" (paired 95% CI excludes 0)" if paired.ci_low > 0 or paired.ci_high < 0
               else " (paired 95% CI includes 0: not significant over these seeds)")
    if key == "rounds_fewer_pct":
        p = PAPER["rounds_fewer_pct"]
        if abs(measured) < 0.05:
            return f"disagrees: no difference in rounds (paper: {p:.0f}% fewer){sig}"
        if measured > 0:
            return (f"agrees in direction (FedAvg converges in fewer rounds); {_size(measured, p, 10)} "
                    f"than the paper's {p:.0f}%{sig}")
        return f"disagrees: FedAvg needs {-measured:.1f}% more rounds (paper: {p:.0f}% fewer){sig}"
    if key == "steps_fewer_pct":
        p = PAPER["steps_fewer_pct"]
        where = "fewer" if measured > 0 else "more"
        agree = (measured > 0) == (p > 0)
        return (f"{'agrees' if agree else 'disagrees'} with the paper's implied {abs(p):.0f}% "
                f"{'fewer' if p > 0 else 'more'} steps: measured {abs(measured):.1f}% {where}{sig}")
    if key in ("alignment_gain_pct", "best_alignment_gain_pct"):
        p = PAPER["alignment_gain_pct"]
        if abs(measured) < 0.005:
            return f"disagrees: no difference in alignment (paper: ~+{p:.0f}%){sig}"
        if measured > 0:
            return (f"agrees in direction (FedAvg aligns better); {_size(measured, p, 1.5)} "
                    f"than the paper's ~+{p:.0f}%{sig}")
        return f"disagrees: FedAvg aligns {abs(measured):.2f}% worse (paper: ~+{p:.0f}%){sig}"
    if key == "fi_diff":
        f, c = fi.get("fedavg"), fi.get("centralized")
        both = f is not None and c is not None and f >= 0.99 and c >= 0.99
        if both and abs(measured) < 0.01:
            return f"agrees: FI ≈ 1 for both ({f:.4f} vs {c:.4f}), difference {measured:+.5f}"
        return f"disagrees: FI {f} vs {c} (paper: ≈ 1 for both)"
    return ""


def headlines(runset: RunSet) -> list[Headline]:
    st = method_stats(runset)
    vals = seed_values(runset)
    paired_seeds = runset.paired_seeds()
    notes = {"rounds_fewer_pct": ("634 vs 1,180 rounds"),
             "steps_fewer_pct": (f"implied by its rounds, not reported: {PAPER['fedavg_steps']:,} vs "
                                 f"{PAPER['centralized_steps']:,} steps "
                                 f"({PAPER['train_groups']} clients × {PAPER['epochs']} steps vs "
                                 f"{PAPER['train_groups']} per epoch)"),
             "alignment_gain_pct": "about +4%", "best_alignment_gain_pct": "about +4% (mean eval alignment)",
             "fi_diff": "FI ≈ 1 for both (FedAvg +0.04% before convergence)"}
    paper = {"rounds_fewer_pct": PAPER["rounds_fewer_pct"], "steps_fewer_pct": PAPER["steps_fewer_pct"],
             "alignment_gain_pct": PAPER["alignment_gain_pct"],
             "best_alignment_gain_pct": PAPER["alignment_gain_pct"], "fi_diff": 0.0}
    fi = {m: st["final_eval_fi"][m].mean for m in runset.methods}
    out = []
    for key, label, metric, fn, unit in HEADLINES:
        a, b = st[metric].get("fedavg", describe([])), st[metric].get("centralized", describe([]))
        measured = fn(a.mean, b.mean)
        paired = describe([fn(vals[metric]["fedavg"][s], vals[metric]["centralized"][s]) for s in paired_seeds])
        out.append(Headline(key, label, measured, paired, paper[key], notes[key], unit,
                            _verdict(key, measured, paired, fi)))
    return out


# ----------------------------------------------------------------------------------------
# rendering


def fmt(v: float | None, spec: str = "{:.4f}") -> str:
    return "–" if v is None else spec.format(v)


def stat_cell(s: Stat, spec: str) -> str:
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{fmt(s.mean, spec)} (n=1)"
    return f"{fmt(s.mean, spec)} ± {fmt(s.std, spec)} [{fmt(s.ci_low, spec)}, {fmt(s.ci_high, spec)}]"


def markdown_table(runset: RunSet) -> str:
    st = method_stats(runset)
    ns = {m: len(runset.finished(m)) for m in runset.methods}
    head = ["Metric"] + [f"{METHOD_LABELS[m]} (n={ns[m]})" for m in runset.methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _, spec in ROWS:
        cells = []
        for m in runset.methods:
            s = st[key][m]
            cell = stat_cell(s, spec)
            if s.dropped:
                cell += f" ({s.dropped} seed(s) without a value)"
            cells.append(cell)
        lines.append("| " + " | ".join([label] + cells) + " |")
    lines.append("")
    lines.append("Cells: mean ± sample std [95% CI, Student t with n−1 degrees of freedom] over seeds.")
    return "\n".join(lines) + "\n"


def markdown_headlines(items: list[Headline]) -> str:
    lines = ["| Comparison | Measured here (from seed means) | Per seed, paired (mean ± std [95% CI]) "
             "| Paper | Verdict |", "|---|---|---|---|---|"]
    for h in items:
        spec = "{:+.5f}" if h.key == "fi_diff" else "{:+.1f}"
        unit = h.unit
        meas = "–" if h.measured is None else f"{spec.format(h.measured)}{unit}"
        paired = stat_cell(h.paired, spec)
        paper = f"{spec.format(h.paper)}{unit} ({h.paper_note})"
        lines.append(f"| {h.label} | {meas} | {paired} | {paper} | {h.verdict} |")
    lines.append("")
    lines.append("'Fewer' is 100·(1 − FedAvg/centralized); alignment gain is 100·(FedAvg − centralized)/centralized. "
                 "Paired: the comparison computed per seed (both methods share the seed, hence the initial "
                 "weights), then summarised over seeds.")
    return "\n".join(lines) + "\n"


def csv_table(runset: RunSet, items: list[Headline]) -> str:
    st = method_stats(runset)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "metric", "method", "n", "mean", "std", "ci95_low", "ci95_high", "per_seed", "paper"])
    vals = seed_values(runset)
    for key, _, _, _ in ROWS:
        for m in runset.methods:
            s = st[key][m]
            per_seed = ";".join(f"{seed}:{'' if v is None else repr(v)}" for seed, v in vals[key][m].items())
            w.writerow(["metric", key, m, s.n, _c(s.mean), _c(s.std), _c(s.ci_low), _c(s.ci_high), per_seed, ""])
    for h in items:
        p = h.paired
        w.writerow(["headline_from_means", h.key, "fedavg_vs_centralized", "", _c(h.measured), "", "", "", "",
                    _c(h.paper)])
        w.writerow(["headline_paired", h.key, "fedavg_vs_centralized", p.n, _c(p.mean), _c(p.std), _c(p.ci_low),
                    _c(p.ci_high), ";".join(repr(v) for v in p.values), _c(h.paper)])
    return buf.getvalue()


def _c(v: float | None) -> str:
    return "" if v is None else repr(float(v))
