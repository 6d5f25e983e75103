"""The per-group alignment table printed at the end of a run."""

from __future__ import annotations

import math
from collections.abc import Mapping

_VALUE_WIDTH = 9  # fits "Alignment" and "-123.4567"


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _section(title: str, scores: Mapping[str, float], cov: float | None, fi: float | None) -> list[tuple[str, str]]:
    rows = [(title, ""), *((f"  {group}", _fmt(score)) for group, score in scores.items())]
    # Unweighted over groups; the run's headline mean alignment weights questions (method.md §7).
    vals = [float(v) for v in scores.values() if v is not None]
    rows += [("  mean of groups", _fmt(sum(vals) / len(vals) if vals else None)),
             ("  worst group", _fmt(min(vals, default=None))), ("  CoV", _fmt(cov)), ("  FI", _fmt(fi))]
    return rows


def format_group_table(eval_scores: Mapping[str, float], train_scores: Mapping[str, float] | None,
                       eval_cov: float | None, eval_fi: float | None,
                       train_cov: float | None = None, train_fi: float | None = None,
                       title: str = "") -> str:
    """Per-group scores with their unweighted mean, the worst group, CoV and FI, to 4 decimals, in the
    dicts' order (the title carries the question-weighted mean); `train_scores` None: eval only."""
    rows = _section("Eval groups (unseen)", eval_scores, eval_cov, eval_fi)
    if train_scores is not None:
        rows += _section("Train groups (held-out questions)", train_scores, train_cov, train_fi)
    name_width = max(len("Group"), *(len(name) for name, _ in rows))
    lines = [title] if title else []
    lines.append(f"{'Group':<{name_width}}  {'Alignment':>{_VALUE_WIDTH}}")
    lines.append(f"{'-' * name_width}  {'-' * _VALUE_WIDTH}")
    lines += [f"{name:<{name_width}}  {value:>{_VALUE_WIDTH}}".rstrip() for name, value in rows]
    return "\n".join(lines)
