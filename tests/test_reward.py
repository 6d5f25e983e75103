"""What GroupReward rewards, with exact numbers, on a predictor whose prediction is fixed
(issue 22): the distribution-level reward is the default and its optimum is the group's own
distribution; option mode rewards one answer, under Wasserstein the ordinal median."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inference import GroupPredictor, GroupReward

ROOT = Path(__file__).resolve().parents[1]
QUESTION = ("How much do you trust the news?", ("A lot", "Some", "Not at all"))
PREDICTED = np.array([0.45, 0.10, 0.45])
CONTEXT = [("Do you read a paper?", ["Yes", "No"], [0.5, 0.5])]


class FixedPredictor:
    """GroupPredictor's predict and score, with the prediction fixed to PREDICTED (ordinals 1, 2, 3)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.embedder = SimpleNamespace(ordinals=lambda q: tuple(float(i) for i in range(1, len(q.options) + 1)))

    def predict(self, context, questions):
        return [PREDICTED.copy() for _ in questions]

    def score(self, pred, true, questions):
        return GroupPredictor.score(self, pred, true, questions)


def ask(reward, answers):
    n = len(answers)
    return reward(["p"] * n, answers, question=[QUESTION[0]] * n, options=[list(QUESTION[1])] * n)


def js_option_reward(p: float) -> float:
    """1 - JS distance(one-hot, prediction) depends only on the option's p: 1 - sqrt(½(2 ln 2 - (1+p) ln(1+p) + p ln p))."""
    return 1 - math.sqrt(0.5 * (2 * math.log(2) - (1 + p) * math.log(1 + p) + p * math.log(p)))


def test_option_mode_under_wasserstein_rewards_the_ordinal_median_not_the_likeliest_answer():
    """W(e_i, p) = E_p|X - x_i| / span: A 1.0/2, B 0.9/2, C 1.0/2, so rewards 0.50, 0.55, 0.50:
    the least likely option (0.10) wins."""
    reward = GroupReward(FixedPredictor("wasserstein"), CONTEXT, mode="option")
    np.testing.assert_allclose(ask(reward, ["A", "B", "C"]), [0.50, 0.55, 0.50], rtol=0, atol=1e-12)


def test_option_mode_under_jsd_rewards_the_likeliest_answer():
    reward = GroupReward(FixedPredictor("jsd"), CONTEXT, mode="option")
    got = ask(reward, ["A", "B", "C"])
    np.testing.assert_allclose(got, [js_option_reward(0.45), js_option_reward(0.10), js_option_reward(0.45)],
                               rtol=0, atol=1e-7)   # float32 inside js_distance
    assert got[0] == pytest.approx(0.505936, abs=1e-6) and got[1] == pytest.approx(0.275019, abs=1e-6)


def test_distribution_reward_is_the_default_and_is_best_for_the_groups_own_distribution():
    """20 answers in the group's proportions (9 A, 2 B, 9 C) score 1; all B, option mode's Wasserstein
    optimum, scores 0.55 and all A 0.50 (shared credit: every answer gets its prompt's score)."""
    pred = FixedPredictor("wasserstein")
    assert GroupReward(pred, CONTEXT).mode == "distribution"
    shared = GroupReward(pred, CONTEXT, credit="shared")
    assert ask(shared, ["A"] * 9 + ["B"] * 2 + ["C"] * 9) == pytest.approx([1.0] * 20, abs=1e-12)
    assert ask(shared, ["B"] * 4) == pytest.approx([0.55] * 4, abs=1e-12)
    assert ask(shared, ["A"] * 4) == pytest.approx([0.50] * 4, abs=1e-12)


def test_leave_one_out_credit_of_the_default_reward_exact():
    """Answers A, A, C: the whole scores 1 - W([2/3, 0, 1/3], p) = 1 - (|0.45 - 2/3| + |0.55 - 2/3|)/2
    = 5/6, and each answer gets the whole's score minus the score without it. Without an A:
    [1/2, 0, 1/2], W = (0.05 + 0.05)/2, score 0.95; without the C: [1, 0, 0], score 0.5. So each A
    gets 5/6 - 0.95 = -0.117 (A is over-represented) and the C gets 5/6 - 0.5 = +0.333."""
    got = ask(GroupReward(FixedPredictor("wasserstein"), CONTEXT), ["A", "A", "C"])
    np.testing.assert_allclose(got, [5 / 6 - 0.95, 5 / 6 - 0.95, 5 / 6 - 0.5], rtol=0, atol=1e-7)


def test_the_example_script_defaults_to_the_distribution_reward():
    spec = importlib.util.spec_from_file_location("grpo_group_reward", ROOT / "examples" / "grpo_group_reward.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    parse_args = example.parse_args
    assert parse_args(["--run", "r", "--group", "g", "--model", "m"]).mode == "distribution"
    assert parse_args(["--run", "r", "--group", "g", "--model", "m", "--mode", "option"]).mode == "option"
