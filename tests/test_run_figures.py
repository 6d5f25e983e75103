"""orchestration/run_figures.py: loss.png and alignment.png inside one run folder, from its logs alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from orchestration.run_figures import RunLogs, _alignment_figure, _loss_figure, write_run_figures

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _step_losses(rounds: int = 60) -> list[dict]:
    # loss 1 for rounds 1-30, then 0: the centred 21-round average first falls to 1/21 (progress
    # 20/21 ≥ 0.95) at round 40, whose window [30, 50] holds a single 1
    return [{"round": r, "train_loss": 1.0 if r <= 30 else 0.0, "grad_steps": 6 * r} for r in range(1, rounds + 1)]


def _metrics(rounds=(0, 10, 20)) -> list[dict]:
    # no eval_worst_alignment key (an older folder): the worst group comes from the group scores
    return [{"round": r, "eval_alignment_score": 0.7 + r / 100, "train_alignment_score": 0.6 + r / 100,
             "eval_group_scores": {"a": 0.6 + r / 100, "b": 0.8 + r / 100}, "eval_fi": 0.9999999,
             "train_fi": 0.99999995} for r in rounds]


def test_write_run_figures_from_logs_only(tmp_path):
    _write(tmp_path / "losses.jsonl", _step_losses())
    _write(tmp_path / "metrics.jsonl", _metrics())
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"round": 30, "eval_al')          # a run killed mid-append: the cut line is dropped
    written = write_run_figures(tmp_path)           # no config.json, no summary.json needed
    assert written == [tmp_path / "loss.png", tmp_path / "alignment.png"]
    h, w, _ = imread(tmp_path / "loss.png").shape
    assert (w, h) == (700, 420)
    h, w, _ = imread(tmp_path / "alignment.png").shape
    assert (w, h) == (1100, 420)


def test_loss_figure_shows_the_convergence_smoothing_and_round(tmp_path):
    fig = Figure()
    assert _loss_figure(fig, RunLogs(tmp_path, losses=_step_losses()))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["per round", "centred 21-round moving average", "convergence round 40 (95% of the progress)"]
    # a short run: the window shrinks to the odd length that fits, and says so
    fig = Figure()
    assert _loss_figure(fig, RunLogs(tmp_path, losses=_step_losses()[:4]))
    assert fig.axes[0].get_legend().get_texts()[1].get_text() == "centred 3-round moving average"


def test_alignment_figure_curves_and_fi_axis(tmp_path):
    fig = Figure()
    assert _alignment_figure(fig, RunLogs(tmp_path, metrics=_metrics()))
    left, right = fig.axes
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in left.get_lines()}
    assert lines["worst evaluation group"] == pytest.approx([0.6, 0.7, 0.8])   # min of a, b
    assert lines["mean, evaluation groups"] == pytest.approx([0.7, 0.8, 0.9])
    assert [ln.get_label() for ln in right.get_lines()] == ["evaluation groups", "training groups"]
    lo, hi = right.get_ylim()  # FI within 1e-7 of 1: a 0.01 range ending at 1, not a 1e-7 zoom
    assert (lo, hi) == (pytest.approx(0.99), pytest.approx(1.0))
    assert right.yaxis.get_major_formatter()(0.995) == "0.9950"


def test_one_record_and_empty_runs(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    _write(one / "losses.jsonl", _step_losses(1))
    _write(one / "metrics.jsonl", _metrics((0,)))
    assert [p.name for p in write_run_figures(one)] == ["loss.png", "alignment.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_run_figures(empty) == [] and not list(empty.iterdir())


def test_import_does_not_load_matplotlib():
    code = "import sys, orchestration.run_figures; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
