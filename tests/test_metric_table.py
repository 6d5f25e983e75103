"""utils.distances.METRICS is the one source of the metrics: the flag's choices, --metric auto,
the ordinal checks, every scoring path and the labels read it. A metric added to the table
(monkeypatched here) is offered, scored with the right ordinals and labelled, with no other edit."""
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_loaders.schema import DataError, GroupData
from inference import GroupPredictor
from inference.items import Question
from inference.pretrained import model_card
from models.gpo import GPO, GPOConfig
from orchestration.cli import build_parser
from orchestration.config import resolve_metric, run_config
from orchestration.experiment import validate
from reporting.predictions import predict_question
from training.evaluation import score_group, target_ordinals
from training.reference import QuestionReference
from utils.distances import DEFAULT_METRIC, METRICS, Metric, MetricError, metric_label, score_questions, segment_ids

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("utils", "models", "data_loaders", "training", "federated", "flower_app", "orchestration",
           "inference", "reporting")


def mean_ordinal_gap(pred, true, offsets, ordinals):
    """A toy ordinal metric: |E_pred[o] − E_true[o]| / (max o − min o) per question."""
    seg, q = segment_ids(offsets), len(offsets) - 1
    o = ordinals.double()
    per_q = lambda v: torch.zeros(q, dtype=torch.float64).index_add_(0, seg, v.double())  # noqa: E731
    gap = per_q(pred * o) / per_q(pred) - per_q(true * o) / per_q(true)
    hi = torch.full((q,), -torch.inf, dtype=torch.float64).scatter_reduce(0, seg, o, "amax")
    lo = torch.full((q,), torch.inf, dtype=torch.float64).scatter_reduce(0, seg, o, "amin")
    return gap.abs() / (hi - lo)


@pytest.fixture
def gap_metric(monkeypatch):
    """METRICS with "gap" added; the ordinals each scoring received, in order."""
    seen = []

    def recorded(pred, true, offsets, ordinals):
        seen.append(ordinals.tolist())
        return mean_ordinal_gap(pred, true, offsets, ordinals)

    monkeypatch.setitem(METRICS, "gap", Metric("gap", recorded, True, "mean ordinal gap"))
    return seen


# q0: ordinals 1, 2, 3, means 1.5 and 2.5, span 2 -> 0.5; q1: ordinals 0, 4, means 0 and 3, span 4 -> 0.75
PRED = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.0], dtype=torch.float64)
TRUE = torch.tensor([0.0, 0.5, 0.5, 0.25, 0.75], dtype=torch.float64)
ORDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0], dtype=torch.float64)
OFFSETS = torch.tensor([0, 3, 5])

# One group of 4 questions (2, 3, 2, 2 options) whose ordinals count up from 0 over its points.
SIZES = torch.tensor([2, 3, 2, 2])
GROUP = GroupData("E", torch.zeros(9, 2), torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 1.0, 0.5, 0.5]),
                  torch.cat([torch.zeros(1, dtype=torch.long), SIZES.cumsum(0)]), torch.tensor([1, 2, 3, 4]),
                  torch.arange(9, dtype=torch.float32))


def test_the_flag_offers_the_tables_metrics_and_auto_follows_it():
    for method in ("fedavg", "centralized"):
        action = next(a for a in build_parser(method)._actions if a.dest == "metric")
        assert action.choices == ("auto", *METRICS) == ("auto", "jsd", "wasserstein")
        assert action.help == "auto: wasserstein for opinionqa (ordinal options), jsd otherwise"
    auto = {d: resolve_metric(SimpleNamespace(metric="auto", dataset=d)) for d in ("opinionqa", "globalqa", "synthetic")}
    assert auto == {"opinionqa": "wasserstein", "globalqa": "jsd", "synthetic": "jsd"}
    assert not METRICS[DEFAULT_METRIC].needs_ordinals  # the hint for data without ordinals


def test_no_library_module_but_the_table_names_a_metric():
    """The metric names appear as string constants only in utils/distances.py."""
    named = sorted(str(path.relative_to(ROOT)) for package in LIBRARY for path in (ROOT / package).rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.Constant) and node.value in METRICS)
    assert set(named) == {"utils/distances.py"}


def test_an_added_metric_is_scored_offered_and_labelled(gap_metric):
    assert score_questions(PRED, TRUE, OFFSETS, metric="gap", ordinals=ORDS).tolist() == [0.5, 0.75]
    with pytest.raises(MetricError, match=r"metric 'gap' needs option ordinals; this data has none \(use metric='jsd'"):
        score_questions(PRED, TRUE, OFFSETS, metric="gap")
    with pytest.raises(MetricError, match=r"unknown metric 'kl'; choose one of \('jsd', 'wasserstein', 'gap'\)"):
        score_questions(PRED, TRUE, OFFSETS, metric="kl")
    args = build_parser("fedavg").parse_args(["--metric", "gap"])
    assert resolve_metric(args) == "gap"
    with pytest.raises(DataError, match=r"--metric gap needs ordinal options; synthetic has none\n  hint: use --metric jsd"):
        validate(run_config(build_parser("fedavg").parse_args(["--metric", "gap", "--dataset", "synthetic"])),
                 SimpleNamespace(has_ordinals=False))
    assert metric_label("gap") == "mean ordinal gap" and metric_label("later") == "later"
    assert "Alignment = 1 − mean mean ordinal gap between" in model_card({"metric": "gap"})


def test_every_scoring_path_gathers_the_ordinals_an_added_metric_needs(gap_metric):
    # The baselines: uniform means 0.5, 3, 5.5, 7.5 against the truth's 0, 2.5, 6, 7.5.
    ref = QuestionReference.from_groups([GROUP])
    assert ref.distances("uniform", GROUP, torch.tensor([3, 1, 0]), "gap").tolist() == [0.0, 0.25, 0.5]
    assert gap_metric.pop() == [7.0, 8.0, 2.0, 3.0, 4.0, 0.0, 1.0]
    # A model's evaluation and Fig. 3's single question
    torch.manual_seed(0)
    model = GPO(GPOConfig(dim_x=2, d_model=8, emb_depth=1, dim_feedforward=8, nhead=2, num_layers=1))
    ctx, tgt = torch.tensor([0]), torch.tensor([1, 2, 3])
    score_group(model, GROUP, ctx, GROUP, tgt, "gap")
    assert gap_metric.pop() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    p, score = predict_question(model, GROUP, ctx, tgt, 1, "gap")
    assert gap_metric.pop() == [5.0, 6.0]
    want = mean_ordinal_gap(torch.from_numpy(p), GROUP.y[5:7], torch.tensor([0, 2]), GROUP.ordinals[5:7])
    assert score == 1.0 - float(want[0])
    # The predictor: a question's own ordinals
    pred = SimpleNamespace(metric="gap", embedder=SimpleNamespace(ordinals=lambda q: q.ordinals))
    questions = [Question("q0", ("a", "b", "c"), (1.0, 2.0, 3.0)), Question("q1", ("a", "b"), (0.0, 4.0))]
    got = GroupPredictor.score(pred, [PRED[:3].numpy(), PRED[3:].numpy()], [TRUE[:3].numpy(), TRUE[3:].numpy()],
                               questions)
    assert got.tolist() == [0.5, 0.75] and gap_metric.pop() == ORDS.tolist()


def test_ordinals_are_gathered_only_for_a_metric_that_needs_them():
    assert target_ordinals(GROUP, torch.tensor([2]), "jsd") is None
    assert target_ordinals(GROUP, torch.tensor([2]), "wasserstein").tolist() == [5.0, 6.0]
    no_ordinals = GroupData("F", GROUP.x, GROUP.y, GROUP.offsets, GROUP.qkeys)
    assert target_ordinals(no_ordinals, torch.tensor([2]), "wasserstein") is None
