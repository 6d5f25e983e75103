"""scripts/reproduce.py and reporting/: statistics with exact numbers, run-folder handling
(reuse, resume, refusal), report-only on existing folders, and the smoke preset end to end."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reporting import reproduce
from reporting.runs import collect, find_run_folders
from reporting.tables import PAPER, describe, headlines, markdown_table, pct_fewer, pct_gain
from utils.errors import RunFolderError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# statistics


def test_describe_exact_numbers():
    s = describe([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3), abs=1e-15)        # sample std, ddof = 1
    # t(0.975, 3) = 3.1824463052837078; half width = t * std / sqrt(4)
    assert s.ci_low == pytest.approx(0.4457397432394794, abs=1e-12)
    assert s.ci_high == pytest.approx(4.554260256760521, abs=1e-12)

    s = describe([2.0, 4.0])  # t(0.975, 1) = 12.706204736174694, std = sqrt(2), sqrt(n) = sqrt(2)
    assert (s.mean, s.std) == (3.0, pytest.approx(math.sqrt(2)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(3 - 12.706204736174694), pytest.approx(3 + 12.706204736174694))


def test_a_paired_ci_with_no_variance_is_degenerate_never_excludes_0():
    """Identical differences on every seed (the smoke report's deterministic runs) give a CI of zero
    width: it tests nothing, so no report may call it significant."""
    from reporting.tables import _verdict, significance
    from reporting.verdicts import status
    flat = describe([0.1, 0.1, 0.1])  # float rounding would give std 1.7e-17; equal values give 0
    assert flat.std == 0 and describe([15737.71287803759, 15737.712878037594]).std == 0  # ε, equal but for rounding
    assert describe([1.0, 1.0 + 1e-9]).std > 0
    assert significance(flat) == "degenerate" and significance(describe([0.9, 1.0, 1.1])) == "excludes"
    text = _verdict("alignment_gain_pct", 2.0, flat, {})
    assert "no variance across 3 seeds" in text and "excludes" not in text
    assert status("alignment_gain_pct", 2.0, flat) == "same direction, no variance across 3 seeds"


def test_describe_small_and_missing():
    assert describe([]).n == 0 and describe([]).mean is None
    one = describe([0.7])
    assert (one.n, one.mean, one.std, one.ci_low) == (1, 0.7, None, None)
    s = describe([None, 1.0, 3.0])            # a run without a convergence round
    assert (s.n, s.dropped, s.mean) == (2, 1, 2.0)
    same = describe([5.0, 5.0, 5.0])
    assert (same.std, same.ci_low, same.ci_high) == (0.0, 5.0, 5.0)


def test_headline_formulas_and_paper_numbers():
    assert pct_fewer(634, 1180) == pytest.approx(46.27118644067797)
    assert PAPER["rounds_fewer_pct"] == pytest.approx(46.27118644067797)
    assert pct_gain(0.52, 0.5) == pytest.approx(4.0)
    assert pct_fewer(None, 10) is None and pct_gain(1.0, 0) is None
    # steps implied by the paper's rounds: 8 clients x 6 local steps vs 8 steps per epoch
    assert (PAPER["fedavg_steps"], PAPER["centralized_steps"]) == (30432, 9440)
    assert PAPER["steps_fewer_pct"] == pytest.approx(-222.3728813559322)


# ----------------------------------------------------------------------------------------
# fake run folders: exact numbers through collect -> tables


def _fake_run(folder: Path, method: str, seed: int, conv: int, final: float, fi: float, steps_per_round: int,
              rounds: int = 40, summary: bool = True):
    folder.mkdir(parents=True)
    cfg = {"method": method, "seed": seed, "dataset": "synthetic", "train_groups": ["a", "b"],
           "eval_groups": ["c"], "comm_round": rounds, "central_epochs": rounds, "metric": "jsd"}
    (folder / "config.json").write_text(json.dumps(cfg))
    losses = [{"round": r, "train_loss": 10.0 - r * 0.1, "grad_steps": r * steps_per_round, "points": r * 100}
              for r in range(1, rounds + 1)]
    (folder / "losses.jsonl").write_text("".join(json.dumps(x) + "\n" for x in losses))
    metrics = [{"round": r, "eval_alignment_score": final * r / rounds if r else 0.5, "eval_fi": fi, "train_fi": fi,
                "grad_steps": r * steps_per_round, "wall_time_s": float(r)} for r in range(0, rounds + 1, 10)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics))
    if summary:
        s = {"rounds": rounds, "convergence_round": conv, "final_eval_alignment_score": final,
             "best_eval_alignment_score": final, "final_eval_fi": fi, "final_eval_cov": 0.01,
             "final_train_alignment_score": final, "final_train_fi": fi, "final_train_cov": 0.02,
             "wall_time_s": 100.0 + seed, "convergence_grad_steps": conv * steps_per_round,
             "convergence_points": conv * 100, "total_grad_steps": rounds * steps_per_round,
             "convergence": {"window_rounds": 21}}
        (folder / "summary.json").write_text(json.dumps(s))


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "runs"
    _fake_run(root / "fedavg_s0", "fedavg", 0, conv=20, final=0.84, fi=0.999, steps_per_round=60)
    _fake_run(root / "fedavg_s1", "fedavg", 1, conv=30, final=0.86, fi=0.998, steps_per_round=60)
    _fake_run(root / "centralized_s0", "centralized", 0, conv=40, final=0.80, fi=0.997, steps_per_round=10)
    _fake_run(root / "centralized_s1", "centralized", 1, conv=40, final=0.82, fi=0.999, steps_per_round=10)
    _fake_run(root / "centralized_s2", "centralized", 2, conv=1, final=0.1, fi=0.5, steps_per_round=10,
              summary=False)  # interrupted: counted, never averaged
    return root


def test_tables_from_folders_exact(fake_runs):
    rs = collect(find_run_folders([str(fake_runs)]), seeds=[0, 1, 2])
    assert rs.counts() == {"fedavg": {"expected": 3, "finished": 2, "interrupted": 0, "missing": 1},
                           "centralized": {"expected": 3, "finished": 2, "interrupted": 1, "missing": 0}}
    h = {x.key: x for x in headlines(rs)}
    assert h["rounds_fewer_pct"].measured == pytest.approx(100 * (1 - 25 / 40))      # 37.5
    assert h["rounds_fewer_pct"].paired.values == pytest.approx((50.0, 25.0))
    assert h["rounds_fewer_pct"].verdict.startswith("agrees in direction")
    assert h["steps_fewer_pct"].measured == pytest.approx(100 * (1 - 25 * 60 / 400))   # -275: more steps
    assert h["alignment_gain_pct"].measured == pytest.approx(100 * (0.85 - 0.81) / 0.81)
    assert h["fi_diff"].measured == pytest.approx(0.9985 - 0.998)
    assert h["fi_diff"].verdict.startswith("agrees: FI ≈ 1 for both")
    table = markdown_table(rs)
    assert "| Convergence round | 25.0 ± 7.1 [-38.5, 88.5] | 40.0 ± 0.0 [40.0, 40.0] |" in table


def test_report_only_on_fake_folders(fake_runs, tmp_path, capsys):
    out = tmp_path / "results"
    rc = reproduce.main(["--report_only", "--runs", str(fake_runs / "*"), "--seeds", "0", "1", "2",
                        "--name", "fake", "--results_dir", str(out)])
    assert rc == 0
    log = capsys.readouterr().out
    assert "fedavg: 2 finished, 0 interrupted, 1 missing (of 3 seeds)" in log
    assert "fig. 3 skipped" in log  # fake folders hold no checkpoints: said, not fatal
    report = (out / "fake.md").read_text()
    assert "FedAvg converged in 37.5% fewer rounds than centralized (paper: 46% fewer" in report
    assert "| `centralized_s2` | centralized | 2 | 40 of 40 (interrupted, not in the statistics)" in report
    assert "| – | fedavg | 2 | missing (not in the statistics)" in report
    for name in ("fig2_loss_vs_round", "fig4_alignment_vs_round", "fig5_fi_vs_round",
                 "fig2c_loss_vs_grad_steps", "fig4c_alignment_vs_grad_steps"):
        assert (out / f"fake_{name}.png").stat().st_size > 1000
    rows = list(csv.DictReader((out / "fake_table.csv").open()))
    conv = next(r for r in rows if r["metric"] == "convergence_round" and r["method"] == "fedavg")
    assert (float(conv["mean"]), conv["n"], conv["per_seed"]) == (25.0, "2", "0:20;1:30")


# ----------------------------------------------------------------------------------------
# convergence definitions, claims and flips: designed curves with exact answers


def test_convergence_definitions_exact(tmp_path):
    from reporting.convergence import alignment_gain_round, loss_progress_round
    from reporting.runs import Run
    # loss 1 up to round 30, then 0: the centred 21-round average keeps 41 - r ones in its window
    # at rounds 31..41, so progress (21 - ones)/21 reaches 0.90 at 39, 0.95 at 40, 0.99 at 41
    losses = [{"round": r, "train_loss": 1.0 if r <= 30 else 0.0} for r in range(1, 61)]
    run = Run(tmp_path, "finished", losses=losses)
    assert [loss_progress_round(run, q) for q in (0.90, 0.95, 0.99)] == [39, 40, 41]
    # alignment 0.5 0.5 0.6 0.9 1 1 1: smoothed over 3 evaluations .5 .533 .667 .833 .967 1 1; 95% of
    # the 0.5 gain needs >= 0.975: round 50 (raw, window 1: round 40)
    al = [0.5, 0.5, 0.6, 0.9, 1.0, 1.0, 1.0]
    run = Run(tmp_path, "finished", metrics=[{"round": 10 * i, "eval_alignment_score": a} for i, a in enumerate(al)])
    assert alignment_gain_round(run) == 50 and alignment_gain_round(run, window=1) == 40
    flat = Run(tmp_path, "finished", metrics=[{"round": r, "eval_alignment_score": 0.7} for r in (0, 10, 20)])
    assert alignment_gain_round(flat) is None  # no gain, no round


def _designed_run(folder: Path, method: str, seed: int, step: int, evals: list[float], steps_per_round: int,
                  central_steps: int = 1):
    """A finished run: loss 1 until round `step`, then 0 (converges at step + 10 by the 0.95 rule);
    mean eval alignment `evals` at rounds 0, 10, ...; the worst of two groups 0.1 below the mean."""
    folder.mkdir(parents=True)
    rounds = 10 * (len(evals) - 1)
    cfg = {"method": method, "seed": seed, "dataset": "synthetic", "comm_round": rounds, "central_epochs": rounds,
           "central_steps": central_steps, "epochs": 6}
    (folder / "config.json").write_text(json.dumps(cfg))
    _write_jsonl(folder / "losses.jsonl", [{"round": r, "train_loss": 1.0 if r <= step else 0.0,
                                            "grad_steps": r * steps_per_round} for r in range(1, rounds + 1)])
    _write_jsonl(folder / "metrics.jsonl", [
        {"round": 10 * i, "eval_alignment_score": a, "eval_group_scores": {"a": a - 0.1, "b": a}, "eval_fi": 0.999,
         "grad_steps": 10 * i * steps_per_round, "wall_time_s": float(i)} for i, a in enumerate(evals)])
    summary = {"rounds": rounds, "convergence_round": step + 10, "final_eval_alignment_score": evals[-1],
               "best_eval_alignment_score": max(evals), "final_eval_fi": 0.999,
               "convergence_grad_steps": (step + 10) * steps_per_round, "convergence": {"window_rounds": 21}}
    (folder / "summary.json").write_text(json.dumps(summary))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


FAST, SLOW = [0.5, 0.5, 1, 1, 1, 1, 1, 1, 1], [0.5] * 5 + [1] * 4


@pytest.fixture
def designed(tmp_path):
    root = tmp_path / "designed"
    for seed, (f, c, m) in enumerate(((30, 50, 28), (32, 54, 34))):
        _designed_run(root / f"fedavg_s{seed}", "fedavg", seed, f, FAST, 6)
        _designed_run(root / f"centralized_s{seed}", "centralized", seed, c, [0.5] * 5 + [0.9] * 4, 1)
        _designed_run(root / f"centralized_matched_s{seed}", "centralized", seed, m, SLOW, 6, central_steps=6)
    return root


def test_claims_compute_matched_change_and_definition_flips(designed, tmp_path):
    from reporting.verdicts import claims_lines, definitions_lines
    rs = collect(find_run_folders([str(designed)]))
    assert rs.methods == ("fedavg", "centralized", "centralized_matched")
    h = {(x.key, x.b): x for x in headlines(rs)}
    # rounds: per seed 1 - 40/60 and 1 - 42/64 against centralized; 40 vs 38 and 42 vs 44 against matched
    assert h[("rounds_fewer_pct", "centralized")].paired.values == pytest.approx((100 / 3, 100 * (1 - 42 / 64)))
    assert h[("rounds_fewer_pct", "centralized_matched")].measured == pytest.approx(0.0)
    assert h[("alignment_gain_pct", "centralized")].measured == pytest.approx(100 / 9)
    assert h[("worst_alignment_diff", "centralized")].measured == pytest.approx(0.1)
    lines = "\n".join(claims_lines(headlines(rs), {"fedavg": 0.999, "centralized": 0.999,
                                                   "centralized_matched": 0.999}))
    assert ("| FedAvg converges in fewer rounds than centralized training (paper: round 634 vs 1,180) | **holds** | "
            "**does not hold** |") in lines
    assert "| Both methods are fair across groups, FI ≈ 1 (paper) | **holds** | **holds** |" in lines
    assert ("2 of 3 claims change status when the baseline takes as many gradient steps per epoch as FedAvg per "
            "round (“FedAvg converges in fewer rounds than centralized training”: holds → does not hold; “FedAvg "
            "reaches a higher final mean evaluation alignment”: same direction, no variance across 2 seeds → does "
            "not hold)") in lines

    text = "\n".join(definitions_lines(rs))
    assert "| loss progress ≥ 95% (default) | 41.0 ± 1.4 [28.3, 53.7] | 62.0 ± 2.8 [36.6, 87.4] |" in text
    assert "| eval alignment gain ≥ 95% | 30.0 ± 0.0 [30.0, 30.0] | 60.0 ± 0.0 [60.0, 60.0] |" in text
    # the eval-alignment definition gives the same rounds on both seeds: a zero-width CI, no verdict of significance
    assert "(2 of 2 comparisons flip)" in text
    assert ("- against centralized: **flips**: holds under loss progress ≥ 90%, loss progress ≥ 95% (default), loss "
            "progress ≥ 99%; same direction, no variance across 2 seeds under eval alignment gain ≥ 95%.") in text
    assert ("- against compute-matched centralized: **flips**: does not hold under loss progress ≥ 90%, loss "
            "progress ≥ 95% (default), loss progress ≥ 99%; same direction, no variance across 2 seeds under eval "
            "alignment gain ≥ 95%.") in text

    out = tmp_path / "res"
    assert reproduce.main(["--report_only", "--runs", str(designed), "--name", "d", "--results_dir", str(out)]) == 0
    report = (out / "d.md").read_text()
    assert report.startswith("# Short-horizon check (80 rounds; the paper trains 1,300), not the paper's protocol")
    assert "| Worst-group eval alignment (final) | 0.9000 ± 0.0000 [0.9000, 0.9000] | 0.8000 ± 0.0000" in report
    rows = {(r["kind"], r["metric"], r["method"]): r for r in csv.DictReader((out / "d_table.csv").open())}
    assert rows[("metric", "conv_loss_099", "fedavg")]["per_seed"] == "0:41;1:43"
    assert rows[("headline_paired", "rounds_fewer_pct", "fedavg_vs_centralized_matched")]["n"] == "2"
    assert (out / "d_fig6_worst_alignment.png").stat().st_size > 1000


def test_figure_labels_and_axes(designed, tmp_path, monkeypatch):
    from reporting import figures
    rs = collect(find_run_folders([str(designed / "fedavg_s*")]))   # one method only
    seen = {}
    real = figures.finish
    monkeypatch.setattr(figures, "finish", lambda fig, ax, title, xlabel, ylabel, path, note=figures.BAND:
                        seen.setdefault(title, ylabel) and real(fig, ax, title, xlabel, ylabel, path, note))
    figures.fig_loss(rs, tmp_path / "l.png")
    # the drawn runs' 21-round window, not the absent methods' (a single-method report said 1-round)
    assert seen["Training loss vs round (paper Fig. 2)"] == "Training loss (NLL; centred 21-round moving average)"
    fig = figures.plt.figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0.9999998, 0.9999999])
    figures.plain_y(ax, 0.01, top=1.0, decimals=4)
    assert ax.get_ylim() == (pytest.approx(0.99), pytest.approx(1.0))
    assert ax.yaxis.get_major_formatter()(0.995) == "0.9950" and ax.yaxis.get_offset_text().get_text() == ""
    figures.plt.close(fig)


# ----------------------------------------------------------------------------------------
# reporting.compare (scripts/sweep.py's report): variants (strategies, DP noise levels) against a baseline


def _variant_run(folder: Path, seed: int, mean: float, worst: float, eps: float | None = None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": "fedavg", "seed": seed, "dataset": "synthetic",
                                                    "eval_groups": ["a", "b"]}))
    _write_jsonl(folder / "metrics.jsonl", [{"round": r, "eval_alignment_score": mean - 0.1 + r / 100,
                                             "eval_group_scores": {"a": worst - 0.1 + r / 100,
                                                                   "b": 2 * mean - worst - 0.1 + r / 100}}
                                            for r in (0, 5, 10)])
    summary = {"rounds": 10, "final_eval_alignment_score": mean, "best_eval_alignment_score": mean,
               "final_eval_fi": 0.99, "final_eval_cov": 0.1}
    if eps is not None:
        summary["dp_epsilon"] = eps
        _write_jsonl(folder / "losses.jsonl", [{"round": 9, "dp_epsilon_exact": 0.0, "dp_epsilon_replace_one": 0.0},
                                               {"round": 10, "dp_epsilon_exact": eps - 1, "dp_epsilon_replace_one": 2 * eps},
                                               {"round": 10, "train_loss": 1.0}])
    (folder / "summary.json").write_text(json.dumps(summary))


def test_compare_variants_paired_against_a_baseline(tmp_path):
    from reporting import compare
    root = tmp_path / "strat"
    for seed, (m, w) in enumerate(((0.80, 0.70), (0.82, 0.72))):
        _variant_run(root / f"fedavg_s{seed}", seed, m, w)
    for seed, (m, w) in enumerate(((0.78, 0.72), (0.79, 0.75))):
        _variant_run(root / f"trimmed_s{seed}", seed, m, w)
    for seed, eps in enumerate((8.0, 7.5)):
        _variant_run(root / f"noise1_s{seed}", seed, 0.75, 0.6, eps)
    _variant_run(root / "noise2_s0", 0, 0.7, 0.5, 2.0)
    (root / "trimmed_s2").mkdir()
    (root / "trimmed_s2" / "config.json").write_text(json.dumps({"method": "fedavg", "seed": 2}))  # interrupted
    out = tmp_path / "res" / "strategies.md"
    base = compare.load_variant("fedavg", [f"{root}/fedavg_s*"])
    others = [compare.load_variant(n, [f"{root}/{n}_s*"]) for n in ("trimmed", "noise1", "noise2")]
    compare.write_comparison(base, others, out)
    text = out.read_text()
    assert "```bash" not in text and "## Setup" not in text
    # per seed: mean -0.02, -0.03 and worst +0.02, +0.03: t(0.975, 1) * 0.00707 / sqrt(2) = 0.0635
    assert ("| trimmed | -0.0250 ± 0.0071 [-0.0885, +0.0385] | +0.0250 ± 0.0071 [-0.0385, +0.0885] |") in text
    assert ("- **trimmed** against fedavg: mean evaluation alignment 0.0250 lower (not significant over these "
            "seeds); worst-group evaluation alignment 0.0250 higher (not significant over these seeds).") in text
    assert "- **noise2** against fedavg: mean evaluation alignment 0.1000 lower (a single seed: no CI)" in text
    assert "| Privacy budget ε (final) | – | – | 7.75 ± 0.354 [4.57, 10.9] | 2 (n=1) |" in text  # 12.706 * 0.25
    # the last logged value of each: 7, 6.5 and 16, 15 (12.706 * 0.5 = 6.35)
    assert "| ε, exact composition = PRV (final) | – | – | 6.75 ± 0.354 [3.57, 9.93] | 1 (n=1) |" in text
    assert "| ε, replace-one neighbours (final) | – | – | 15.5 ± 0.707 [9.15, 21.9] | 4 (n=1) |" in text
    assert "/strat/trimmed_s2 is interrupted (no summary.json); not in the statistics" in text
    assert not ABSOLUTE.findall(text) and str(ROOT) not in text
    for f in ("strategies_table.csv", "strategies_worst_vs_round.png", "strategies_mean_vs_worst.png",
              "strategies_alignment_vs_epsilon.png"):
        assert (out.parent / f).stat().st_size > 0, f
    table = csv.DictReader((out.parent / "strategies_table.csv").open())
    rows = {(r["kind"], r["metric"], r["variant"]): r for r in table}
    assert rows[("paired_vs_fedavg", "final_eval_worst_alignment", "trimmed")]["n"] == "2"
    assert float(rows[("metric", "final_eval_worst_alignment", "trimmed")]["mean"]) == pytest.approx(0.735)

    with pytest.raises(RunFolderError, match="no finished run folder matches"):
        compare.load_variant("fedavg", [f"{root}/none_*"])


# ----------------------------------------------------------------------------------------
# the pipeline on tiny synthetic runs: reuse, resume, refusal


TINY = ["--dataset", "synthetic", "--syn_groups", "5", "--syn_questions", "30", "--syn_dim", "8",
        "--d_model", "8", "--dim_feedforward", "8", "--num_layers", "1", "--nhead", "2", "--emb_depth", "2",
        "--epochs", "2", "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "6", "--min_tar_num_qs", "3",
        "--max_tar_num_qs", "6", "--eval_num_qs", "5", "--comm_round", "4", "--central_epochs", "4",
        "--federated_eval", "2", "--eval_freq", "2", "--wandb", "off", "--quiet", "--seeds", "0", "1"]


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"}
            for line in path.read_text().splitlines()]


def test_pipeline_reuses_resumes_and_refuses(tmp_path, capsys, records_dir):
    root, results = tmp_path / "runs", tmp_path / "results"
    argv = TINY + ["--out_root", str(root), "--results_dir", str(results), "--name", "tiny"]
    assert reproduce.main(argv) == 0
    first = capsys.readouterr().out
    assert "plan: 4 fresh" in first
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["centralized_s0", "centralized_s1", "fedavg_s0", "fedavg_s1"]
    cfg = {m: json.loads((root / f"{m}_s0" / "config.json").read_text()) for m in ("fedavg", "centralized")}
    assert cfg["fedavg"]["train_groups"] == json.loads((root / "fedavg_s1" / "config.json").read_text())[
        "train_groups"]  # one split for every seed
    assert "comm_round" not in cfg["centralized"] and "seeds" not in cfg["fedavg"]  # entry points' own flags
    assert (results / "tiny.md").is_file() and (results / "tiny_fig3_predictions.png").is_file()
    manifest = json.loads((root / "reproduce.json").read_text())
    assert manifest["sessions"][-1]["trained"] == ["fedavg_s0", "centralized_s0", "fedavg_s1", "centralized_s1"]

    # finished runs are reused, nothing retrained
    summary_before = (root / "fedavg_s1" / "summary.json").read_text()
    assert reproduce.main(argv) == 0
    assert "plan: 4 reuse" in capsys.readouterr().out
    assert (root / "fedavg_s1" / "summary.json").read_text() == summary_before

    # an interrupted run (killed after the round-2 checkpoint) is resumed to the same numbers
    run = root / "fedavg_s1"
    want = _records(run / "metrics.jsonl")
    (run / "summary.json").unlink()
    for tag in ("final", "round_00004"):
        for f in (run / "checkpoints").glob(f"{tag}.*"):
            f.unlink()
    shutil.rmtree(records_dir / "fedavg_s1")  # killed before it finished, so never recorded
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert "plan: 3 reuse, 1 resume" in out and "resumed from checkpoint round_00002" in out
    assert _records(run / "metrics.jsonl") == want

    # a folder trained with other flags is refused, never overwritten
    other = list(argv)
    other[other.index("--epochs") + 1] = "3"
    assert reproduce.main(other) == 2
    err = capsys.readouterr().err
    assert "was trained with different flags" in err and "epochs: 2 -> 3" in err and "hint:" in err
    assert (root / "fedavg_s1" / "summary.json").is_file()

    # the report can be rebuilt from the folders alone, e.g. after copying them elsewhere
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert reproduce.main(["--report_only", "--runs", str(moved / "*_s*"), "--name", "copy",
                          "--results_dir", str(tmp_path / "r2")]) == 0
    a = (results / "tiny_table.csv").read_text()
    b = (tmp_path / "r2" / "copy_table.csv").read_text()
    assert a == b


def test_forbidden_flags_are_explained(capsys):
    assert reproduce.main(["--seed", "3"]) == 2
    assert "use --seeds" in capsys.readouterr().err


def test_too_small_groups_get_the_largest_bounds_they_allow(tmp_path, capsys):
    argv = [a if a != "6" else "20" for a in TINY]  # --max_ctx/--max_tar 20
    argv[argv.index("--min_ctx_num_qs") + 1] = "20"
    argv[argv.index("--min_tar_num_qs") + 1] = "10"
    assert reproduce.main(argv + ["--out_root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    # 30 questions per group, 0.9 local: 27; evaluation groups keep all 30
    assert "fewer than --min_ctx_num_qs + --min_tar_num_qs = 30" in err
    assert ("these groups allow --min_ctx_num_qs + --min_tar_num_qs <= 27 (the smallest training group's local "
            "questions) and --eval_num_qs <= 29 (the smallest evaluation group has 30), e.g. --min_ctx_num_qs 13 "
            "--min_tar_num_qs 14 --eval_num_qs 29") in err
    assert not (tmp_path / "r").exists()  # refused before any file is written


def test_committed_results_have_no_machine_paths():
    files = subprocess.run(["git", "ls-files", "docs", "README.md"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    texts = {f: (ROOT / f).read_text(encoding="utf-8") for f in files if f.endswith((".md", ".csv", ".json"))}
    assert any(f.startswith("docs/results/") for f in texts)
    found = {f: ABSOLUTE.findall(t) for f, t in texts.items() if ABSOLUTE.findall(t)}
    assert found == {}, "absolute machine paths in committed files (print them relative to the repository)"


def test_central_steps_flag_is_refused(capsys):
    assert reproduce.main(["--central_steps", "6"]) == 2
    assert "centralized_matched" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# --preset paper: the resolved values, pinned (nothing trains)

PAPER_VALUES = dict(
    dataset="opinionqa", emb_model="minilm", comm_round=1300, central_epochs=1300, central_mode="sequential",
    federated_eval=10, eval_freq=10, epochs=6, client_fraction=1.0, weighting="dataset_size", lr=3e-4,
    num_steps=100, min_ctx_num_qs=10, max_ctx_num_qs=100, min_tar_num_qs=10, max_tar_num_qs=100,
    episode_bounds="flags", data_split=0.9, eval_num_qs=20, eval_seed=0, eval_resample=False, metric="auto",
    split_seed=0, group_split=None, d_model=128, emb_depth=4, dim_feedforward=128, nhead=4, num_layers=6,
    dropout=0.0, bound_std=False, layer_init="independent", loss_reduction="sum", grad_clip=0.0,
    wandb="off", keep_checkpoints=3, engine="inprocess")


def test_paper_preset_resolves_to_the_papers_protocol(monkeypatch):
    monkeypatch.setenv("PLURALLLM_OPINIONQA_DIR", "../shared/data/opinionqa")
    monkeypatch.setenv("PLURALLLM_GLOBALQA_CSV", "../shared/data/globalopinionqa_sample/global_opinions_sample.csv")
    a = reproduce.parse_args(["--preset", "paper"])
    assert {k: getattr(a, k) for k in PAPER_VALUES} == PAPER_VALUES
    assert a.seeds == [0, 1, 2, 3] and a.methods == ["fedavg", "centralized", "centralized_matched"]
    assert (a.name, a.out_root, a.results_dir) == ("opinionqa_paper", Path("runs/reproduce/opinionqa_paper"),
                                                   Path("docs/results"))
    assert a.data_path == "../shared/data/opinionqa"  # as given, never made absolute
    # what each run gets: the entry point's own flags; central steps 1 (paper) or FedAvg's 6
    runs = {m: vars(reproduce.seed_args(a, 2, Path("x"), False, m)) for m in a.methods}
    assert (runs["fedavg"]["comm_round"], runs["fedavg"]["epochs"], runs["fedavg"]["seed"]) == (1300, 6, 2)
    assert "comm_round" not in runs["centralized"] and "epochs" not in runs["centralized_matched"]
    assert {m: (r["central_epochs"], r["central_steps"], r["central_mode"]) for m, r in runs.items()
            if m != "fedavg"} == {"centralized": (1300, 1, "sequential"),
                                  "centralized_matched": (1300, 6, "sequential")}

    g = reproduce.parse_args(["--preset", "paper", "--dataset", "globalqa"])
    assert (g.name, g.data_path, g.comm_round) == (
        "globalqa_sample_paper", "../shared/data/globalopinionqa_sample/global_opinions_sample.csv", 1300)
    # flags given override the preset; the released-code variant runs two methods
    v = reproduce.parse_args(["--preset", "paper", "--methods", "centralized", "fedavg", "--loss_reduction",
                             "slot_mean", "--layer_init", "clones", "--episode_bounds", "code", "--seeds", "0", "1",
                             "--name", "opinionqa_paper_code"])
    assert (v.methods, v.seeds, v.loss_reduction, v.layer_init, v.episode_bounds, v.comm_round) == (
        ["fedavg", "centralized"], [0, 1], "slot_mean", "clones", "code", 1300)
    assert v.out_root == Path("runs/reproduce/opinionqa_paper_code")


# ----------------------------------------------------------------------------------------
# centralized_matched and paths in committed outputs


# an absolute path as a word of its own: after a space, quote, backtick, '=' or '(' (a relative
# path such as ../../tmp/x holds '/tmp/' too, but not at the start of a word)
ABSOLUTE = re.compile(r"(?:^|[\s`'\"=(\[])(/(?:tmp|work|home|root|Users|mnt|var|private)/\S*)", re.M)


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.rglob("*")) if p.suffix in (".md", ".csv", ".json"))


def test_centralized_matched_runs_and_no_absolute_paths(tmp_path, capsys):
    root, results = tmp_path / "runs", tmp_path / "results"
    assert TINY[-3:] == ["--seeds", "0", "1"]
    argv = TINY[:-3] + ["--seeds", "0", "--methods", "centralized_matched", "fedavg", "centralized",
                        "--out_root", str(root), "--results_dir", str(results), "--name", "tiny3"]
    assert reproduce.main(argv) == 0
    assert "plan: 3 fresh" in capsys.readouterr().out
    cfg = json.loads((root / "centralized_matched_s0" / "config.json").read_text())
    assert (cfg["method"], cfg["central_steps"]) == ("centralized", 2)   # = --epochs 2
    steps = {m: json.loads((root / f"{m}_s0" / "summary.json").read_text())["total_grad_steps"]
             for m in ("fedavg", "centralized", "centralized_matched")}
    # 3 training groups (60% of 5): FedAvg 3 clients x 2 local steps per round = matched 3 x 2; centralized 3
    assert steps == {"fedavg": 4 * 6, "centralized": 4 * 3, "centralized_matched": 4 * 6}
    report = (results / "tiny3.md").read_text()
    assert "| Centralized, compute-matched | 1 | 1 | 0 | 0 |" in report
    assert "| `centralized_matched_s0` | centralized_matched | 0 |" in report
    rows = list(csv.DictReader((results / "tiny3_table.csv").open()))
    assert {r["method"] for r in rows if r["kind"] == "metric"} == {"fedavg", "centralized", "centralized_matched"}
    # the default convergence definition, recomputed from losses.jsonl, is the run loop's own round
    per_seed = {(r["metric"], r["method"]): r["per_seed"] for r in rows}
    for m in ("fedavg", "centralized", "centralized_matched"):
        assert per_seed[("conv_loss_095", m)] == per_seed[("convergence_round", m)] != "0:"

    # no machine path in anything committed or copied: reports, tables, the manifest
    text = _all_text(results) + (root / "reproduce.json").read_text()
    assert str(ROOT) not in text and not ABSOLUTE.findall(text), ABSOLUTE.findall(text)
    manifest = json.loads((root / "reproduce.json").read_text())
    assert manifest["methods"] == ["fedavg", "centralized", "centralized_matched"]
    assert "--out_root ../" in manifest["command"]   # relative to the repository root

    # reuse: the matched folder is recognised; a plain centralized run in its place is refused
    assert reproduce.main(argv) == 0
    assert "plan: 3 reuse" in capsys.readouterr().out
    shutil.rmtree(root / "centralized_matched_s0")
    shutil.copytree(root / "centralized_s0", root / "centralized_matched_s0")
    assert reproduce.main(argv) == 2
    assert "holds a 'centralized' run, not 'centralized_matched'" in capsys.readouterr().err


def test_report_shows_data_source_relative(fake_runs, tmp_path):
    for cfg_path in fake_runs.glob("*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg["data"] = {"source": str(ROOT.parent / "shared" / "data" / "x.csv"), "source_hash": "abc"}
        cfg["environment"] = {"argv": ["main_fl.py", "--data_path", str(ROOT.parent / "shared" / "data" / "x.csv"),
                                       f"--out_dir={tmp_path}/r"]}
        cfg_path.write_text(json.dumps(cfg))
    shutil.copytree(fake_runs / "fedavg_s0", fake_runs / "fedavg_s0_again")  # its warning names folders
    out = tmp_path / "results"
    assert reproduce.main(["--report_only", "--runs", str(fake_runs / "*"), "--name", "fake",
                          "--results_dir", str(out)]) == 0
    text = _all_text(out)
    assert "source `../shared/data/x.csv`" in text and "--data_path ../shared/data/x.csv" in text
    assert "second finished fedavg run of seed 0" in text
    assert "centralized_matched" not in text.split("## Runs")[1].split("## Results")[0]  # only methods found
    assert str(ROOT) not in text and not ABSOLUTE.findall(text), ABSOLUTE.findall(text)


# ----------------------------------------------------------------------------------------
# the smoke preset, as CI runs it: real GlobalOpinionQA sample, MiniLM, 2 seeds


def test_smoke_preset_end_to_end(globalqa_csv, tmp_path):
    # The embedding cache is the one the command itself would use ($PLURALLLM_CACHE_DIR in CI,
    # shared with the other real-data tests; else the user's): embedding the sample is most of
    # the preset's time on a cold cache, a few seconds of it on a warm one.
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    root = tmp_path / "smoke"
    cmd = [sys.executable, "scripts/reproduce.py", "--preset", "smoke", "--data_path", str(globalqa_csv),
           "--out_root", str(root)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = root / "results"
    for f in ("smoke.md", "smoke_table.md", "smoke_table.csv", "smoke_fig2_loss_vs_round.png",
              "smoke_fig3_predictions.png", "smoke_fig4_alignment_vs_round.png", "smoke_fig5_fi_vs_round.png",
              "smoke_fig2c_loss_vs_grad_steps.png", "smoke_fig4c_alignment_vs_grad_steps.png"):
        assert (res / f).stat().st_size > 0, f
    summaries = {(m, s): json.loads((root / f"{m}_s{s}" / "summary.json").read_text())
                 for m in ("fedavg", "centralized", "centralized_matched") for s in (0, 1)}
    rows = {(r["kind"], r["metric"], r["method"]): r for r in csv.DictReader((res / "smoke_table.csv").open())}
    for m in ("fedavg", "centralized", "centralized_matched"):
        for key in ("final_eval_alignment_score", "convergence_round", "final_eval_fi", "total_grad_steps"):
            vals = [summaries[(m, s)][key] for s in (0, 1)]
            assert float(rows[("metric", key, m)]["mean"]) == pytest.approx(sum(vals) / 2, rel=1e-12)
            assert int(rows[("metric", key, m)]["n"]) == 2
    fed = sum(summaries[("fedavg", s)]["final_eval_alignment_score"] for s in (0, 1)) / 2
    cen = sum(summaries[("centralized", s)]["final_eval_alignment_score"] for s in (0, 1)) / 2
    gain = rows[("headline_from_means", "alignment_gain_pct", "fedavg_vs_centralized")]
    assert float(gain["mean"]) == pytest.approx(100 * (fed - cen) / cen, rel=1e-9)
    report = (res / "smoke.md").read_text()
    assert "python scripts/reproduce.py --preset smoke" in report
    mat = sum(summaries[("centralized_matched", s)]["final_eval_alignment_score"] for s in (0, 1)) / 2
    assert (f"Final mean evaluation alignment: FedAvg {fed:.4f}, Centralized {cen:.4f}, Centralized, "
            f"compute-matched {mat:.4f}.") in report
    assert "## Which of the paper's claims hold on this data" in report
    assert "8 training clients / 6 unseen evaluation groups" in report
    # the compute-matched baseline takes FedAvg's gradient steps per round (2 local steps x 8 clients)
    assert [summaries[(m, 0)]["total_grad_steps"] for m in ("fedavg", "centralized_matched", "centralized")] == [
        4 * 16, 4 * 16, 4 * 8]
    # a second call reuses all six runs
    again = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "plan: 6 reuse" in again.stdout


def test_a_diverged_run_is_named_in_the_notes_and_kept_out_of_the_statistics(tmp_path):
    from reporting import runs
    folder = tmp_path / "fedavg_s0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": "fedavg", "seed": 0}))
    (folder / "failed.json").write_text(json.dumps({"reason": "training diverged at round 7", "round": 7}))
    assert runs.load_run(folder).status == "failed"
    rs = runs.collect([folder])
    assert rs.by_method["fedavg"] == {} and rs.interrupted == []
    assert any("failed (training diverged at round 7); not in the statistics" in w for w in rs.warnings)


def test_group_splits_may_differ_between_seeds_but_not_within_one(tmp_path):
    from reporting.compare import Variant, consistency_warnings
    from reporting.runs import Run

    def run(seed, groups):
        return Run(tmp_path, "finished", {"seed": seed, "eval_groups": groups})
    base = Variant("a", [], runs={0: run(0, ["x"]), 1: run(1, ["y"])})
    same = Variant("b", [], runs={0: run(0, ["x"]), 1: run(1, ["y"])})
    assert consistency_warnings([base, same]) == []  # a seeded split: seeds differ by design
    other = Variant("c", [], runs={0: run(0, ["z"])})
    assert consistency_warnings([base, other]) == ["the runs of seed 0 disagree on eval_groups: ['[\"x\"]', '[\"z\"]']"]


def test_a_jobs_worker_argv_is_not_shown_as_the_runs_command():
    from reporting.runs import Run, run_commands
    worker = Run(path=None, status="finished", config={"environment": {"argv": ["/x/.queue_worktree/reporting/jobs.py"]}})
    user = Run(path=None, status="finished", config={"environment": {"argv": ["main_fl.py", "--seed", "1"]}})
    assert run_commands([worker, user, worker]) == ["python main_fl.py --seed 1"]
    assert run_commands([worker]) == []


def test_the_machine_line_names_every_cpu_and_commit_of_the_runs():
    from types import SimpleNamespace

    from reporting.sections import machine_line

    def run(cpu, commit, dirty=False):
        env = {"cpu_model": cpu, "cpu_count": 2, "torch": "2.13.0+cpu", "git_commit": commit, "git_dirty": dirty}
        return SimpleNamespace(config={"device_resolved": "cpu", "environment": env})

    same = machine_line([run("Xeon", "a" * 40), run("Xeon", "a" * 40)], {"threads": 1})
    assert same == ("- **Machine**: device `cpu`, CPU `Xeon`, `2` CPU cores, 1 torch thread(s) per process; "
                    "torch `2.13.0+cpu`; git commit `aaaaaaaaaa`.")
    mixed = machine_line([run("EPYC", "b" * 40), run("Xeon", "a" * 40, True), run("Xeon", "a" * 40, True)], None)
    assert "CPU `EPYC` (1 run), `Xeon` (2 runs)" in mixed
    assert "git commit `aaaaaaaaaa (dirty tree)` (2 runs), `bbbbbbbbbb` (1 run)." in mixed
