"""scripts/sweep.py's report: variants of one experiment against a baseline, paired by seed."""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import RunFolderError
from utils.run_folder import record_value

from .figures import band, finish, plain_y, plt, stack
from .paths import shown, shown_command
from .prose import fill, template
from .runs import Run, collect, find_run_folders, partial_note, prefer_done
from .tables import Stat, csv_stat, describe, md_table, no_variance, row_table, significance, stat_cell


@dataclass
class Variant:
    name: str
    patterns: list[str]
    runs: dict[int, Run] = field(default_factory=dict)      # finished, by seed
    interrupted: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    failed: dict[int, Run] = field(default_factory=dict)    # diverged (failed.json), by seed


def load_variant(name: str, patterns: list[str], records: list[str] = ()) -> Variant:
    """A variant's runs; records: globs of run records of the same runs (runs.prefer_done)."""
    rs = collect(prefer_done(find_run_folders(patterns), find_run_folders(list(records))))
    v = Variant(name, [*patterns, *records], rs.finished("fedavg"), [r.path for r in rs.interrupted], rs.duplicates,
                {r.seed: r for r in rs.failed})
    if not v.runs and not v.failed:
        raise RunFolderError(f"variant {name!r}: no finished run folder matches {' '.join(patterns)}",
                             "check the glob (quote it so the shell does not expand it), or wait for the runs")
    return v


METRICS = row_table("sweep")
# Compared with the baseline (ε is a setting and the consensus lookup is the data's, not outcomes).
EPSILONS = ("dp_epsilon", "dp_epsilon_exact", "dp_epsilon_replace_one")
COMPARED = tuple(m for m in METRICS if m[0] not in (*EPSILONS, "baseline_consensus", "baseline_uniform"))


def values(v: Variant) -> dict[str, dict[int, float | None]]:
    return {key: {s: get(r) for s, r in sorted(v.runs.items())} for key, _, get, _ in METRICS}


def paired_difference(base: Variant, v: Variant, key: str) -> Stat:
    """variant − baseline per seed both have (with a value), over those seeds."""
    b, x = values(base)[key], values(v)[key]
    return describe([x[s] - b[s] for s in sorted(set(b) & set(x)) if x[s] is not None and b[s] is not None])


def divergence(run: Run) -> str:
    """'seed 0 at round 276 (ε 40.3)': where a failed run stopped, with the budget spent by then."""
    eps = run.last_logged("dp_epsilon")
    return f"seed {run.seed} at round {run.failure.get('round', '?')}" + (f" (ε {eps:.3g})" if eps is not None else "")


def has_epsilon(variants: list[Variant]) -> bool:
    return any(_mean_epsilon(v) is not None for v in variants)


# ----------------------------------------------------------------------------------------
# text


def consistency_warnings(variants: list[Variant]) -> list[str]:
    """Settings every variant must share for the comparison to mean anything."""
    out = []
    for key in ("dataset", "metric", "eval_num_qs", "eval_seed"):
        seen = {json.dumps(r.config.get(key), sort_keys=True) for v in variants for r in v.runs.values()}
        if len(seen) > 1:
            out.append(f"the runs disagree on {key}: {sorted(seen)}")
    # A seeded group split differs between seeds by design; within a seed every variant must share it.
    seeds = sorted({s for v in variants for s in v.runs})
    for key in ("eval_groups", "train_groups"):
        for seed in seeds:
            seen = {json.dumps(v.runs[seed].config.get(key), sort_keys=True) for v in variants if seed in v.runs}
            if len(seen) > 1:
                out.append(f"the runs of seed {seed} disagree on {key}: {sorted(seen)}")
    for v in variants:
        out += [f"{v.name}: {shown(p)} is interrupted (no summary.json); not in the statistics" for p in v.interrupted]
        out += [f"{v.name}: {shown(p)} is a second finished run of its seed; ignored" for p in v.duplicates]
        out += [f"{v.name}: {shown(r.path)} diverged ({r.failure.get('reason')}); not in the statistics"
                for _, r in sorted(v.failed.items())]
    return out


def results_table(variants: list[Variant]) -> list[str]:
    eps = has_epsilon(variants)
    rows = [m for m in METRICS if eps or m[0] not in EPSILONS]
    head = ["Metric"] + [f"{v.name} (n={len(v.runs)})" for v in variants]
    return md_table(head, ([label] + [stat_cell(describe(list(values(v)[key].values())), spec) for v in variants]
                           for key, label, _, spec in rows))


def paired_table(base: Variant, others: list[Variant]) -> list[str]:
    def cell(v: Variant, key: str, spec: str) -> str:
        d = paired_difference(base, v, key)
        return stat_cell(d, spec.replace("{:", "{:+")) + (" *" if significance(d) == "excludes" else "")
    return md_table([f"Variant − {base.name}", *(label for _, label, _, _ in COMPARED)],
                    ([v.name, *(cell(v, key, spec) for key, _, _, spec in COMPARED)] for v in others))


def verdict_lines(base: Variant, others: list[Variant]) -> list[str]:
    """One computed sentence per variant on mean and worst-group alignment."""
    out = []
    for v in others:
        parts = []
        for key, what in (("final_eval_alignment_score", "mean"), ("final_eval_worst_alignment", "worst-group")):
            d = paired_difference(base, v, key)
            if d.mean is None:
                parts.append(f"{what} alignment not measured")
                continue
            word = "higher" if d.mean > 0 else "lower" if d.mean < 0 else "no different"
            sig = {"excludes": "significant over these seeds", "includes": "not significant over these seeds",
                   "degenerate": f"{no_variance(d.n)}: no CI"}.get(significance(d), "a single seed: no CI")
            parts.append(f"{what} evaluation alignment {abs(d.mean):.4f} {word} ({sig})")
        if v.failed:
            which = ", ".join(divergence(r) for _, r in sorted(v.failed.items()))
            total = len(v.failed) + len(v.runs)
            parts.append(f"{len(v.failed)} of {total} seeds diverged: {which}"
                         + ("; the numbers cover the others" if v.runs else ""))
        out.append(f"- **{v.name}** against {base.name}: " + "; ".join(parts) + ".")
    return out


# ----------------------------------------------------------------------------------------
# figures


def _points(key: str):
    return lambda run: [(r["round"], x) for r in run.metrics if (x := record_value(r, key)) is not None]


def _finish(*args) -> Path:
    return finish(*args, legend_size=8)


def _mean_curves(ax, variants: list[Variant], points, lw: float, alpha: float) -> None:
    for i, v in enumerate(variants):
        if len(a := stack(v.runs, points)):
            band(ax, a[0, :, 0], a[..., 1], f"C{i}", v.name, lw, alpha)


def fig_worst_vs_round(variants: list[Variant], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _mean_curves(ax, variants, _points("eval_worst_alignment"), 1.8, 0.15)
    for i, v in enumerate(variants):
        for seed, r in sorted(v.failed.items()):
            if pts := _points("eval_worst_alignment")(r):
                ax.plot(*zip(*pts), color=f"C{i}", lw=1, ls="--", label=f"{v.name} seed {seed}, diverged")
    plain_y(ax, 0.02)
    return _finish(fig, ax, title, "Round",
                 "Lowest group alignment, eval groups", path,
                 "line: mean over seeds; band: min–max over seeds; dashed: a run that diverged, up to its last evaluation")


def fig_mean_vs_worst(variants: list[Variant], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.8))
    for i, v in enumerate(variants):
        vals = values(v)
        pts = [(vals["final_eval_alignment_score"][s], vals["final_eval_worst_alignment"][s]) for s in v.runs]
        pts = [p for p in pts if None not in p]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=0.5, s=24)
            ax.scatter([sum(p[0] for p in pts) / len(pts)], [sum(p[1] for p in pts) / len(pts)], color=f"C{i}",
                       marker="D", s=60, edgecolor="k", label=v.name)
    return _finish(fig, ax, title, "Mean eval alignment (final)",
                 "Worst-group eval alignment (final)", path, "dots: one run (seed); diamond: mean over seeds")


def _snr(run: Run) -> list[tuple[int, float]]:
    """Per round: the clipped mean's norm over the noise's (DP runs that logged both, noise > 0)."""
    return [(r["round"], r["dp_signal_norm"] / r["dp_noise_norm"]) for r in run.losses
            if r.get("dp_signal_norm") is not None and r.get("dp_noise_norm")]


def has_snr(variants: list[Variant]) -> bool:
    return any(_snr(r) for v in variants for r in v.runs.values())


def fig_snr_vs_round(variants: list[Variant], path: Path, title: str) -> Path:
    """Signal-to-noise per round: ||clipped mean|| (at most S) over ||noise|| (about z S / m sqrt(P))."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _mean_curves(ax, variants, _snr, 1.5, 0)
    ax.axhline(1.0, color="0.4", ls=":", lw=1, label="signal = noise")
    ax.set_yscale("log")
    return _finish(fig, ax, title, "Round",
                 "||clipped mean update|| / ||added noise||", path,
                 "mean over seeds; the noise is drawn over every parameter, the signal is at most the clip norm S")


def _mean_epsilon(v: Variant) -> float | None:
    eps = [x for x in values(v)["dp_epsilon"].values() if x is not None]
    return sum(eps) / len(eps) if eps else None


def fig_alignment_vs_epsilon(variants: list[Variant], path: Path, title: str) -> Path:
    """Variants with an ε as points (mean ± 95% CI over seeds); those without (no DP) as dotted lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    with_eps = sorted(((e, v) for v in variants if (e := _mean_epsilon(v)) is not None), key=lambda p: p[0])
    without = [v for v in variants if _mean_epsilon(v) is None]
    for key, label, color in (("final_eval_alignment_score", "mean", "C0"),
                              ("final_eval_worst_alignment", "worst group", "C3")):
        pts = [(e, s) for e, v in with_eps if (s := describe(list(values(v)[key].values()))).mean is not None]
        half = [0.0 if s.ci_high is None else s.ci_high - s.mean for _, s in pts]
        ax.errorbar([e for e, _ in pts], [s.mean for _, s in pts], yerr=half,
                    color=color, marker="o", capsize=3, label=f"{label} eval alignment")
        for v, ls in zip(without, (":", "--", "-.") * len(without)):
            ref = describe(list(values(v)[key].values())).mean
            if ref is not None:
                ax.axhline(ref, color=color, ls=ls, lw=1, label=f"{v.name}, {label} (no ε)")
    stopped = [(e, r) for v in variants for r in v.failed.values() if (e := r.last_logged("dp_epsilon")) is not None]
    pts = [(e, y[-1][1]) for e, r in stopped if (y := _points("eval_alignment_score")(r))]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", color="k", zorder=3,
                   label="diverged run: ε and mean alignment when it stopped")
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a log axis
    return _finish(fig, ax, title, "ε (final, log scale)",
                 "Eval alignment (final)", path, "points: mean over seeds of finished runs; bars: 95% CI")


# (key: file name after "<stem>_", title and caption, figure, drawn when)
FIGURES = (
    ("worst_vs_round", "Worst-group evaluation alignment vs round", fig_worst_vs_round, lambda vs: True),
    ("mean_vs_worst", "Final mean vs worst-group evaluation alignment", fig_mean_vs_worst, lambda vs: True),
    ("alignment_vs_epsilon", "Final evaluation alignment vs privacy budget ε", fig_alignment_vs_epsilon,
     lambda vs: has_epsilon(vs[1:])),
    ("snr_vs_round", "Signal-to-noise ratio of the server's update vs round", fig_snr_vs_round, has_snr),
)


def write_comparison(base: Variant, others: list[Variant], out: Path, title: str | None = None,
                     command: list[str] | None = None, setup: list[str] | None = None,
                     partial: str | None = None) -> dict[str, Path]:
    """<out> (Markdown), <stem>_table.csv and the figures next to it; `setup`: Markdown lines of a Setup section."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem, variants = out.with_suffix(""), [base, *others]
    paths, figures = {"report": out, "table_csv": Path(f"{stem}_table.csv")}, []
    for key, caption, draw, wanted in FIGURES:
        if wanted(variants):
            paths[key] = draw(variants, Path(f"{stem}_{key}.png"), caption)
            figures += [f"**{caption}**", "", f"![{caption}]({paths[key].name})", ""]
    paths["table_csv"].write_text(csv_text(base, others), encoding="utf-8")
    n, n_failed = sum(len(v.runs) for v in variants), sum(len(v.failed) for v in variants)
    warnings = consistency_warnings(variants)
    body = fill(template("sweep_report.md"),
                title=f"{title or 'Variants compared: ' + ', '.join(v.name for v in variants)}"
                      f"{f' ({partial})' if partial else ''}",
                first=partial_note(partial), date=time.strftime("%Y-%m-%d"), n=n,
                diverged=f" and {n_failed} that diverged" if n_failed else "",
                by_command=" by the command below" if command else "", base=base.name,
                command=["```bash", shown_command(command), "```", ""] if command else [],
                setup=["## Setup", "", *setup, ""] if setup else [],
                variants=[f"| {v.name} | `{' '.join(shown(p) for p in v.patterns)}` | "
                          f"{', '.join(map(str, sorted(v.runs))) or '–'} | "
                          f"{', '.join(divergence(r) for _, r in sorted(v.failed.items())) or '–'} | "
                          f"{len(v.interrupted)} |" for v in variants],
                results=results_table(variants), paired=paired_table(base, others),
                verdicts=verdict_lines(base, others), figures=figures,
                warnings=["## Warnings", "", *[f"- {w}" for w in warnings]] if warnings else [])
    out.write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    return paths


def csv_text(base: Variant, others: list[Variant]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "metric", "variant", "n", "mean", "std", "ci95_low", "ci95_high", "per_seed"])
    for v in [base, *others]:
        for key, vals in values(v).items():
            s = describe(list(vals.values()))
            w.writerow(["metric", key, v.name, s.n, *csv_stat(s),
                        ";".join(f"{seed}:{'' if x is None else repr(x)}" for seed, x in vals.items())])
    for v in [base, *others]:
        for seed, r in sorted(v.failed.items()):
            w.writerow(["diverged", "round", v.name, 1, repr(float(r.failure.get("round", "nan"))), "", "", "",
                        f"{seed}:{r.failure.get('round', '')}"])
    for v in others:
        for key, _, _, _ in COMPARED:
            d = paired_difference(base, v, key)
            w.writerow([f"paired_vs_{base.name}", key, v.name, d.n, *csv_stat(d), ";".join(repr(x) for x in d.values)])
    return buf.getvalue()
