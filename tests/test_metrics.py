"""Exact-number tests for utils.distances and utils.metrics (method.md §7, §9), plus a few property tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from utils.distances import MetricError, js_distance, score_questions, segment_ids, wasserstein_distance_normalised
from utils.metrics import convergence_round, cov, fairness_index, group_alignment, mean_alignment, smooth_curve

SQRT_LN2 = math.sqrt(math.log(2.0))


def csr(questions: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float64 values and CSR offsets for a list of per-question lists."""
    flat = torch.tensor([v for q in questions for v in q], dtype=torch.float64)
    sizes = torch.tensor([len(q) for q in questions])
    return flat, torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])


# Questions of 2, 3, 4 and 5 options, with zeros in one side and unnormalised inputs.
PRED = [[0.7, 0.3], [0.2, 0.0, 0.8], [1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.0, 0.4]]
TRUE = [[0.4, 0.6], [0.1, 0.5, 0.4], [0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.2, 0.1, 0.1]]
ORDS = [[1.0, 2.0], [1.0, 2.0, 5.0], [4.0, 1.0, 3.0, 2.0], [0.0, 0.5, 1.0, 3.0, 10.0]]


def test_segment_ids():
    assert segment_ids(torch.tensor([0, 2, 2, 5])).tolist() == [0, 0, 2, 2, 2]


def test_js_matches_scipy():
    p, off = csr(PRED)
    t, _ = csr(TRUE)
    got = js_distance(p, t, off)
    want = [jensenshannon(np.array(a), np.array(b)) for a, b in zip(PRED, TRUE)]
    assert got.dtype == torch.float64 and got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_js_float32_input_is_scored_in_float64():
    p, off = csr(PRED)
    t, _ = csr(TRUE)
    got = js_distance(p.float(), t.float(), off)
    want = js_distance(p.float().double(), t.float().double(), off)
    assert torch.equal(got, want)


def test_js_hand_computed_two_options():
    # p = (1, 0), t = (1/2, 1/2), m = (3/4, 1/4):
    # KL(p||m) = ln(4/3); KL(t||m) = ½ln(2/3) + ½ln 2 = ½ln(4/3)
    # JSD = ½(ln(4/3) + ½ln(4/3)) = ¾ln(4/3); distance = sqrt(¾ ln(4/3)) = 0.46450140402245893
    p, off = csr([[1.0, 0.0]])
    t, _ = csr([[0.5, 0.5]])
    assert js_distance(p, t, off).item() == pytest.approx(0.46450140402245893, abs=1e-15)


def test_js_identical_is_zero_and_disjoint_is_sqrt_ln2():
    p, off = csr([[0.2, 0.3, 0.5], [1.0, 0.0], [0.0, 4.0, 0.0, 1.0]])
    assert torch.equal(js_distance(p, p, off), torch.zeros(3, dtype=torch.float64))
    a, off2 = csr([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    b, _ = csr([[0.0, 0.3, 0.7], [0.0, 0.0, 0.1, 0.9]])
    np.testing.assert_allclose(js_distance(a, b, off2).numpy(), [SQRT_LN2] * 2, rtol=0, atol=1e-15)


def test_wasserstein_matches_scipy_over_span():
    p, off = csr(PRED)
    t, _ = csr(TRUE)
    o, _ = csr(ORDS)
    got = wasserstein_distance_normalised(p, t, off, o)
    want = [wasserstein_distance(ob, ob, a, b) / (max(ob) - min(ob)) for a, b, ob in zip(PRED, TRUE, ORDS)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_wasserstein_hand_computed_with_unsorted_ordinals():
    # Sorted by ordinal (1, 2, 4): p = (½, ½, 0), t = (0, ½, ½); CDF gaps ½ on [1,2] and ½ on
    # [2,4] -> W = ½·1 + ½·2 = 1.5; span 4 − 1 = 3 -> 0.5. Given here in the order (4, 1, 2).
    p, off = csr([[0.0, 0.5, 0.5]])
    t, _ = csr([[0.5, 0.0, 0.5]])
    o, _ = csr([[4.0, 1.0, 2.0]])
    assert wasserstein_distance_normalised(p, t, off, o).item() == pytest.approx(0.5, abs=1e-15)


def test_wasserstein_single_option_and_zero_span_are_zero():
    p, off = csr([[1.0], [0.2, 0.8], [0.3, 0.7]])
    t, _ = csr([[3.0], [0.9, 0.1], [0.6, 0.4]])
    o, _ = csr([[5.0], [2.0, 2.0], [0.0, 1.0]])
    got = wasserstein_distance_normalised(p, t, off, o)
    np.testing.assert_allclose(got.numpy(), [0.0, 0.0, 0.3], rtol=0, atol=1e-15)


def test_score_questions_dispatch():
    p, off = csr(PRED)
    t, _ = csr(TRUE)
    o, _ = csr(ORDS)
    assert torch.equal(score_questions(p, t, off), js_distance(p, t, off))
    assert torch.equal(score_questions(p, t, off, metric="wasserstein", ordinals=o),
                       wasserstein_distance_normalised(p, t, off, o))
    with pytest.raises(MetricError, match="ordinals"):
        score_questions(p, t, off, metric="wasserstein")
    with pytest.raises(MetricError, match="unknown metric"):
        score_questions(p, t, off, metric="kl")


def test_nan_in_pred_names_the_question():
    p, off = csr(PRED)
    t, _ = csr(TRUE)
    p[5] = float("nan")  # point 5 belongs to question 2
    with pytest.raises(MetricError, match=r"pred is NaN/inf in question\(s\) \[2\]"):
        js_distance(p, t, off)


def test_zero_sum_and_negative_questions_are_errors():
    p, off = csr(PRED)
    t, _ = csr([[0.4, 0.6], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.2, 0.1, 0.1]])
    with pytest.raises(MetricError, match=r"true sums to zero in question\(s\) \[1\]"):
        js_distance(p, t, off)
    t2, _ = csr(TRUE)
    t2[0] = -0.1
    with pytest.raises(MetricError, match=r"true has negative probabilities in question\(s\) \[0\]"):
        wasserstein_distance_normalised(p, t2, off, csr(ORDS)[0])


def test_group_alignment_and_question_weighted_mean():
    # Group a: 3 questions at 0.1 (AS 0.9); group b: 1 question at 0.4 (AS 0.6).
    # Question-weighted: 1 − (0.3 + 0.4)/4 = 0.825; the mean of group AS would be 0.75.
    dists = {"a": torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64),
             "b": torch.tensor([0.4], dtype=torch.float64)}
    assert group_alignment(dists["a"]) == pytest.approx(0.9, abs=1e-15)
    assert group_alignment(dists["b"]) == pytest.approx(0.6, abs=1e-15)
    assert mean_alignment(dists) == pytest.approx(0.825, abs=1e-15)


def test_alignment_nan_names_group_and_index():
    with pytest.raises(MetricError, match=r"group 'b'.*index \[1\]"):
        mean_alignment({"a": torch.tensor([0.1]), "b": torch.tensor([0.2, float("nan")])})
    with pytest.raises(MetricError, match="empty"):
        group_alignment(torch.zeros(0))


def test_cov_and_fairness_index_exact():
    # Scores 0.8, 0.9, 1.0: mean 0.9, population variance 0.02/3,
    # CoV² = (0.02/3)/0.81 = 2/243, so CoV = sqrt(2/243) and FI = 1/(1 + 2/243) = 243/245.
    scores = {"g1": 0.8, "g2": 0.9, "g3": 1.0}
    assert cov(scores) == pytest.approx(math.sqrt(2 / 243), abs=1e-15)
    assert fairness_index(scores) == pytest.approx(243 / 245, abs=1e-15)
    assert fairness_index([0.7, 0.7, 0.7]) == 1.0
    with pytest.raises(MetricError, match=r"group\(s\) \['g2'\]"):
        fairness_index({"g1": 0.8, "g2": float("nan")})


# Loss 20, 19, ..., 0 over indices 0..20, then flat at 0 up to index 30; logged every 10 rounds.
LINEAR_THEN_FLAT = [20.0 - i for i in range(21)] + [0.0] * 10
ROUNDS = [10 * i for i in range(31)]


def test_convergence_round_raw_curve():
    # progress(i) = i/20 ≥ 0.95 first at i = 19 -> round 190.
    assert convergence_round(ROUNDS, LINEAR_THEN_FLAT, smoothing="none") == 190


def test_convergence_round_centred_window():
    # Window 5: S_0 = mean(20, 19, 18) = 19, S_final = 0, so the target is S ≤ 0.95.
    # S_19 = mean(3, 2, 1, 0, 0) = 1.2 misses; S_20 = mean(2, 1, 0, 0, 0) = 0.6 -> round 200.
    s = smooth_curve(LINEAR_THEN_FLAT, window=5)
    assert s[0] == 19.0 and s[19] == pytest.approx(1.2) and s[20] == pytest.approx(0.6)
    assert convergence_round(ROUNDS, LINEAR_THEN_FLAT) == 200


def test_convergence_round_negative_losses():
    # L_t = 0.5 − 2(1 − 0.5^t), t = 0..10: crosses zero; progress = (1 − 0.5^t)/(1 − 2^-10)
    # ≥ 0.95 needs 0.5^t ≤ 0.0509..., first at t = 5.
    losses = [0.5 - 2 * (1 - 0.5**t) for t in range(11)]
    assert convergence_round(list(range(11)), losses, smoothing="none") == 5


def test_convergence_round_none_cases():
    assert convergence_round([0], [1.0]) is None
    assert convergence_round([], []) is None
    assert convergence_round([0, 1, 2], [1.0, 1.0, 1.0]) is None
    assert convergence_round([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0], smoothing="none") is None
    with pytest.raises(MetricError, match=r"round\(s\) \[2\]"):
        convergence_round([0, 1, 2], [1.0, 0.5, float("nan")])
    with pytest.raises(MetricError, match="odd"):
        convergence_round([0, 1, 2], [1.0, 0.5, 0.2], window=4)


# ---------------------------------------------------------------------------------------
# Properties

probs = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)


@st.composite
def question_pairs(draw):
    """A few questions, each a pair of non-negative vectors of the same length with mass."""
    pred, true = [], []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 6))
        p = draw(st.lists(probs, min_size=n, max_size=n).filter(lambda v: sum(v) > 1e-3))
        t = draw(st.lists(probs, min_size=n, max_size=n).filter(lambda v: sum(v) > 1e-3))
        pred.append(p)
        true.append(t)
    return pred, true


@settings(max_examples=150, deadline=None)
@given(question_pairs())
def test_js_properties(pair):
    pred, true = pair
    p, off = csr(pred)
    t, _ = csr(true)
    d = js_distance(p, t, off)
    assert torch.equal(d, js_distance(t, p, off))
    assert bool(((d >= 0) & (d <= SQRT_LN2)).all())
    assert torch.equal(js_distance(p, p, off), torch.zeros_like(d))
    assert bool((js_distance(p, 3.0 * p, off) < 1e-7).all())
    # Zero only when equal: distributions that differ after normalising score above zero.
    pn = [np.array(a) / sum(a) for a in pred]
    tn = [np.array(b) / sum(b) for b in true]
    differ = torch.tensor([np.abs(a - b).max() > 1e-6 for a, b in zip(pn, tn)])
    assert bool((d[differ] > 0).all())
    # Squared, to compare divergences: scipy loses accuracy near zero, then takes a sqrt.
    want = np.array([jensenshannon(a, b) for a, b in zip(pn, tn)]) ** 2
    np.testing.assert_allclose(d.numpy() ** 2, want, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(question_pairs(), st.randoms(use_true_random=False))
def test_wasserstein_properties(pair, rnd):
    pred, true = pair
    ords = [[float(rnd.randint(0, 6)) for _ in q] for q in pred]
    p, off = csr(pred)
    t, _ = csr(true)
    o, _ = csr(ords)
    d = wasserstein_distance_normalised(p, t, off, o)
    assert torch.equal(d, wasserstein_distance_normalised(t, p, off, o))
    assert bool(((d >= 0) & (d <= 1 + 1e-12)).all())
    for q, (a, b, ob) in enumerate(zip(pred, true, ords)):
        span = max(ob) - min(ob)
        want = wasserstein_distance(ob, ob, a, b) / span if span > 0 else 0.0
        assert d[q].item() == pytest.approx(want, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 1.0, allow_nan=False), min_size=1, max_size=12))
def test_fairness_index_in_unit_interval(scores):
    fi = fairness_index(scores)
    assert 0 < fi <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu():
    p, off = csr(PRED)
    t, _ = csr(TRUE)
    o, _ = csr(ORDS)
    for metric in ("jsd", "wasserstein"):
        cpu = score_questions(p, t, off, metric=metric, ordinals=o)
        gpu = score_questions(p.cuda(), t.cuda(), off.cuda(), metric=metric, ordinals=o.cuda())
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=0, atol=1e-14)
