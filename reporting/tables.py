"""Numbers over seeds (mean, sample std, Student-t 95% CI) and the paper's headline comparisons."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from scipy import stats as sps

from .convergence import DEFINITIONS
from .prose import rows_data, snippets
from .runs import METHOD_LABELS, Run, RunSet

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
PAPER["fi_diff"] = 0.0  # FI ≈ 1 for both


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...] = ()
    dropped: int = 0            # seeds without a value


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
    if max(vals) - min(vals) <= 1e-12 * max(abs(mean), 1.0):  # equal but for float rounding (a setting such as ε)
        std = 0.0
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half, vals, dropped)


# ----------------------------------------------------------------------------------------
# per-seed numbers


def wall_time_to_convergence(run: Run) -> float | None:
    """Wall time at the first evaluation at or after the convergence round (includes evaluations)."""
    conv = run.value("convergence_round")
    if conv is None:
        return None
    later = [r for r in run.metrics if r["round"] >= conv]
    return float(min(later, key=lambda r: r["round"])["wall_time_s"]) if later else None


def vs_consensus(run) -> float | None:
    """Final mean evaluation alignment minus the consensus lookup on the same targets."""
    final, cons = run.value("final_eval_alignment_score"), run.baseline("consensus")
    return None if final is None or cons is None else final - cons


def row_table(name: str) -> tuple:
    """The rows of a report's table (rows.json) as (key, label, the value of a run, format)."""
    def reader(key: str, source: str):
        kind, _, of = source.partition(":")
        if kind == "mb":
            return lambda run: None if (v := run.value(of)) is None else v / 1e6
        return {"summary": lambda run: run.value(key), "logged": lambda run: run.last_logged(key),
                "groups": lambda run: run.final_group(*key.split("_", 2)[1:]),
                "baseline": lambda run: run.baseline(key.removeprefix("baseline_")),
                "vs_consensus": vs_consensus, "wall_time_to_convergence": wall_time_to_convergence}[kind]
    return tuple((key, label, reader(key, source), spec) for key, label, source, spec in rows_data()[name])


ROWS = row_table("reproduce")
# The convergence round under each definition (reporting/convergence.py): its own table.
CONVERGENCE_ROWS = tuple((d.key, f"Convergence round, {d.label}", d.round_of, "{:.1f}") for d in DEFINITIONS)
ALL_ROWS = ROWS + CONVERGENCE_ROWS


def seed_values(runset: RunSet) -> dict[str, dict[str, dict[int, float | None]]]:
    """{metric key: {method: {seed: value}}} over the finished runs."""
    out: dict[str, dict[str, dict[int, float | None]]] = {}
    for key, _, get, _ in ALL_ROWS:
        out[key] = {m: {s: get(r) for s, r in sorted(runset.finished(m).items())} for m in runset.methods}
    return out


def method_stats(runset: RunSet, values: dict | None = None) -> dict[str, dict[str, Stat]]:
    """{metric key: {method: Stat over its seeds}}."""
    vals = values if values is not None else seed_values(runset)
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


FORMULAS = {"pct_fewer": pct_fewer, "pct_gain": pct_gain, "diff": diff}  # rows.json's headlines name them


# The pairs compared, FedAvg first: the paper's baseline, then the compute-matched one.
PAIRS = (("fedavg", "centralized"), ("fedavg", "centralized_matched"))
PAIR_TEXT = {"centralized": "centralized", "centralized_matched": "compute-matched centralized"}


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
    a: str = "fedavg"
    b: str = "centralized"

    @property
    def pair(self) -> str:
        return f"{self.a}_vs_{self.b}"


def significance(paired: Stat) -> str | None:
    """'excludes' / 'includes' 0 for the paired 95% CI; 'degenerate' when every seed gave the same
    value (a zero-width CI tests nothing); None with fewer than 2 paired seeds."""
    if paired.n < 2 or paired.ci_low is None:
        return None
    if paired.std == 0 or len(set(paired.values)) == 1:  # equal values: float rounding can leave std ~1e-17
        return "degenerate"
    return "excludes" if paired.ci_low > 0 or paired.ci_high < 0 else "includes"


def no_variance(n: int) -> str:
    return f"no variance across {n} seeds"


def _size(measured: float, paper: float, tolerance: float) -> str:
    """How a difference that agrees with the paper in direction compares with the paper's."""
    if abs(measured - paper) <= tolerance:
        return "similar size"
    return "smaller" if measured < paper else "larger"


# The headlines compared with the paper: (below this |difference| there is none, the paper's within this is similar)
_TOLERANCE = {"rounds_fewer_pct": (0.05, 10), "alignment_gain_pct": (0.005, 1.5),
              "best_alignment_gain_pct": (0.005, 1.5)}


def _verdict(key: str, measured: float | None, paired: Stat, fi: dict[str, float | None],
             b: str = "centralized") -> str:
    if measured is None:
        return "not measured (a method has no value)"
    t, up = snippets("verdicts.md"), "up" if measured > 0 else "down"
    if key == "fi_diff":
        f, c = fi.get("fedavg"), fi.get(b)
        if f is not None and c is not None and f >= 0.99 and c >= 0.99 and abs(measured) < 0.01:
            return t["fi_agrees"].format(f=f, c=c, m=measured)
        return t["fi_disagrees"].format(f=fmt(f), c=fmt(c))
    if key == "steps_fewer_pct":  # compute-matched: the paper's claim of faster convergence at equal compute
        case = f"steps_matched_{up}" if b == "centralized_matched" else f"steps_{up}"
    elif key == "worst_alignment_diff":
        case = "worst"
    elif key in _TOLERANCE:
        case = ("rounds" if key == "rounds_fewer_pct" else "alignment") + (
            "_none" if abs(measured) < _TOLERANCE[key][0] else f"_{up}")
    else:
        return ""
    paper = PAPER["rounds_fewer_pct" if key == "rounds_fewer_pct" else "alignment_gain_pct"]
    size = _size(measured, paper, _TOLERANCE[key][1]) if key in _TOLERANCE else ""
    return t[case].format(a=abs(measured), size=size, paper=PAPER, implied=abs(PAPER["steps_fewer_pct"]),
                          word="higher" if measured > 0 else "lower",
                          sig=t.get(f"sig_{significance(paired)}", "").format(n=paired.n))


def compare(vals: dict, st: dict, metric: str, fn, a: str, b: str, seeds: list[int]) -> tuple[float | None, Stat]:
    """(from the seed means, paired per seed) of fn(a, b) on one metric."""
    measured = fn(st[metric][a].mean, st[metric][b].mean)
    return measured, describe([fn(vals[metric][a][s], vals[metric][b][s]) for s in seeds])


def headlines(runset: RunSet) -> list[Headline]:
    """Every headline comparison for each pair of PAIRS whose methods are both reported."""
    vals = seed_values(runset)
    st = method_stats(runset, vals)
    fi = {m: st["final_eval_fi"][m].mean for m in runset.methods}
    out = []
    for a, b in PAIRS:
        if a not in runset.methods or b not in runset.methods:
            continue
        seeds = runset.paired_seeds(a, b)
        for key, label, metric, formula, unit, paper, note in rows_data()["headlines"]:
            measured, paired = compare(vals, st, metric, FORMULAS[formula], a, b, seeds)
            paper, note = (PAPER.get(paper), note.format(paper=PAPER)) if b == "centralized" else (
                None, "no compute-matched baseline in the paper")
            out.append(Headline(key, label.format(b=PAIR_TEXT[b]), measured, paired, paper, note, unit,
                                _verdict(key, measured, paired, fi, b), a, b))
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
    unsigned = spec.replace("+", "")  # a std has no sign
    return f"{fmt(s.mean, spec)} ± {fmt(s.std, unsigned)} [{fmt(s.ci_low, spec)}, {fmt(s.ci_high, spec)}]"


def md_table(head: list[str], rows) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown_table(runset: RunSet, rows=ROWS, st: dict | None = None) -> str:
    st = st if st is not None else method_stats(runset)
    ns = {m: len(runset.finished(m)) for m in runset.methods}
    head = ["Metric"] + [f"{METHOD_LABELS[m]} (n={ns[m]})" for m in runset.methods]

    def cell(s: Stat, spec: str) -> str:
        return stat_cell(s, spec) + (f" ({s.dropped} seed(s) without a value)" if s.dropped else "")
    lines = md_table(head, ([label] + [cell(st[key][m], spec) for m in runset.methods] for key, label, _, spec in rows))
    lines += ["", "Cells: mean ± sample std [95% CI, Student t with n−1 degrees of freedom] over seeds."]
    return "\n".join(lines) + "\n"


def markdown_headlines(items: list[Headline]) -> str:
    def row(h: Headline) -> list[str]:
        spec = {"fi_diff": "{:+.5f}", "worst_alignment_diff": "{:+.4f}"}.get(h.key, "{:+.1f}")
        meas = "–" if h.measured is None else f"{spec.format(h.measured)}{h.unit}"
        paper = h.paper_note if h.paper is None else f"{spec.format(h.paper)}{h.unit} ({h.paper_note})"
        return [h.label, meas, stat_cell(h.paired, spec), paper, h.verdict]
    lines = md_table(["Comparison", "Measured here (from seed means)", "Per seed, paired (mean ± std [95% CI])",
                      "Paper", "Verdict"], map(row, items))
    return "\n".join([*lines, "", snippets("verdicts.md")["headlines_note"]]) + "\n"


def csv_table(runset: RunSet, items: list[Headline]) -> str:
    vals = seed_values(runset)
    st = method_stats(runset, vals)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "metric", "method", "n", "mean", "std", "ci95_low", "ci95_high", "per_seed", "paper"])
    for key, _, _, _ in ALL_ROWS:
        for m in runset.methods:
            s = st[key][m]
            per_seed = ";".join(f"{seed}:{'' if v is None else repr(v)}" for seed, v in vals[key][m].items())
            w.writerow(["metric", key, m, s.n, *csv_stat(s), per_seed, ""])
    for h in items:
        p = h.paired
        w.writerow(["headline_from_means", h.key, h.pair, "", _c(h.measured), "", "", "", "", _c(h.paper)])
        w.writerow(["headline_paired", h.key, h.pair, p.n, *csv_stat(p), ";".join(repr(v) for v in p.values),
                    _c(h.paper)])
    return buf.getvalue()


def _c(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def csv_stat(s: Stat) -> list[str]:
    return [_c(s.mean), _c(s.std), _c(s.ci_low), _c(s.ci_high)]
