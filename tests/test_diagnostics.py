"""The evaluation a table lookup cannot pass: baselines, seen/unseen questions, group
specificity, and the leakage-free protocol (--question_split)."""
import pytest
import torch

from data_loaders import episodes
from data_loaders.datasets import prepare_experiment, question_holdout
from data_loaders.schema import DataError, GroupData
from orchestration.cli import build_parser
from orchestration.experiment import check_flags, make_trainer
from training.diagnostics import partners, seen_unseen
from training.evaluation import GroupEval, context_questions
from training.reference import QuestionReference
from utils.distances import score_questions


def group(name, qkeys, sizes, y):
    sizes = torch.tensor(sizes)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    n = int(offsets[-1])
    return GroupData(name, torch.zeros(n, 2), torch.tensor(y, dtype=torch.float32), offsets,
                     torch.tensor(qkeys), torch.arange(n, dtype=torch.float32))


# Two training groups: A answers questions 1 and 2, B answers 2 and 3; question 4 is nobody's.
A = group("A", [1, 2], [2, 3], [0.5, 0.5, 1.0, 0.0, 0.0])
B = group("B", [2, 3], [3, 2], [0.0, 0.5, 0.5, 0.25, 0.75])
E = group("E", [1, 2, 3, 4], [2, 3, 2, 2], [1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 1.0, 0.5, 0.5])


def test_consensus_is_the_mean_of_the_training_groups_holding_each_question():
    ref = QuestionReference.from_groups([A, B])
    assert ref.qkeys.tolist() == [1, 2, 3]
    assert ref.seen(torch.tensor([4, 3, 1, 0])).tolist() == [False, True, True, False]
    pred = ref.predict("consensus", E, torch.arange(4))
    # q1: A's only; q2: the mean of A's and B's; q3: B's only; q4: nobody's, so uniform
    assert pred.tolist() == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.75, 0.5, 0.5]
    assert ref.predict("uniform", E, torch.tensor([1, 3])).tolist() == [1 / 3, 1 / 3, 1 / 3, 0.5, 0.5]


def test_baseline_distances_are_the_metric_of_the_baseline_prediction():
    ref = QuestionReference.from_groups([A, B])
    d = ref.distances("consensus", E, torch.tensor([0, 2]), "jsd")
    offsets = torch.tensor([0, 2, 4])
    want = score_questions(torch.tensor([0.5, 0.5, 0.25, 0.75], dtype=torch.float64),
                           torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), offsets, metric="jsd")
    assert torch.equal(d, want)
    # JS distance of [.5, .5] against [1, 0]: sqrt(½(ln(4/3) + ½·ln(2/3) ... )), pinned
    assert d[0].item() == pytest.approx(0.4645014, abs=1e-7)
    uniform = ref.distances("uniform", E, torch.tensor([3]), "wasserstein")
    assert uniform.tolist() == [0.0]  # E's q4 answer is uniform itself


def test_seen_and_unseen_split_each_groups_targets():
    ref = QuestionReference.from_groups([A, B])
    ev = {"E": GroupEval("E", torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor([1, 2, 3, 4]))}
    rec = seen_unseen("eval", ev, ref)
    assert rec["eval_questions_seen"] == 3 and rec["eval_questions_unseen"] == 1
    assert rec["eval_alignment_seen"] == pytest.approx(0.8) and rec["eval_alignment_unseen"] == pytest.approx(0.6)
    assert rec["eval_worst_alignment_unseen"] == pytest.approx(0.6) and rec["eval_fi_seen"] == 1.0


def test_partners_are_a_seeded_derangement():
    names = [f"g{i}" for i in range(7)]
    pairs = partners(names, 0)
    assert sorted(pairs) == names and sorted(pairs.values()) == names
    assert all(a != b for a, b in pairs.items())
    assert pairs == partners(list(reversed(names)), 0) and partners(["x"], 0) == {}


def test_a_context_drawn_from_the_full_pool_is_the_papers_context():
    full = context_questions(30, 5, 3, "g", None, "eval")
    assert torch.equal(full, context_questions(30, 5, 3, "g", None, "eval", pool=torch.arange(30)))
    pool = torch.tensor([2, 4, 6, 8, 10, 12])
    drawn = context_questions(30, 4, 3, "g", None, "eval", pool=pool)
    assert len(drawn) == 4 and set(drawn.tolist()) <= set(pool.tolist())


def test_question_holdout_is_seeded_and_exact():
    keys = torch.arange(100, 200)
    held = question_holdout(keys.numpy(), 0.2, 5)
    assert len(held) == 20 and torch.equal(held, held.sort().values) and set(held.tolist()) <= set(keys.tolist())
    assert torch.equal(held, question_holdout(keys.numpy(), 0.2, 5))
    assert not torch.equal(held, question_holdout(keys.numpy(), 0.2, 6))
    assert question_holdout(keys.numpy(), 0.0, 5) is None


SYN = ["--dataset", "synthetic", "--syn_groups", "6", "--syn_questions", "40", "--syn_dim", "16",
       "--d_model", "32", "--dim_feedforward", "32", "--num_layers", "2", "--min_ctx_num_qs", "3",
       "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5"]


def trainer(method, *extra):
    args = build_parser(method).parse_args([*SYN, *extra])
    run = check_flags(args, method)
    data = prepare_experiment(run.data, log=lambda *a: None)
    return make_trainer(run, data, "cpu"), data


@pytest.mark.parametrize("method,extra", [("fedavg", ["--epochs", "2", "--client_engine", "loop"]),
                                          ("centralized", ["--central_steps", "2"]),
                                          ("centralized", ["--central_mode", "batched"])])
def test_no_heldout_question_reaches_any_training_step(monkeypatch, method, extra):
    seen_keys = []
    real = episodes.collate

    def recording(groups, ctx_q, tgt_q, tgt_groups=None):
        for g, c, t in zip(groups, ctx_q, tgt_q):
            seen_keys.append(torch.cat([g.qkeys[c.to(g.qkeys.device)], g.qkeys[t.to(g.qkeys.device)]]))
        return real(groups, ctx_q, tgt_q, tgt_groups)

    monkeypatch.setattr(episodes, "collate", recording)
    t, data = trainer(method, "--question_split", "0.25", *extra)
    held = data.heldout_qkeys
    assert len(held) == 10  # a quarter of the 40 questions, the same for every group
    for rnd in (1, 2, 3):
        t.train_round(rnd)
    assert seen_keys and not torch.isin(torch.cat(seen_keys), held).any()
    for c in t.clients.values():  # a training group scores exactly the held-out questions it has
        assert torch.isin(c.heldout.qkeys, held).all() and not torch.isin(c.local.qkeys, held).any()
    for c in t.eval_clients.values():  # contexts from the rest, targets only held out
        ctx_q, tgt, tgt_q = c.eval_questions(1)
        assert not torch.isin(tgt.qkeys[ctx_q], held).any() and torch.isin(tgt.qkeys[tgt_q], held).all()
        assert len(tgt_q) == int(torch.isin(tgt.qkeys, held).sum())
    evals, trains = t.evaluate(3)
    rec = t.diagnostics.record(3, evals, trains, t.global_state, final=True)
    assert rec["eval_questions_seen"] == 0 and rec["eval_alignment_seen"] is None  # nothing scored was trained on
    assert rec["baselines"]["consensus"]["eval_alignment_score"] == rec["baselines"]["uniform"]["eval_alignment_score"]


def test_question_split_zero_changes_no_number():
    a, _ = trainer("fedavg", "--epochs", "2", "--client_engine", "loop")
    b, _ = trainer("fedavg", "--epochs", "2", "--client_engine", "loop", "--question_split", "0")
    for rnd in (1, 2):
        assert a.train_round(rnd) == b.train_round(rnd)
    (ea, ta), (eb, tb) = a.evaluate(2), b.evaluate(2)
    assert all(torch.equal(ea[n].distances, eb[n].distances) for n in ea)
    assert all(torch.equal(ta[n].distances, tb[n].distances) for n in ta)


def test_question_split_refuses_what_cannot_run():
    with pytest.raises(DataError, match="--question_split 1.0 must be in"):
        trainer("fedavg", "--question_split", "1.0")
    with pytest.raises(DataError, match="--engine flower"):
        trainer("fedavg", "--question_split", "0.2", "--engine", "flower")
    with pytest.raises(DataError, match=r"training group 'g00' has 4 question\(s\) outside the held-out set"):
        trainer("fedavg", "--question_split", "0.9")
    with pytest.raises(DataError, match=r"evaluation group 'g\d+' has 10 held-out question\(s\) to score and 30"):
        trainer("fedavg", "--question_split", "0.25", "--eval_num_qs", "31")


def test_every_evaluation_carries_the_diagnostics_and_the_last_one_the_curve():
    t, _ = trainer("fedavg", "--epochs", "2", "--client_engine", "loop")
    evals, trains = t.evaluate(0)
    rec = t.diagnostics.record(0, evals, trains, t.global_state, final=True)
    n_seen, n_unseen = rec["eval_questions_seen"], rec["eval_questions_unseen"]
    assert n_seen + n_unseen == sum(len(e.distances) for e in evals.values()) and n_unseen > 0
    cons, uni = rec["baselines"]["consensus"], rec["baselines"]["uniform"]
    assert cons["eval_alignment_unseen"] == pytest.approx(uni["eval_alignment_unseen"], abs=1e-12)
    assert cons["eval_alignment_seen"] > uni["eval_alignment_seen"]
    # untrained weights: whose answers fill the context changes the prediction only by rounding-level amounts
    assert abs(rec["eval_group_specificity"]) < 1e-4
    assert set(rec["eval_group_specificity_per_group"]) == set(evals)
    assert set(rec["context_controls"]) == {"own", "partner", "uniform", "shuffled"}
    assert rec["context_controls"]["own"] - rec["context_controls"]["partner"] == pytest.approx(
        rec["eval_group_specificity"], abs=0.01)
    curve = rec["context_curve"]
    assert curve["k"] == [1, 5, 10, 20] and len(curve["alignment"]) == 4  # 40 exceeds a 40-question group


def test_specificity_detects_a_model_that_reads_the_context():
    """A kernel regression on the context (each target option gets the answers of the context
    options it resembles) predicts from whose answers it is given; on the synthetic groups,
    whose preferences differ by planted vectors, its own-context score must beat the partner's."""
    t, _ = trainer("fedavg", "--epochs", "2", "--client_engine", "loop")
    diag = t.diagnostics
    untrained = diag.specificity()["eval_group_specificity"]

    class ContextKernel(torch.nn.Module):  # duck-types the GPO methods evaluation uses
        config = t.model.config

        def project(self, x):
            return x

        def predict(self, ep):
            w = torch.softmax(ep.xt @ ep.xc.transpose(1, 2), dim=-1)
            return (w @ ep.yc[..., None])[..., 0]

    diag.model = ContextKernel()
    reads = diag.specificity()
    assert abs(untrained) < 1e-4
    assert reads["eval_group_specificity"] > max(0.01, 2 * reads["eval_group_specificity_se"])


def test_baselines_script_prints_the_round_zero_baselines(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "baselines.py"
    spec = importlib.util.spec_from_file_location("baselines_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([*SYN, "--question_split", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "4 training and 2 evaluation groups" in out and "unseen 0.6893 (20 q)" in out
    assert "consensus eval  groups" in out and "seen — (0 q)" in out
    assert mod.main([*SYN, "--question_split", "2"]) == 2
