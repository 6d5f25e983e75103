"""The convergence round under the README's four definitions (loss progress at 0.95: summary.json's)."""
from __future__ import annotations

from dataclasses import dataclass

from utils.metrics import LOSS_WINDOW_ROUNDS, curve_convergence_round

from .runs import Run

GAIN_WINDOW_EVALS = 3


def loss_window(run: Run) -> int:
    """The run's own smoothing window (summary.json), else the run loop's default."""
    conv = (run.summary or {}).get("convergence") or {}
    return int(conv.get("window_rounds") or LOSS_WINDOW_ROUNDS)


def loss_progress_round(run: Run, threshold: float = 0.95) -> int | None:
    recs = [r for r in run.losses if r.get("train_loss") is not None]
    return curve_convergence_round([r["round"] for r in recs], [r["train_loss"] for r in recs],
                                   threshold=threshold, window=loss_window(run))


def alignment_gain_round(run: Run, threshold: float = 0.95, window: int = GAIN_WINDOW_EVALS) -> int | None:
    recs = [r for r in run.metrics if r.get("eval_alignment_score") is not None]
    return curve_convergence_round([r["round"] for r in recs], [-r["eval_alignment_score"] for r in recs],
                                   threshold=threshold, window=window)


@dataclass(frozen=True)
class Definition:
    key: str          # column / CSV name
    label: str
    kind: str         # loss | gain
    threshold: float

    def round_of(self, run: Run) -> int | None:
        fn = loss_progress_round if self.kind == "loss" else alignment_gain_round
        return fn(run, self.threshold)


DEFINITIONS = (
    Definition("conv_loss_090", "loss progress ≥ 90%", "loss", 0.90),
    Definition("conv_loss_095", "loss progress ≥ 95% (default)", "loss", 0.95),
    Definition("conv_loss_099", "loss progress ≥ 99%", "loss", 0.99),
    Definition("conv_gain_095", "eval alignment gain ≥ 95%", "gain", 0.95),
)
