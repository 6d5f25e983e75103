"""The no-model baselines of a configuration, before training anything: with main_fl.py's flags,
how many evaluation targets are seen (some training group trains on them), and the uniform and
consensus predictors' alignment on the evaluation groups and the training groups' held-out questions.

    python scripts/baselines.py --dataset opinionqa --emb_model minilm --question_split 0.1
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federated.fedavg import make_clients  # noqa: E402
from orchestration.experiment import run_and_data  # noqa: E402
from training.diagnostics import seen_unseen  # noqa: E402
from training.evaluation import GroupEval, group_stats  # noqa: E402
from training.reference import BASELINES, QuestionReference  # noqa: E402
from utils.errors import exit_on_error  # noqa: E402


def baseline_table(data, run) -> list[str]:
    metric = run.client.metric
    train, evals = make_clients(data, run.client, "cpu")
    ref = QuestionReference.from_groups(c.local for c in train.values())
    lines = []
    for kind in BASELINES:
        for role, clients in (("eval", evals), ("train", train)):
            scored = {}
            for name, c in clients.items():
                _, tgt, tgt_q = c.eval_questions(0)
                if len(tgt_q):
                    scored[name] = GroupEval(name, ref.distances(kind, tgt, tgt_q, metric), tgt.qkeys[tgt_q])
            stats, parts = group_stats(scored), seen_unseen(role, scored, ref)
            n_seen, n_unseen = parts[f"{role}_questions_seen"], parts[f"{role}_questions_unseen"]
            fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"{kind:9s} {role:5s} groups: mean {fmt(stats['alignment_score'])}, worst "
                         f"{fmt(stats['worst'])}, seen {fmt(parts[f'{role}_alignment_seen'])} ({n_seen} q), "
                         f"unseen {fmt(parts[f'{role}_alignment_unseen'])} ({n_unseen} q)")
    return [f"metric {metric}; {len(train)} training and {len(evals)} evaluation groups", *lines]


def main(argv=None) -> int:
    def table() -> None:
        run, data = run_and_data(argv)
        print("\n".join(baseline_table(data, run)))
    return exit_on_error(table)


if __name__ == "__main__":
    sys.exit(main())
