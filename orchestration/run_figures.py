"""loss.png (the training loss, its smoothed curve and the convergence round) and alignment.png (mean and
worst-group alignment, fairness index) inside a run folder, from its logs alone, at the end of a run.
matplotlib is imported inside the call and drawn on a bare Figure (no pyplot, no global backend), so a
training process pays for it once at the very end and a headless machine needs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from utils.metrics import LOSS_WINDOW_ROUNDS, curve_convergence_round, odd_window, smooth_curve
from utils.run_folder import read_log, record_value


@dataclass
class RunLogs:
    path: Path
    metrics: list[dict] = field(default_factory=list)   # one record per evaluation
    losses: list[dict] = field(default_factory=list)    # one record per round


def write_run_figures(run_path: Path) -> list[Path]:
    """Write loss.png and alignment.png into `run_path`; returns the files written (none without data)."""
    from matplotlib.figure import Figure

    run_path = Path(run_path)
    run = RunLogs(run_path, read_log(run_path, "metrics"), read_log(run_path, "losses"))
    written = []
    for draw, name in ((_loss_figure, "loss.png"), (_alignment_figure, "alignment.png")):
        fig = Figure(figsize=(7, 4.2) if name == "loss.png" else (11, 4.2))
        if draw(fig, run):
            fig.tight_layout()
            fig.savefig(run_path / name, dpi=100)
            written.append(run_path / name)
    return written


def _marker(n: int) -> str | None:
    return "o" if n < 3 else None  # a one- or two-record curve is otherwise invisible


def _loss_figure(fig, run: RunLogs) -> bool:
    recs = [r for r in run.losses if r.get("train_loss") is not None]
    if not recs:
        return False
    ax = fig.add_subplot()
    rounds, loss = [r["round"] for r in recs], [r["train_loss"] for r in recs]
    window = odd_window(LOSS_WINDOW_ROUNDS, len(loss))
    ax.plot(rounds, loss, color="0.6", lw=0.8, marker=_marker(len(loss)), label="per round")
    ax.plot(rounds, smooth_curve(loss, smoothing="centred", window=window), color="tab:blue", lw=1.8,
            label=f"centred {window}-round moving average")
    conv = curve_convergence_round(rounds, loss, threshold=0.95, window=LOSS_WINDOW_ROUNDS)
    if conv is not None:
        ax.axvline(conv, color="tab:red", ls=":", lw=1.2, label=f"convergence round {conv} (95% of the progress)")
    ax.set_xlabel("Round")
    ax.set_ylabel("Training loss (NLL)")
    ax.set_title(f"{run.path.name}: training loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return True


_ALIGNMENT_CURVES = (("eval_alignment_score", "mean, evaluation groups", "tab:blue", "-"),
                     ("train_alignment_score", "mean, training groups (held-out questions)", "tab:orange", "-"),
                     ("eval_worst_alignment", "worst evaluation group", "tab:blue", "--"))
_FI_CURVES = (("eval_fi", "evaluation groups", "tab:blue"), ("train_fi", "training groups", "tab:orange"))


def _curve(run: RunLogs, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], v) for r in run.metrics if (v := record_value(r, key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _alignment_figure(fig, run: RunLogs) -> bool:
    if not run.metrics:
        return False
    left, right = fig.subplots(1, 2)
    drawn = False
    for key, label, color, ls in _ALIGNMENT_CURVES:
        x, y = _curve(run, key)
        if y:
            left.plot(x, y, color=color, ls=ls, marker=_marker(len(y)), label=label)
            drawn = True
    for key, label, color in _FI_CURVES:
        x, y = _curve(run, key)
        if y:
            right.plot(x, y, color=color, marker=_marker(len(y)), label=label)
    if not drawn:
        return False
    left.set_ylabel("Alignment score")
    right.set_ylabel("Fairness index 1/(1+CoV²)")
    _fi_axis(right)
    for ax, what in ((left, "alignment"), (right, "fairness index")):
        ax.set_xlabel("Round")
        ax.set_title(f"{run.path.name}: {what}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return True


def _fi_axis(ax) -> None:
    """FI sits near 1: show at least 0.01 of range below 1 and 4 decimals, never 1e-7 wiggles."""
    from matplotlib.ticker import FormatStrFormatter
    lo, hi = ax.get_ylim()
    if hi - lo < 0.01:
        hi = min(1.0, (lo + hi) / 2 + 0.005)
        ax.set_ylim(hi - 0.01, hi)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.4f"))
