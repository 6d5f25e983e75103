"""docs/results/<name>.md, its tables and figures, every number computed from the run folders."""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

from .convergence import GAIN_WINDOW_EVALS
from .figures import FIGURES, make_figures
from .lookup import lookup_lines
from .paths import shown_command
from .prose import fill, snippets, template
from .runs import RunSet, partial_note, run_commands
from .sections import agreement_lines, means_line, reason_lines, run_lines, setup_lines
from .tables import PAPER, csv_table, headlines, markdown_headlines, markdown_table, method_stats
from .verdicts import claims_lines, definitions_lines

MANIFEST = "reproduce.json"


def comm_note(runset: RunSet) -> str:
    """Which runs' communication was not counted, so that an empty cell is never read as zero."""
    missing = [r for r in runset.all_finished() if r.method == "fedavg" and "total_comm_bytes" not in (r.summary or {})]
    return snippets()["comm"] + (snippets()["comm_missing"].format(n=len(missing)) if missing else "") + "\n"


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


def write_report(runset: RunSet, results_dir: Path, stem: str, *, pred: dict | None = None,
                 pred_error: str | None = None, report_command: list[str] | None = None) -> dict[str, Path]:
    """<stem>.md, <stem>_table.md, <stem>_table.csv and the figures; returns their paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    manifest = find_manifest(runset)
    items = headlines(runset)
    table_md = markdown_table(runset)
    head_md = markdown_headlines(items)
    paths = {"table_md": results_dir / f"{stem}_table.md", "table_csv": results_dir / f"{stem}_table.csv",
             "report": results_dir / f"{stem}.md"}
    partial = runset.partial_label()
    label = f" ({partial})" if partial else ""
    paths["table_md"].write_text(f"# {stem}: results over seeds{label}\n\n{table_md}\n## Headline comparisons\n\n"
                                 f"{head_md}", encoding="utf-8")
    paths["table_csv"].write_text(csv_table(runset, items), encoding="utf-8")
    figs = make_figures(runset, results_dir, stem, pred)
    paths.update(figs)

    runs = runset.all_finished()
    dataset = runs[0].config.get("dataset") if runs else stem
    text, fig_lines = snippets(), []
    for key, _, caption, _ in FIGURES:
        if key in figs:
            where = os.path.relpath(figs[key], results_dir).replace(os.sep, "/")
            fig_lines += [f"**{caption}**", "", f"![{caption}]({where})", ""]
    if "predictions" not in figs:
        fig_lines += [text["fig3_missing"].format(why=pred_error or "no prediction data"), ""]
    fig_lines.append(text["curves"])
    if pred:
        fig_lines.append(text["fig3"].format(qkey=pred["qkey"], g1=pred["groups"][0], g2=pred["groups"][1],
                                             seed=pred["seed"]))

    st = method_stats(runset)
    fi_means = {m: st["final_eval_fi"][m].mean for m in runset.methods}
    rounds = max((int((r.summary or {}).get("rounds") or 0) for r in runs), default=0)
    horizon = "" if rounds >= PAPER["rounds"] else (
        f"Short-horizon check ({rounds} rounds; the paper trains {PAPER['rounds']:,}), not the paper's protocol: ")
    default_title = f"{horizon}reproduction over seeds: {dataset}" + ("" if stem == dataset else f" ({stem})")
    body = fill(template("reproduce_report.md"),
                title=default_title[0].upper() + default_title[1:] + label, first=partial_note(partial),
                date=time.strftime("%Y-%m-%d"), n_runs=len(runs), lookup=lookup_lines(runset),
                means=means_line(runset, st), agreement=agreement_lines(items), claims=claims_lines(items, fi_means),
                gain_window=GAIN_WINDOW_EVALS, definitions=definitions_lines(runset),
                setup=setup_lines(runset, manifest), commands=command_lines(runs, manifest, report_command),
                runs=run_lines(runset), table=table_md,
                comm_note=comm_note(runset), table_md=paths["table_md"].name, table_csv=paths["table_csv"].name,
                headlines=head_md, reasons=reason_lines(runset, manifest), figures=fig_lines)
    if runset.warnings:
        body += ["", "## Warnings", ""] + [f"- {w}" for w in runset.warnings]
    paths["report"].write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    return paths


def command_lines(runs: list, manifest: dict | None, report_command: list[str] | None) -> list[str]:
    blocks = []
    if manifest and manifest.get("command"):
        blocks.append(("cmd_manifest", [_recorded(manifest["command"])]))
    elif runs and run_commands(runs):
        blocks.append(("cmd_recorded", [_recorded(c) for c in run_commands(runs)]))
    elif report_command and "--report_only" in report_command:
        training = [a for a in report_command if a != "--report_only"]
        blocks.append(("cmd_training", [shown_command(["python", *training])]))
    if report_command:
        blocks.append(("cmd_report", [shown_command(["python", *report_command])]))
    text = snippets()
    lines = [line for key, cmds in blocks for line in (text[key], "", "```bash", *cmds, "```", "")]
    if manifest and manifest.get("wall_time_s") is not None:
        jobs = manifest.get("jobs") or 1
        lines += [text["wall_time"].format(
            minutes=manifest["wall_time_s"] / 60, threads=manifest.get("threads") or "default",
            at_once="one process" if jobs == 1 else f"{jobs} runs at once, one process each",
            each="" if jobs == 1 else " each"), ""]
    return lines


def _recorded(command: str) -> str:
    """A recorded command line with its absolute paths shown relative to the repository."""
    try:
        return shown_command(shlex.split(command))
    except ValueError:
        return command


