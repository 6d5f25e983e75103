"""docs/results/<name>.md (+ table .md/.csv, figures .png) written from run folders.

Everything stated in the report is computed here from the folders' numbers: the text is a
template, the verdicts come from reporting/tables.py, the setup from the runs' config.json,
the commands from the manifest the pipeline writes (reproduce.json) and the runs' argv.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from .figures import make_figures
from .paths import shown, shown_argv
from .runs import METHOD_LABELS, RunSet, run_commands
from .tables import PAPER, csv_table, fmt, headlines, markdown_headlines, markdown_table, method_stats

MANIFEST = "reproduce.json"
DATASET_TEXT = {
    "opinionqa": "OpinionQA (Pew American Trends Panel, US demographic groups; scored with 1 − normalised "
                 "Wasserstein distance over option ordinals, GPO's metric)",
    "globalqa": "GlobalOpinionQA (countries; scored with 1 − Jensen–Shannon distance)",
    "synthetic": "synthetic planted-structure data",
}


def find_manifest(runset: RunSet) -> dict | None:
    """The pipeline's reproduce.json next to the run folders, if any."""
    for r in runset.all_finished() + runset.interrupted:
        p = r.path.parent / MANIFEST
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except ValueError:
                return None
    return None


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


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
    fed = next(iter(runset.finished("fedavg").values()), None)
    cen = next(iter(runset.finished("centralized").values()), None)
    mat = next(iter(runset.finished("centralized_matched").values()), None)
    first = fed or cen or mat
    c = first.config
    data = c.get("data") or {}
    emb = data.get("embedding") or {}
    env = c.get("environment") or {}
    tr, ev = c.get("train_groups") or [], c.get("eval_groups") or []
    same_split = len({json.dumps([r.config.get("train_groups"), r.config.get("eval_groups")]) for r in runs}) == 1
    split = (manifest or {}).get("split_rule") or "as recorded in each run's config.json"
    seeds = sorted({r.seed for r in runs})
    lines = [
        f"- **Data**: {DATASET_TEXT.get(c.get('dataset'), c.get('dataset'))}; source `{shown(data.get('source'))}`, "
        f"{data.get('kept_questions')} questions kept; content hash `{str(data.get('source_hash'))[:12]}`.",
        f"- **Groups**: {len(tr)} training clients / {len(ev)} unseen evaluation groups "
        f"({'the same split for every seed and method' if same_split else 'NOT the same split in every run'}; "
        f"{split}).",
        f"  - train: {', '.join(tr)}",
        f"  - eval: {', '.join(ev)}",
        f"- **Embeddings**: {emb.get('model_id', c.get('emb_model'))}, {c.get('dim_x')} dimensions "
        f"(paper: {PAPER['emb_model']}, {PAPER['emb_dim']}).",
        f"- **Model**: GPO, d_model {c.get('d_model')}, {c.get('num_layers')} layers, {c.get('nhead')} heads, "
        f"FFN {c.get('dim_feedforward')}, precision {c.get('precision')}.",
        f"- **Episodes**: context {c.get('min_ctx_num_qs')}–{c.get('max_ctx_num_qs')} and targets "
        f"{c.get('min_tar_num_qs')}–{c.get('max_tar_num_qs')} questions; local split {c.get('data_split')}; "
        f"evaluation context {c.get('eval_num_qs')} questions (fixed by eval_seed {c.get('eval_seed')}).",
        f"- **Seeds**: {', '.join(map(str, seeds))} ({len(seeds)}); a seed sets initial weights (shared by both "
        "methods), episodes and client sampling.",
    ]
    if fed:
        f = fed.config
        lines.append(f"- **FedAvg**: {f.get('comm_round')} rounds, {f.get('epochs')} local steps per client, "
                     f"weighting {f.get('weighting')}, client fraction {f.get('client_fraction')}, "
                     f"engine `{f.get('client_engine_resolved') or f.get('client_engine')}`, evaluation every {f.get('federated_eval')} rounds; "
                     f"{fmt(_steps_per_round(runset, 'fedavg'), '{:.0f}')} gradient steps per round.")
    if cen:
        k = cen.config
        lines.append(f"- **Centralized**: {k.get('central_epochs')} epochs, mode `{k.get('central_mode')}`, "
                     f"evaluation every {k.get('eval_freq')} epochs; "
                     f"{fmt(_steps_per_round(runset, 'centralized'), '{:.0f}')} gradient steps per epoch.")
    if mat:
        k = mat.config
        lines.append(f"- **Centralized, compute-matched**: the centralized baseline with {k.get('central_steps')} "
                     f"steps per training group per epoch (`--central_steps`, = FedAvg's local steps), each on its "
                     f"own episode; {k.get('central_epochs')} epochs, mode `{k.get('central_mode')}`, evaluation "
                     f"every {k.get('eval_freq')} epochs; "
                     f"{fmt(_steps_per_round(runset, 'centralized_matched'), '{:.0f}')} gradient steps per epoch.")
    threads = (manifest or {}).get("threads")
    lines.append(f"- **Machine**: device `{c.get('device_resolved')}`, {env.get('cpu_count')} CPU cores"
                 + (f", {threads} torch thread(s) per process" if threads else "")
                 + f"; torch {env.get('torch')}; git commit `{str(env.get('git_commit'))[:10]}`"
                 + (" (dirty tree)" if env.get("git_dirty") else "") + ".")
    lines.append(f"- **Convergence round** (method.md §7): first round where the training loss, smoothed by a "
                 f"centred moving average of {(first.summary.get('convergence') or {}).get('window_rounds')} "
                 "rounds, has made 95% of its total progress (L₀ − L_t)/(L₀ − L_final).")
    return lines


def run_lines(runset: RunSet) -> list[str]:
    lines = ["| Method | Expected seeds | Finished | Interrupted (no summary.json) | Missing |", "|---|---|---|---|---|"]
    for m, c in runset.counts().items():
        lines.append(f"| {METHOD_LABELS[m]} | {c['expected']} | {c['finished']} | {c['interrupted']} | "
                     f"{c['missing']} |")
    lines.append("")
    lines += ["| Run folder | Method | Seed | Rounds | Wall time (s) | Convergence round |", "|---|---|---|---|---|---|"]
    for r in runset.all_finished():
        s = r.summary or {}
        lines.append(f"| `{r.path.name}` | {r.method} | {r.seed} | {s.get('rounds')} | "
                     f"{fmt(s.get('wall_time_s'), '{:.1f}')} | {s.get('convergence_round')} |")
    for r in runset.interrupted:
        lines.append(f"| `{r.path.name}` | {r.method} | {r.seed} | {r.last_round} of {r.planned_rounds} "
                     "(interrupted, not in the statistics) | – | – |")
    for m in runset.methods:
        for s in runset.missing(m):
            lines.append(f"| – | {m} | {s} | missing (not in the statistics) | – | – |")
    return lines


def reason_lines(runset: RunSet, manifest: dict | None) -> list[str]:
    runs = runset.all_finished()
    if not runs:
        return []
    c = runs[0].config
    fed_steps, cen_steps = _steps_per_round(runset, "fedavg"), _steps_per_round(runset, "centralized")
    rounds = max(r.summary.get("rounds", 0) for r in runs)
    lines = []
    if rounds < PAPER["rounds"]:
        lines.append(f"- **Fewer rounds than the paper**: {rounds} instead of {PAPER['rounds']:,} "
                     f"({100 * rounds / PAPER['rounds']:.0f}%). The convergence round is measured against each "
                     f"run's own final loss, so it is at most {rounds} and only its ratio between the methods "
                     "compares with the paper's 634 vs 1,180; a run that is still improving at its last round "
                     "converges 'late' by construction.")
    late = [r for r in runs if (r.summary or {}).get("convergence_round") is not None
            and r.summary["convergence_round"] >= 0.8 * r.summary.get("rounds", 0)]
    if late:
        names = ", ".join(f"{r.method} s{r.seed} ({r.summary['convergence_round']}/{r.summary['rounds']})"
                          for r in late)
        lines.append(f"- **Still improving at the end**: {len(late)} of {len(runs)} runs reached 95% of their loss "
                     f"progress only in the last 20% of their rounds ({names}): their loss was still falling late in "
                     "the run, and a longer run would likely move their convergence round later.")
    if fed_steps and cen_steps:
        lines.append(f"- **Rounds hide compute**: per round FedAvg takes {fed_steps:.0f} gradient steps "
                     f"(clients × local steps) and the centralized baseline {cen_steps:.0f} "
                     f"(one per training group), {fed_steps / cen_steps:.1f}× fewer. Counted in gradient steps "
                     "(the compute-normalised figures and the steps row of the table) the comparison can reverse.")
    dim = c.get("dim_x")
    if dim and dim != PAPER["emb_dim"]:
        lines.append(f"- **Embedding model**: {((c.get('data') or {}).get('embedding') or {}).get('model_id')} "
                     f"({dim} dimensions) instead of {PAPER['emb_model']} ({PAPER['emb_dim']}): a smaller "
                     "sentence encoder gives the model different (and fewer) features to learn from.")
    ds = c.get("dataset")
    if ds == "opinionqa":
        lines.append("- **Dataset and metric**: OpinionQA's US demographic groups, scored with 1 − normalised "
                     "Wasserstein distance, instead of GlobalOpinionQA's 14 countries scored with "
                     "1 − JS distance: other groups and another distance, so absolute alignment and FI values "
                     "do not compare with the paper's; the direction of the comparisons does.")
    elif ds == "globalqa":
        src = str((c.get("data") or {}).get("source") or "")
        lines.append(f"- **Dataset**: `{Path(src).name}` with {(c.get('data') or {}).get('kept_questions')} "
                     "questions kept; a country has tens of questions here instead of hundreds in the full "
                     "GlobalOpinionQA, so episodes are much smaller "
                     f"(context {c.get('min_ctx_num_qs')}–{c.get('max_ctx_num_qs')}, evaluation context "
                     f"{c.get('eval_num_qs')} questions) and each group's score rests on few questions.")
    n = min(len(runset.finished(m)) for m in runset.methods)
    if n < 4:
        lines.append(f"- **Seeds**: {n} per method (paper: 4); the confidence intervals are wide.")
    if c.get("central_mode") == "batched":
        lines.append("- **Centralized mode**: `batched` (the released code: one step per epoch), not the "
                     "paper's sequential one step per group.")
    return lines


# key -> (word when FedAvg's value is positive, word when negative, sentence with {value} {word})
_AGREEMENT = {
    "rounds_fewer_pct": ("fewer", "more", "- FedAvg converged in {value:.1f}% {word} rounds than centralized "
                         f"(paper: {PAPER['rounds_fewer_pct']:.0f}% fewer, round 634 vs 1,180)"),
    "steps_fewer_pct": ("fewer", "more", "- In gradient steps FedAvg needed {value:.1f}% {word} than centralized to "
                        f"converge (paper, implied: {abs(PAPER['steps_fewer_pct']):.0f}% more)"),
    "alignment_gain_pct": ("higher", "lower", "- FedAvg's final mean evaluation alignment is {value:.2f}% {word} than "
                           "centralized (paper: about +4%)"),
    "best_alignment_gain_pct": ("higher", "lower",
                                "- Best-over-training mean evaluation alignment: FedAvg {value:.2f}% {word}"),
}


def agreement_lines(items) -> list[str]:
    out = []
    for h in items:
        if h.measured is None:
            out.append(f"- {h.label}: not measured.")
        elif h.key in _AGREEMENT:
            up, down, sentence = _AGREEMENT[h.key]
            word = up if h.measured > 0 else down
            out.append(sentence.format(value=abs(h.measured), word=word) + f": **{h.verdict}**.")
        elif h.key == "fi_diff":
            out.append(f"- Fairness: FI difference {h.measured:+.5f} (paper: FI ≈ 1 for both): **{h.verdict}**.")
    return out


def write_report(runset: RunSet, results_dir: Path, stem: str, *, pred: dict | None = None,
                 pred_error: str | None = None, report_command: list[str] | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Write <stem>.md, <stem>_table.md, <stem>_table.csv and the figures; returns their paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    manifest = find_manifest(runset)
    items = headlines(runset)
    table_md = markdown_table(runset)
    head_md = markdown_headlines(items)
    paths = {"table_md": results_dir / f"{stem}_table.md", "table_csv": results_dir / f"{stem}_table.csv",
             "report": results_dir / f"{stem}.md"}
    paths["table_md"].write_text(f"# {stem}: results over seeds\n\n{table_md}\n## Headline comparisons\n\n"
                                 f"{head_md}", encoding="utf-8")
    paths["table_csv"].write_text(csv_table(runset, items), encoding="utf-8")
    figs = make_figures(runset, results_dir, stem, pred)
    paths.update(figs)

    runs = runset.all_finished()
    dataset = runs[0].config.get("dataset") if runs else stem
    cmd_lines = []
    if manifest and manifest.get("command"):
        cmd_lines += ["Training and report (one command; finished runs are reused, interrupted ones resumed):",
                      "", "```bash", shown_command(manifest["command"]), "```", ""]
    elif runs:
        cmd_lines += ["Commands recorded in the run folders (config.json → environment.argv):", "", "```bash",
                      *(shown_command(c) for c in run_commands(runs)), "```", ""]
    if report_command:
        cmd_lines += ["This report (from the run folders alone):", "", "```bash",
                      "python " + " ".join(shlex.quote(a) for a in shown_argv(report_command)), "```", ""]
    if manifest and manifest.get("wall_time_s") is not None:
        cmd_lines.append(f"The training command took {manifest['wall_time_s'] / 60:.1f} min of wall time "
                         f"(all methods and seeds, one process, {manifest.get('threads') or 'default'} torch "
                         "thread(s)).")
        cmd_lines.append("")

    fig_text = {
        "loss_vs_round": "Training loss vs round (paper Fig. 2)",
        "alignment_vs_round": "Mean evaluation alignment vs round (paper Fig. 4)",
        "fi_vs_round": "Fairness index vs round (paper Fig. 5)",
        "predictions": "Predicted vs true distributions, one question, two evaluation groups (paper Fig. 3)",
        "loss_vs_steps": "Compute-normalised Fig. 2: training loss vs gradient steps",
        "alignment_vs_steps": "Compute-normalised Fig. 4: mean evaluation alignment vs gradient steps",
    }
    fig_lines = []
    for key, text in fig_text.items():
        if key in figs:
            fig_lines += [f"**{text}**", "", f"![{text}]({_rel(figs[key], results_dir)})", ""]
    if "predictions" not in figs:
        fig_lines += [f"Fig. 3 was not drawn: {pred_error or 'no prediction data'}.", ""]
    fig_lines.append("Curves: line = mean over seeds, band = min–max over seeds; loss curves are smoothed per "
                     "seed with the same centred moving average that defines the convergence round.")
    if pred:
        g1, g2 = pred["groups"]
        fig_lines.append(f"Fig. 3 shows question {pred['qkey']} for {g1} and {g2} (seed {pred['seed']}, final "
                         "weights): the evaluation-group pair and target question whose true distributions "
                         "differ most (largest JS distance between the two groups).")

    st = method_stats(runset)
    conv = {m: st["convergence_round"][m].mean for m in runset.methods}
    al = {m: st["final_eval_alignment_score"][m].mean for m in runset.methods}
    body = [
        f"# {title or f'Reproduction over seeds: {dataset}' + ('' if stem == dataset else f' ({stem})')}",
        "",
        f"Generated by `scripts/reproduce.py` (reporting/report.py) on {time.strftime('%Y-%m-%d')} from "
        f"{len(runs)} finished run folders. Every number below is computed from those folders; the paper's "
        "numbers are from PluralLLM (Srewa et al. 2025) as summarised in method.md §7.",
        "",
        "## Where this agrees or disagrees with the paper",
        "",
        f"Convergence round, mean over seeds: FedAvg {fmt(conv.get('fedavg'), '{:.1f}')}, centralized "
        f"{fmt(conv.get('centralized'), '{:.1f}')} (paper: 634 vs 1,180). Final mean evaluation alignment: FedAvg "
        f"{fmt(al.get('fedavg'))}, centralized {fmt(al.get('centralized'))}.",
        "",
        *agreement_lines(items),
        "",
        "The likely reasons for the differences are [listed below](#likely-reasons-for-the-differences).",
        "",
        "## Setup",
        "",
        *setup_lines(runset, manifest),
        "",
        "## Commands",
        "",
        *cmd_lines,
        "## Runs",
        "",
        *run_lines(runset),
        "",
        "## Results over seeds",
        "",
        table_md,
        "Wall times include the evaluations and are as measured on the machine named in Setup, under whatever "
        "else it was running at the time: compare them roughly; gradient steps and points are exact.",
        "",
        f"Also as [{paths['table_md'].name}]({paths['table_md'].name}) and "
        f"[{paths['table_csv'].name}]({paths['table_csv'].name}) (per-seed values included).",
        "",
        "## The paper's headline comparisons, as measured here",
        "",
        head_md,
        "## Likely reasons for the differences",
        "",
        *reason_lines(runset, manifest),
        "",
        "## Figures",
        "",
        *fig_lines,
    ]
    if runset.warnings:
        body += ["", "## Warnings", ""] + [f"- {w}" for w in runset.warnings]
    paths["report"].write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    return paths


def shown_command(command: str) -> str:
    """A recorded command line with its absolute paths shown relative to the repository."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    return " ".join(shlex.quote(w) for w in shown_argv(words))


def current_command() -> list[str]:
    return [sys.argv[0], *sys.argv[1:]] if sys.argv and sys.argv[0] else []
