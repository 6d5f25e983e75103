"""The report's text sections, each computed from the run folders (reporting/report.py assembles them)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .paths import shown
from .prose import Fields, snippets
from .runs import METHOD_LABELS, METHODS, RunSet
from .tables import PAIR_TEXT, PAIRS, PAPER, fmt, md_table


def _tally(values: list) -> str:
    """`a` when every run agrees, else `a` (3 runs), `b` (1 run): the runs of one report may come from
    several machines and commits (the queue spans jobs), and the report must not name only the first."""
    counts = Counter(str(v) for v in values)
    if len(counts) == 1:
        return f"`{next(iter(counts))}`"
    return ", ".join(f"`{v}` ({n} run{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


def machine_line(runs: list, manifest: dict | None) -> str:
    envs = [r.config.get("environment") or {} for r in runs]
    threads = (manifest or {}).get("threads")
    commits = [str(e.get("git_commit"))[:10] + (" (dirty tree)" if e.get("git_dirty") else "") for e in envs]
    return (f"- **Machine**: device {_tally([r.config.get('device_resolved') for r in runs])}, "
            f"CPU {_tally([e.get('cpu_model') for e in envs])}, "
            f"{_tally([e.get('cpu_count') for e in envs])} CPU cores"
            + (f", {threads} torch thread(s) per process" if threads else "")
            + f"; torch {_tally([e.get('torch') for e in envs])}; git commit {_tally(commits)}.")


def _steps_per_round(runset: RunSet, method: str) -> float | None:
    for r in runset.finished(method).values():
        if r.losses:
            rounds, steps = r.losses[-1]["round"], r.losses[-1].get("grad_steps")
            if rounds and steps is not None:
                return steps / rounds
    return None


def setup_lines(runset: RunSet, manifest: dict | None) -> list[str]:
    runs = runset.all_finished()
    if not runs:
        return ["No finished runs."]
    firsts = {m: run for m in METHODS if (run := next(iter(runset.finished(m).values()), None))}
    first = next(iter(firsts.values()))
    c, data = Fields(first.config), Fields(first.config.get("data") or {})
    tr, ev = c.get("train_groups") or [], c.get("eval_groups") or []
    same_split = len({json.dumps([r.config.get("train_groups"), r.config.get("eval_groups")]) for r in runs}) == 1
    seeds = sorted({r.seed for r in runs})
    text = snippets()
    lines = text["setup"].format(
        dataset=text.get(f"dataset_{c['dataset']}", c["dataset"]), source=shown(data["source"]), data=data,
        hash=str(data["source_hash"])[:12], n_train=len(tr), n_eval=len(ev),
        same_split="the same split for every seed and method" if same_split else "NOT the same split in every run",
        split=(manifest or {}).get("split_rule") or "as recorded in each run's config.json", train=", ".join(tr),
        eval=", ".join(ev), emb_model=(data["embedding"] or {}).get("model_id", c["emb_model"]), c=c, paper=PAPER,
        seeds=", ".join(map(str, seeds)), n_seeds=len(seeds)).split("\n")
    for m, run in firsts.items():
        k = Fields(run.config)
        lines.append(text[f"setup_{m}"].format(c=k, engine=k["client_engine_resolved"] or k["client_engine"],
                                               steps=fmt(_steps_per_round(runset, m), "{:.0f}")))
    lines.append(machine_line(runs, manifest))
    window = (first.summary.get("convergence") or {}).get("window_rounds")
    return [*lines, *variant_line(runs), text["setup_convergence"].format(window=window)]


def run_lines(runset: RunSet) -> list[str]:
    counts = md_table(["Method", "Expected seeds", "Finished", "Interrupted (no summary.json)", "Missing"],
                      ([METHOD_LABELS[m], *(str(c[k]) for k in ("expected", "finished", "interrupted", "missing"))]
                       for m, c in runset.counts().items()))
    rows = [[f"`{r.path.name}`", r.method, r.seed, (s := r.summary or {}).get("rounds"),
             fmt(s.get("wall_time_s"), "{:.1f}"), s.get("convergence_round")] for r in runset.all_finished()]
    rows += [[f"`{r.path.name}`", r.method, r.seed,
              f"{r.last_round} of {r.config.get('comm_round' if r.method == 'fedavg' else 'central_epochs')} "
              "(interrupted, not in the statistics)", "–", "–"] for r in runset.interrupted]
    rows += [["–", m, s, "missing (not in the statistics)", "–", "–"] for m in runset.methods for s in runset.missing(m)]
    return [*counts, "", *md_table(["Run folder", "Method", "Seed", "Rounds", "Wall time (s)", "Convergence round"],
                                   ([str(x) for x in row] for row in rows))]


def reason_lines(runset: RunSet, manifest: dict | None) -> list[str]:
    runs = runset.all_finished()
    if not runs:
        return []
    c, text = Fields(runs[0].config), snippets()
    fed_steps, cen_steps = _steps_per_round(runset, "fedavg"), _steps_per_round(runset, "centralized")
    rounds = max(r.summary.get("rounds", 0) for r in runs)
    lines = []
    if rounds < PAPER["rounds"]:
        lines.append(text["reason_rounds"].format(rounds=rounds, paper_rounds=PAPER["rounds"],
                                                  share=100 * rounds / PAPER["rounds"]))
    late = [r for r in runs if (r.summary or {}).get("convergence_round") is not None
            and r.summary["convergence_round"] >= 0.8 * r.summary.get("rounds", 0)]
    if late:
        names = ", ".join(f"{r.method} s{r.seed} ({r.summary['convergence_round']}/{r.summary['rounds']})"
                          for r in late)
        lines.append(text["reason_late"].format(n_late=len(late), n_runs=len(runs), names=names))
    if fed_steps and cen_steps:
        mat_steps = _steps_per_round(runset, "centralized_matched")
        lines.append(text["reason_compute"].format(fed=fed_steps, cen=cen_steps, ratio=fed_steps / cen_steps)
                     + (text["reason_matched"].format(steps=mat_steps) if mat_steps else ""))
    data = Fields(c["data"] or {})
    if c["dim_x"] and c["dim_x"] != PAPER["emb_dim"]:
        model = (data["embedding"] or {}).get("model_id")
        lines.append(text["reason_embedding"].format(model=model, dim=c["dim_x"], paper=PAPER))
    if c["dataset"] in ("opinionqa", "globalqa"):
        lines.append(text[f"reason_{c['dataset']}"].format(name=Path(str(data["source"] or "")).name, c=c, data=data))
    n = min((len(runset.finished(m)) for m in runset.methods), default=0)
    if n < 4:
        lines.append(text["reason_seeds"].format(n=n))
    if c["central_mode"] == "batched":
        lines.append(text["reason_batched"])
    return lines


def agreement_lines(items) -> list[str]:
    t, out = snippets("verdicts.md"), []
    for a, b in PAIRS:
        pair = [h for h in items if (h.a, h.b) == (a, b)]
        if not pair:
            continue
        against = snippets()[f"against_{b}"]
        out += ["", against, ""] if out else [against, ""]
        for h in pair:
            if h.measured is None:
                out.append(f"- {h.label}: not measured.")
            elif f"agree_{h.key}" in t:
                up, down = ("fewer", "more") if h.key.endswith("fewer_pct") else ("higher", "lower")
                words = dict(value=abs(h.measured), word=up if h.measured > 0 else down, other=PAIR_TEXT[b],
                             paper=PAPER, implied=abs(PAPER["steps_fewer_pct"]))
                note = t.get(f"note_{h.key}") if b == "centralized" else None
                out.append("- " + t[f"agree_{h.key}"].format(**words) + (f" ({note.format(**words)})" if note else "")
                           + f": **{h.verdict}**.")
            elif h.key == "fi_diff":
                out.append(f"- Fairness: FI difference {h.measured:+.5f} against {PAIR_TEXT[b]} (paper: FI ≈ 1 for "
                           f"both): **{h.verdict}**.")
    return out


def means_line(runset: RunSet, st: dict) -> str:
    """Convergence round and final alignment, mean over seeds, per method."""
    def part(key, spec):
        return ", ".join(f"{METHOD_LABELS[m]} {fmt(st[key][m].mean, spec)}" for m in runset.methods)
    return snippets("verdicts.md")["means"].format(rounds=part("convergence_round", "{:.1f}"),
                                                   alignment=part("final_eval_alignment_score", "{:.4f}"))


# Flags where the released code differs from the paper (method.md §8), as (key, paper's value).
VARIANT_KEYS = (("loss_reduction", "sum"), ("layer_init", "independent"), ("episode_bounds", "flags"),
                ("grad_clip", 0.0), ("central_mode", "sequential"), ("weighting", "dataset_size"),
                ("eval_resample", False))


def variant_line(runs) -> list[str]:
    """The flags that differ from the paper's protocol (the released-code variant), if any."""
    diffs = {}
    for r in runs:
        for key, paper in VARIANT_KEYS:
            v = r.config.get(key, paper)
            if v != paper:
                diffs.setdefault(key, (v, paper))
    text = ", ".join(f"`--{k} {v}` (paper: {p})" for k, (v, p) in diffs.items())
    return [f"- **Variant**: {text}."] if diffs else []
