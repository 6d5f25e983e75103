"""The paper's figures from run folders; loss curves smoothed per seed as the convergence round is
defined, so its dotted vertical line sits on the drawn curve."""
from __future__ import annotations

import textwrap
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from utils.metrics import smooth_curve
from utils.run_folder import record_value

from .convergence import loss_window
from .runs import METHOD_LABELS, Run, RunSet

COLORS = {"fedavg": "tab:blue", "centralized": "tab:orange", "centralized_matched": "tab:green"}
BAND = "band: min–max over seeds; line: mean over seeds"
ROUNDS = "Round (FedAvg: communication round; centralized: epoch)"
STEPS = "Gradient steps (cumulative, all clients)"


def smoothing_window(run: Run, length: int) -> int:
    w = max(1, min(loss_window(run), length))
    return w if w % 2 else w - 1


def stack(runs: dict[int, Run], points) -> np.ndarray:
    """points(run) -> [(round, value, ...)] of every run that has any, as [runs, T, k], cut to the shortest."""
    series = [s for _, r in sorted(runs.items()) if (s := points(r))]
    if not series:
        return np.zeros((0, 0, 3))
    t = min(len(s) for s in series)
    return np.array([s[:t] for s in series], dtype=float)


def loss_matrix(runs: dict[int, Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(rounds [T], smoothed loss [S, T], cumulative gradient steps [S, T], window), cut to the shortest run."""
    a = stack(runs, lambda r: [(rec["round"], rec["train_loss"], rec.get("grad_steps", np.nan)) for rec in r.losses])
    if not len(a):
        return np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0)), 1
    w = smoothing_window(next(r for _, r in sorted(runs.items()) if r.losses), a.shape[1])
    loss = np.stack([smooth_curve(list(y), smoothing="centred", window=w) for y in a[..., 1]])
    return a[0, :, 0], loss, a[..., 2], w


def eval_matrix(runs: dict[int, Run], key: str, x_key: str = "grad_steps") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds [E], values [S, E], x_key [S, E]) of an evaluation metric, cut to the shortest run."""
    a = stack(runs, lambda r: [(rec["round"], v, rec.get(x_key, np.nan)) for rec in r.metrics
                               if (v := record_value(rec, key)) is not None])
    return (a[0, :, 0] if len(a) else np.zeros(0)), a[..., 1], a[..., 2]


def band(ax, x, ys, color, name: str, lw: float = 1.8, alpha: float = 0.2) -> None:
    """The mean over runs as a line labelled with their count, their min–max as a band (alpha 0: none)."""
    ax.plot(x, ys.mean(0), color=color, lw=lw, label=f"{name} (n={ys.shape[0]})")
    if alpha and ys.shape[0] > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=alpha, lw=0)


def _band(ax, x, ys, method):
    band(ax, x, ys, COLORS[method], METHOD_LABELS[method])


def _eval_bands(ax, runset: RunSet, key: str) -> bool:
    """Each method's band of an evaluation metric against rounds; whether any was drawn."""
    drawn = False
    for m in runset.methods:
        rounds, vals, _ = eval_matrix(runset.finished(m), key)
        if vals.size:
            _band(ax, rounds, vals, m)
            drawn = True
    return drawn


def _conv_lines(ax, runset: RunSet, key: str):
    for m in runset.methods:
        vals = [v for r in runset.finished(m).values() if (v := r.value(key)) is not None]
        if vals:
            ax.axvline(float(np.mean(vals)), color=COLORS[m], ls=":", lw=1.2)


def plain_y(ax, min_span: float, top: float | None = None, decimals: int = 3) -> None:
    """Readable y ticks: no offset text (it collided with the title), fixed decimals, and at least
    `min_span` of y range, so differences far below what the data resolves do not fill the axis."""
    from matplotlib.ticker import FormatStrFormatter
    lo, hi = ax.get_ylim()
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if top is not None and hi > top:
            lo, hi = top - min_span, top
        ax.set_ylim(lo, hi)
    ax.yaxis.set_major_formatter(FormatStrFormatter(f"%.{decimals}f"))


def _save(fig, path: Path, note: str = BAND) -> Path:
    fig.text(0.01, 0.005, note, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish_pair(fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def finish(fig, ax, title, xlabel, ylabel, path: Path, note: str = BAND, legend_size: int = 9) -> Path:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    return _save(fig, path, note)


def fig_loss(runset: RunSet, path: Path, x_axis: str = "round") -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn, windows = False, set()
    for m in runset.methods:
        rounds, loss, steps, window = loss_matrix(runset.finished(m))
        if loss.size == 0:
            continue
        windows.add(window)
        x = rounds if x_axis == "round" else np.nanmean(steps, 0)
        _band(ax, x, loss, m)
        drawn = True
    if not drawn:
        return plt.close(fig)  # nothing to draw: no file
    rounds = x_axis == "round"
    _conv_lines(ax, runset, "convergence_round" if rounds else "convergence_grad_steps")
    title = "Training loss vs " + ("round (paper Fig. 2)" if rounds else "gradient steps (compute-normalised Fig. 2)")
    smooth = "/".join(str(w) for w in sorted(windows))
    return finish(fig, ax, title, ROUNDS if rounds else STEPS, f"Training loss (NLL; centred {smooth}-round moving "
                  "average)", path, BAND + "; dotted: mean convergence " + ("round" if rounds else "gradient steps"))


def fig_eval(runset: RunSet, path: Path, key: str = "eval_alignment_score", x_axis: str = "round") -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for m in runset.methods:
        rounds, vals, steps = eval_matrix(runset.finished(m), key, "comm_bytes_total" if x_axis == "bytes" else "grad_steps")
        if vals.size == 0 or (x_axis == "bytes" and not np.isfinite(steps).all()):
            continue  # a run that counted no bytes (centralized; records from before counting)
        x = rounds if x_axis == "round" else np.nanmean(steps, 0) / (1e6 if x_axis == "bytes" else 1)
        _band(ax, x, vals, m)
        drawn = True
    if not drawn:
        return plt.close(fig)  # nothing to draw: no file
    _baseline_lines(ax, runset)
    xlabel, title = {"round": (ROUNDS, "round (paper Fig. 4)"),
                     "steps": (STEPS, "gradient steps (compute-normalised Fig. 4)"),
                     "bytes": ("Communication (cumulative MB, down + up)", "communication")}[x_axis]
    plain_y(ax, 0.02)
    return finish(fig, ax, f"Mean evaluation alignment vs {title}", xlabel, "Mean alignment score, unseen eval groups",
                  path)


def _baseline_lines(ax, runset: RunSet, key: str = "eval_alignment_score") -> None:
    """The no-model baselines of the runs (training/reference.py) as horizontal lines, mean over runs."""
    for kind, color, ls, label in (("consensus", "0.15", "--", "consensus lookup (no model)"),
                                   ("uniform", "0.55", ":", "uniform predictor (no model)")):
        vals = [v for r in runset.all_finished() if (v := r.baseline(kind, key)) is not None]
        if vals:
            ax.axhline(float(np.mean(vals)), color=color, ls=ls, lw=1.2, label=label)


def _panel(ax, xlabel: str, title: str | None = None) -> None:
    """One panel of a two-panel figure: title, x label, grid and legend."""
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def fig_unseen(runset: RunSet, path: Path) -> Path | None:
    """Alignment on seen (left) and unseen (right) evaluation questions vs round, with the baselines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    for ax, part in zip(axes, ("seen", "unseen")):
        drawn |= _eval_bands(ax, runset, f"eval_alignment_{part}")
        _baseline_lines(ax, runset, f"eval_alignment_{part}")
        _panel(ax, ROUNDS, f"{part} questions (some training group trains on them)" if part == "seen" else
               "unseen questions (no training group trains on them)")
        plain_y(ax, 0.02)
    if not drawn:
        return plt.close(fig)  # nothing to draw: no file
    axes[0].set_ylabel("Mean alignment score, unseen eval groups")
    return _finish_pair(fig, "Evaluation alignment on seen and unseen questions", path)


def fig_specificity(runset: RunSet, path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if not _eval_bands(ax, runset, "eval_group_specificity"):
        return plt.close(fig)  # nothing to draw: no file
    ax.axhline(0.0, color="0.3", lw=0.8)
    return finish(fig, ax, "Group specificity vs round (0: the model ignores whose answers it is given)", ROUNDS,
                  "Alignment, own − another group's context", path)


def fig_fi(runset: RunSet, path: Path) -> Path | None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), sharex=True)
    drawn = False
    for ax, key, what in ((axes[0], "eval_fi", "unseen evaluation groups"),
                          (axes[1], "train_fi", "training groups (held-out questions)")):
        drawn |= _eval_bands(ax, runset, key)
        ax.set_ylabel("Fairness index 1/(1+CoV²)")
        _panel(ax, ROUNDS, f"FI over {what}")
        plain_y(ax, 0.01, top=1.0, decimals=4)  # FI sits near 1: 1e-7 differences are not worth an axis
    if not drawn:
        return plt.close(fig)  # nothing to draw: no file
    return _finish_pair(fig, "Fairness index vs round (paper Fig. 5)", path)


def fig_worst(runset: RunSet, path: Path) -> Path | None:
    """Worst-group evaluation alignment against rounds (left) and gradient steps (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    drawn = False
    for m in runset.methods:
        rounds, vals, steps = eval_matrix(runset.finished(m), "eval_worst_alignment")
        if vals.size:
            _band(axes[0], rounds, vals, m)
            _band(axes[1], np.nanmean(steps, 0), vals, m)
            drawn = True
    if not drawn:
        return plt.close(fig)  # nothing to draw: no file
    _panel(axes[0], ROUNDS)
    _panel(axes[1], STEPS)
    axes[0].set_ylabel("Lowest group alignment, unseen eval groups")
    plain_y(axes[0], 0.02)
    return _finish_pair(fig, "Worst-group evaluation alignment", path)


def fig_predictions(pred: dict, path: Path) -> Path:
    """Fig. 3: one question, two evaluation groups; ground truth vs FedAvg vs centralized."""
    groups = pred["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.6), sharey=True)
    axes = np.atleast_1d(axes)
    options = pred["options"]
    x = np.arange(len(options))
    width = 0.27
    series = (("truth", "Ground truth", "0.3"), ("fedavg", "FedAvg", COLORS["fedavg"]),
              ("centralized", "Centralized", COLORS["centralized"]))
    for ax, g in zip(axes, groups):
        for i, (key, label, color) in enumerate(series):
            vals = pred["dists"][g].get(key)
            if vals is None:
                continue
            score = "" if key == "truth" else f" (AS {pred['scores'][g][key]:.3f})"
            ax.bar(x + (i - 1) * width, vals, width, label=label + score, color=color)
        ax.set_title(g, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(["\n".join(textwrap.wrap(o, 14)) for o in options], fontsize=7)
        ax.set_ylabel("Probability")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    q = "\n".join(textwrap.wrap(pred["question"], 110)[:3])
    fig.suptitle(f"Predicted vs true answer distributions (paper Fig. 3), seed {pred['seed']}, "
                 f"final weights\nQ{pred['qkey']}: {q}", fontsize=9)
    fig.text(0.01, 0.005, f"AS = 1 − {pred['metric_label']} on this question; the question is a target "
             "(not in the group's evaluation context) for both groups", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# (key, file name after "<stem>_", the report's caption, figure(runset, path); None: Fig. 3, from predictions)
FIGURES = (
    ("loss_vs_round", "fig2_loss_vs_round", "Training loss vs round (paper Fig. 2)", fig_loss),
    ("alignment_vs_round", "fig4_alignment_vs_round", "Mean evaluation alignment vs round (paper Fig. 4)", fig_eval),
    ("fi_vs_round", "fig5_fi_vs_round", "Fairness index vs round (paper Fig. 5)", fig_fi),
    ("predictions", "fig3_predictions",
     "Predicted vs true distributions, one question, two evaluation groups (paper Fig. 3)", None),
    ("loss_vs_steps", "fig2c_loss_vs_grad_steps", "Compute-normalised Fig. 2: training loss vs gradient steps",
     partial(fig_loss, x_axis="steps")),
    ("alignment_vs_steps", "fig4c_alignment_vs_grad_steps",
     "Compute-normalised Fig. 4: mean evaluation alignment vs gradient steps", partial(fig_eval, x_axis="steps")),
    ("worst_alignment", "fig6_worst_alignment", "Worst-group evaluation alignment vs round and vs gradient steps",
     fig_worst),
    ("alignment_vs_bytes", "fig4d_alignment_vs_comm", "Mean evaluation alignment vs cumulative communication "
     "(FedAvg; the centralized baseline instead pools the data once, see the table)", partial(fig_eval, x_axis="bytes")),
    ("unseen_vs_round", "fig7_seen_unseen_vs_round", "Evaluation alignment on seen and on unseen questions vs round",
     fig_unseen),
    ("specificity_vs_round", "fig8_specificity_vs_round",
     "Group specificity vs round: own minus another group's context answers", fig_specificity),
)


def make_figures(runset: RunSet, out_dir: Path, stem: str, pred: dict | None = None) -> dict[str, Path]:
    """The figures drawn, by key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for key, name, _, draw in FIGURES:
        path = out_dir / f"{stem}_{name}.png"
        made[key] = draw(runset, path) if draw else fig_predictions(pred, path) if pred is not None else None
    return {k: v for k, v in made.items() if v is not None}
