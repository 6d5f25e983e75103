"""Aggregation strategies, server optimizers and Byzantine attacks on 2-8 toy clients, with exact
numbers, and cross-checked against Flower 1.41's own implementations where they can be called."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from data_loaders.schema import DataError
from federated.aggregation import aggregate as fedavg_aggregate
from federated.aggregation import num_sampled_clients
from federated.attacks import alie_z, choose_byzantine, corrupt_replies, corrupt_state
from federated.client import FitResult
from federated.server import ServerRules
from federated.strategies import (
    QFFL_MIN_LOSS,
    Strategy,
    StrategyConfig,
    adaptive_weights,
    cap_weights,
    coordinate_median,
    qffl_losses,
    qffl_weights,
    trimmed_mean,
)
from orchestration.cli import build_parser
from orchestration.config import run_config
from training.local import proximal_penalty
from utils.seeding import generator


def Reply(name, state, *, num_examples=1, episode_points=1, losses=(0.0,), metrics=None):  # noqa: N802
    """A client's reply as the engines build it (FitResult), with toy defaults."""
    return FitResult(name, state, num_examples, episode_points, list(losses), metrics=dict(metrics or {}))


def vec(*xs, dtype=torch.float64):
    return {"w": torch.tensor(xs, dtype=dtype)}


def random_states(n, shape=(3, 4), dtype=torch.float32, seed=0):
    g = generator(seed, "test_states")
    return [{"a": torch.randn(shape, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype)}
            for _ in range(n)]


@pytest.fixture
def task_identity():
    """Flower stamps every new Message with the process's task identity, which a runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# --- fedavg / fedprox ------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["dataset_size", "episode_points", "uniform"])
@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_server_are_todays_aggregate_bit_for_bit(name, weighting):
    states = random_states(3)
    results = [FitResult(n, s, num_examples=e, episode_points=p, losses=[1.0])
               for n, s, e, p in zip(["c", "a", "b"], states, [10, 30, 7], [5, 2, 9])]
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    got = Strategy(StrategyConfig(name=name)).aggregate(glob, results, 1, weighting)
    want = fedavg_aggregate(results, weighting)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_client_config_sends_mu_only_for_fedprox():
    assert Strategy(StrategyConfig(name="fedprox", proximal_mu=0.5)).client_config(3) == {"proximal_mu": 0.5}
    assert Strategy(StrategyConfig(name="fedavg")).client_config(3) == {}


def test_proximal_penalty_value_and_gradient():
    w = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    anchor = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.0]])}
    pen = proximal_penalty(w, anchor, mu=0.5)
    assert pen.item() == pytest.approx(0.25 * (1 + 1 + 4))   # (mu/2)·||w - w_g||² = 0.25·6
    pen.backward()
    assert torch.equal(w["a"].grad, torch.tensor([0.5, 0.5]))  # mu·(w - w_g)
    assert torch.equal(w["b"].grad, torch.tensor([[1.0]]))
    assert proximal_penalty(w, anchor, mu=0.0).item() == 0.0


# --- trimmed mean / median ---------------------------------------------------------------

FIVE = [vec(1, 10, -1), vec(2, 20, -2), vec(3, 30, -3), vec(4, 40, -4), vec(100, -50, 0)]


def test_trimmed_mean_drops_floor_beta_n_per_end():
    # beta 0.2 of 5 -> drop 1 per end: [1,2,3,4,100]->3, [-50,10,20,30,40]->20, [-4..0]->-2
    assert torch.equal(trimmed_mean(FIVE, 0.2)["w"], torch.tensor([3.0, 20.0, -2.0], dtype=torch.float64))
    assert torch.equal(trimmed_mean(FIVE, 0.0)["w"], torch.tensor([22.0, 10.0, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="0.5"):
        trimmed_mean(FIVE, 0.5)


def test_median_odd_and_even_follow_numpy():
    assert torch.equal(coordinate_median(FIVE)["w"], torch.tensor([3.0, 20.0, -2.0], dtype=torch.float64))
    four = FIVE[:4]
    assert torch.equal(coordinate_median(four)["w"], torch.tensor([2.5, 25.0, -2.5], dtype=torch.float64))


def test_trimmed_mean_and_median_equal_flowers_on_random_arrays():
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    for n in (3, 4, 7, 8):
        states = random_states(n, dtype=torch.float64, seed=n)
        for beta in (0.0, 0.1, 0.2, 0.3, 0.49):
            ours = trimmed_mean(states, beta)
            for k in ("a", "b"):
                theirs = trim_mean(np.stack([s[k].numpy() for s in states]), beta)
                np.testing.assert_allclose(ours[k].numpy(), theirs, rtol=0, atol=1e-15)
        med = coordinate_median(states)
        for k in ("a", "b"):
            np.testing.assert_allclose(med[k].numpy(), np.median(np.stack([s[k].numpy() for s in states]), axis=0),
                                       rtol=0, atol=1e-15)


def test_robust_strategies_are_unweighted_and_keep_dtype():
    states = random_states(5)
    replies = [Reply(str(i), s, num_examples=10 ** i) for i, s in enumerate(states)]
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    for name in ("trimmed_mean", "median"):
        a = Strategy(StrategyConfig(name=name)).aggregate(glob, replies, 1, "dataset_size")
        b = Strategy(StrategyConfig(name=name)).aggregate(glob, replies[::-1], 1, "uniform")
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)


# --- q-FFL ------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["dataset_size", "episode_points", "uniform"])
def test_qfedavg_with_q_zero_is_fedavg_bit_for_bit_whatever_the_scores(weighting):
    states = random_states(4)
    replies = [Reply(n, s, num_examples=7 + 3 * i, episode_points=20 - i,
                     metrics={"heldout_alignment": a})
               for i, (n, s, a) in enumerate(zip("dbca", states, [0.9, 0.1, 0.55, 1.0]))]
    glob = random_states(1, seed=5)[0]
    ours = Strategy(StrategyConfig(name="qfedavg", qffl_q=0.0)).aggregate(glob, replies, 1, weighting)
    ref = fedavg_aggregate(replies, weighting)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    rules = ServerRules(strategy=Strategy(StrategyConfig(name="qfedavg", qffl_q=0.0)), weighting=weighting)
    rules.aggregate(glob, replies, 1)
    assert rules.info()["server_step_ratio"] == 1.0


def test_qffl_weights_tilt_fedavg_weights_by_f_to_the_q():
    # ω = (0.5, 0.5), F = (0.5, 0.25), q = 1: p ∝ (0.25, 0.125) = (2/3, 1/3)
    assert qffl_weights([0.5, 0.5], [0.5, 0.25], 1.0) == pytest.approx([2 / 3, 1 / 3], abs=1e-15)
    # ω = (0.2, 0.8), F = (0.5, 0.25), q = 2: p ∝ (0.05, 0.05) = (1/2, 1/2)
    assert qffl_weights([0.2, 0.8], [0.5, 0.25], 2.0) == pytest.approx([0.5, 0.5], abs=1e-15)
    assert qffl_weights([0.3, 0.7], [0.5, 0.25], 0.0) == [0.3, 0.7]


def test_qfedavg_toy_step_weights_the_worse_client_more_and_stays_fedavg_sized():
    """w = 0, w_a = (1, 0), w_b = (0, 2), AS = (0.5, 0.75) so F = (0.5, 0.25), q = 1, uniform ω:
    p = (2/3, 1/3), new w = (2/3, 2/3); FedAvg: (1/2, 1); ratio = ||(2/3, 2/3)|| / ||(1/2, 1)||
    = (2√2/3) / (√5/2) = 4√10/15 ≈ 0.8433, inside [0.5, 2] (the old L = 1/lr step was ~0.1% of FedAvg's)."""
    replies = [Reply("b", vec(0, 2), metrics={"heldout_alignment": 0.75}),
               Reply("a", vec(1, 0), metrics={"heldout_alignment": 0.5})]
    strategy = Strategy(StrategyConfig(name="qfedavg", qffl_q=1.0))
    rules = ServerRules(strategy=strategy, weighting="uniform")
    out = rules.aggregate(vec(0, 0), replies, 1)
    assert torch.allclose(out["w"], torch.tensor([2 / 3, 2 / 3], dtype=torch.float64), rtol=0, atol=1e-15)
    assert strategy.last_info == {"max_client_weight": pytest.approx(2 / 3, abs=1e-15), "capped_clients": 0,
                                  "clamped_reports": 0}
    ratio = rules.info()["server_step_ratio"]
    assert ratio == pytest.approx(4 * math.sqrt(10) / 15, abs=1e-12) and 0.5 <= ratio <= 2
    assert strategy.required_metrics == ("heldout_alignment",)


def test_qfedavg_step_ratio_on_eight_adam_sized_clients():
    """The issue's setting, on a toy: 8 clients with correlated updates of norm 0.86-0.91 and F = 0.85 down
    to 0.71. The old L = 1/lr step was 0.13% of FedAvg's at q = 0.1; the reweighted step stays FedAvg-sized
    while the worst-served client's weight grows with q (c0: F = 0.85, dataset-size ω = 30/268 = 0.1119)."""
    g = generator(0, "test_qffl_ratio")
    glob = {"w": torch.zeros(400, dtype=torch.float64)}
    common = torch.randn(400, generator=g, dtype=torch.float64)
    replies = [Reply(f"c{i}", {"w": 0.038 * (common + 0.5 * torch.randn(400, generator=g, dtype=torch.float64))},
                     num_examples=30 + i, metrics={"heldout_alignment": 0.15 + 0.02 * i}) for i in range(8)]
    base = [(30 + i) / 268 for i in range(8)]
    losses = [0.85 - 0.02 * i for i in range(8)]
    for q, ratio, worst in ((0.1, 0.99997105, 0.11296956), (1.0, 0.99975821, 0.12247839),
                            (5.0, 0.99987561, 0.16960863)):
        rules = ServerRules(strategy=Strategy(StrategyConfig(name="qfedavg", qffl_q=q)))
        rules.aggregate(glob, replies, 1)
        assert rules.info()["server_step_ratio"] == pytest.approx(ratio, abs=1e-8), q
        assert qffl_weights(base, losses, q)[0] == pytest.approx(worst, abs=1e-8), q


def test_qffl_loss_is_one_minus_the_clamped_alignment_and_a_perfect_report_does_not_stall_the_model():
    assert qffl_losses([0.75, 1.0]) == [0.25, QFFL_MIN_LOSS]
    s = Strategy(StrategyConfig(name="qfedavg", qffl_q=1.0))
    # a: AS = 1 (F = 1e-10): under the old step that client made F^(q-1) huge and the model stood still;
    # now it only loses its own weight, 1e-10/(1e-10 + 0.5), and the step is b's update
    out = s.aggregate(vec(0.0), [Reply("a", vec(1.0), metrics={"heldout_alignment": 1.0}),
                                 Reply("b", vec(3.0), metrics={"heldout_alignment": 0.5})], 1, "uniform")
    assert out["w"].item() == pytest.approx(3.0 - 2e-10 / (0.5 + 1e-10), abs=1e-14)
    # AS = 1.2 and -50 are clamped to 1 and 0, and counted
    out = s.aggregate(vec(0.0), [Reply("a", vec(1.0), metrics={"heldout_alignment": 1.2}),
                                 Reply("b", vec(3.0), metrics={"heldout_alignment": -50.0})], 1, "uniform")
    assert s.last_info["clamped_reports"] == 2
    with pytest.raises(ValueError, match="'a' sent no 'heldout_alignment'"):
        s.aggregate(vec(0.0), [Reply("a", vec(1.0))], 1, "dataset_size")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reports_are_refused(bad):
    for name in ("qfedavg", "adaptive"):
        with pytest.raises(DataError, match=f"'a' reported heldout_alignment = {bad}") as err:
            Strategy(StrategyConfig(name=name)).aggregate(
                vec(0.0), [Reply("a", vec(1.0), metrics={"heldout_alignment": bad}),
                           Reply("b", vec(3.0), metrics={"heldout_alignment": 0.5})], 1, "uniform")
        assert err.value.hint


def test_cap_weights_water_fills_and_leaves_capped_free_weights_alone():
    # caps 3·(1/4) = 0.75: 0.97 -> 0.75, the other 0.25 split 0.01 : 0.01 : 0.01
    out, capped = cap_weights([0.97, 0.01, 0.01, 0.01], [0.25] * 4, 3.0)
    assert capped == 1 and out == pytest.approx([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], abs=1e-15)
    # caps 1.5·(1/4) = 0.375: 0.5 capped, then 0.32 scaled to 0.625·0.32/0.5 = 0.4 exceeds its cap too,
    # and the last 0.25 is split 0.09 : 0.09
    out, capped = cap_weights([0.5, 0.32, 0.09, 0.09], [0.25] * 4, 1.5)
    assert capped == 2 and out == pytest.approx([0.375, 0.375, 0.125, 0.125], abs=1e-15)
    assert cap_weights([0.3, 0.7], [0.5, 0.5], 3.0) == ([0.3, 0.7], 0)


def test_one_liar_of_ten_gets_at_most_the_capped_weight():
    """Issue 22: under adaptive, 1 of 10 clients reporting AS = 0 (others 0.8) got weight 0.997, and
    AS = -50 got 1.0. Clamped to 0 and capped at 3/10: 0.3, the nine others 0.7/9 each."""
    for lie in (0.0, -50.0):
        replies = [Reply(f"c{i}", vec(float(i)), metrics={"heldout_alignment": lie if i == 0 else 0.8})
                   for i in range(10)]
        uncapped = Strategy(StrategyConfig(name="adaptive", max_weight_ratio=10.0))
        uncapped.aggregate(vec(0.0), replies, 1, "uniform")
        assert uncapped.last_info["max_client_weight"] == pytest.approx(math.exp(8) / (math.exp(8) + 9), abs=1e-12)
        s = Strategy(StrategyConfig(name="adaptive"))
        out = s.aggregate(vec(0.0), replies, 1, "uniform")
        assert out["w"].item() == pytest.approx(0.7 / 9 * sum(range(1, 10)), abs=1e-12)
        assert s.last_info == {"max_client_weight": pytest.approx(0.3, abs=1e-15), "capped_clients": 1,
                               "clamped_reports": int(lie < 0)}


# --- adaptive -------------------------------------------------------------------------

def test_adaptive_weights_softmax_of_recent_misalignment():
    p = adaptive_weights({"a": [0.9], "b": [0.8]}, ["a", "b"], temperature=0.1, window=5)
    assert p == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], abs=1e-12)
    # the window keeps the last 2: a -> mean(0.5, 0.7) = 0.6, b -> 0.6: equal weights
    assert adaptive_weights({"a": [0.0, 0.5, 0.7], "b": [0.6]}, ["a", "b"], 0.1, 2) == pytest.approx([0.5, 0.5])


def test_adaptive_strategy_keeps_a_window_of_history_across_rounds():
    s = Strategy(StrategyConfig(name="adaptive", adaptive_temperature=0.1, adaptive_window=2))
    states = {"a": vec(0.0), "b": vec(1.0)}

    def round_(aa, ab):
        return s.aggregate(vec(0.5), [Reply("b", states["b"], metrics={"heldout_alignment": ab}),
                                      Reply("a", states["a"], metrics={"heldout_alignment": aa})], 1,
                           "dataset_size")["w"].item()
    assert round_(0.9, 0.8) == pytest.approx(math.e / (1 + math.e), abs=1e-12)   # b worse: more weight
    assert round_(0.7, 0.8) == pytest.approx(0.5, abs=1e-12)                       # a: mean(0.9,0.7) = b's 0.8
    assert round_(0.7, 0.8) == pytest.approx(1 / (1 + math.e), abs=1e-12)         # a: 0.7, 0.7 (0.9 dropped)
    assert s.history == {"a": [0.7, 0.7], "b": [0.8, 0.8]}


# --- server optimizers -------------------------------------------------------------------

def test_server_sgd_with_lr_one_is_fedavg_and_lr_half_goes_halfway():
    states = random_states(3)
    replies = [Reply(n, s, num_examples=e) for n, s, e in zip("abc", states, [1, 2, 5])]
    glob = random_states(1, seed=3)[0]
    want = fedavg_aggregate(replies, "dataset_size")
    got = Strategy(StrategyConfig(server_opt="sgd")).aggregate(glob, replies, 1, "dataset_size")
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    half = Strategy(StrategyConfig(server_opt="sgd", server_lr=0.5)).aggregate(glob, replies, 1, "dataset_size")
    assert all(torch.allclose(half[k], (glob[k] + want[k]) / 2, rtol=0, atol=1e-6) for k in want)


def _flower_messages(states, examples):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    return [Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in s.items()}),
                                        "metrics": MetricRecord({"num-examples": e})}),
                    dst_node_id=i + 1, message_type="train") for i, (s, e) in enumerate(zip(states, examples))]


@pytest.mark.parametrize("opt", ["adam", "yogi"])
def test_server_adam_and_yogi_equal_flowers_fedadam_fedyogi_over_three_rounds(opt, task_identity):
    from flwr.serverapp.strategy import FedAdam, FedYogi
    flower = FedAdam(eta=0.1) if opt == "adam" else FedYogi(eta=0.01)
    ours = Strategy(StrategyConfig(server_opt=opt, server_lr=flower.eta, server_beta1=flower.beta_1,
                                   server_beta2=flower.beta_2, server_tau=flower.tau))
    glob = random_states(1, dtype=torch.float64, seed=20)[0]
    examples = [3, 1, 4]
    for t in (1, 2, 3):
        states = [{k: glob[k] + 0.01 * v for k, v in s.items()} for s in random_states(3, dtype=torch.float64, seed=t)]
        flower.current_arrays = {k: v.numpy().copy() for k, v in glob.items()}
        # Flower's Adam bias correction uses exponent server_round + 1; ours the step count t
        theirs, _ = flower.aggregate_train(t - 1, _flower_messages(states, examples))
        glob = ours.aggregate(glob, [Reply(n, s, num_examples=e) for n, s, e in zip("abc", states, examples)],
                              t, "dataset_size")
        for k in glob:
            np.testing.assert_allclose(glob[k].numpy(), theirs[k].numpy(), rtol=1e-10, atol=1e-13)


def test_server_sgd_is_qfedavgs_server_step_size():
    replies = [Reply("a", vec(1, 0), metrics={"heldout_alignment": 0.5}),
               Reply("b", vec(0, 2), metrics={"heldout_alignment": 0.75})]
    half = Strategy(StrategyConfig(name="qfedavg", qffl_q=1.0, server_opt="sgd", server_lr=0.5))
    out = half.aggregate(vec(0, 0), replies, 1, "uniform")
    assert torch.allclose(out["w"], torch.tensor([1 / 3, 1 / 3], dtype=torch.float64), rtol=0, atol=1e-15)


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    cfg = StrategyConfig(name="adaptive", server_opt="adam", server_lr=0.01, adaptive_window=2)

    def replies(t):
        return [Reply(n, s, metrics={"heldout_alignment": 0.5 + 0.1 * i + 0.01 * t})
                for i, (n, s) in enumerate(zip("abc", random_states(3, seed=t)))]
    glob0 = random_states(1, seed=99)[0]
    straight, glob = Strategy(cfg), glob0
    for t in (1, 2, 3):
        glob = straight.aggregate(glob, replies(t), t, "uniform")
    first, mid = Strategy(cfg), glob0
    for t in (1, 2):
        mid = first.aggregate(mid, replies(t), t, "uniform")
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = Strategy(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    again = resumed.aggregate(mid, replies(3), 3, "uniform")
    assert all(torch.equal(again[k], glob[k]) for k in glob)
    with pytest.raises(DataError, match="--strategy adaptive"):
        Strategy(StrategyConfig(name="median")).load_state_dict(first.state_dict())


# --- Byzantine attacks -----------------------------------------------------------------

def test_byzantine_choice_is_seeded_and_order_free():
    names = [f"c{i}" for i in range(8)]
    pick = choose_byzantine(names, 2, seed=0)
    assert len(pick) == 2 and set(pick) <= set(names) and pick == sorted(pick)
    assert choose_byzantine(names[::-1], 2, seed=0) == pick
    assert len({tuple(choose_byzantine(names, 2, seed=s)) for s in range(10)}) > 1
    assert choose_byzantine(names, 0, seed=0) == []


def test_corrupt_state_exact():
    g, c = vec(1.0, 1.0), vec(2.0, 0.0)
    assert torch.equal(corrupt_state(g, c, "sign_flip", scale=3, std=0)["w"], torch.tensor([-2.0, 4.0],
                                                                                          dtype=torch.float64))
    assert torch.equal(corrupt_state(g, c, "scale", scale=3, std=0)["w"], torch.tensor([4.0, -2.0],
                                                                                      dtype=torch.float64))
    noisy = corrupt_state(g, c, "gaussian", scale=0, std=2.0, gen=generator(0, "attack", "x", 1))
    want = c["w"] + 2.0 * torch.randn(2, generator=generator(0, "attack", "x", 1), dtype=torch.float64)
    assert torch.equal(noisy["w"], want)


def test_corrupt_replies_touches_only_byzantine_clients_and_is_seeded_per_round():
    g = vec(0.0, 0.0)
    replies = [Reply("a", vec(1.0, 1.0)), Reply("b", vec(2.0, 2.0))]
    r1 = corrupt_replies(replies, g, ["b"], "gaussian", scale=0, std=1.0, seed=0, round_=1)
    again = corrupt_replies(replies, g, ["b"], "gaussian", scale=0, std=1.0, seed=0, round_=1)
    r2 = corrupt_replies(replies, g, ["b"], "gaussian", scale=0, std=1.0, seed=0, round_=2)
    assert r1[0] is replies[0] and torch.equal(r1[1].state["w"], again[1].state["w"])
    assert not torch.equal(r1[1].state["w"], r2[1].state["w"])
    assert torch.equal(replies[1].state["w"], torch.tensor([2.0, 2.0], dtype=torch.float64))  # input untouched


def test_one_sign_flipper_of_eight_moves_fedavg_but_not_trimmed_mean_or_median():
    """Bound: with f = 1 attacker and trimming k >= f per end (trimmed mean at beta 0.2 of 8 drops 1)
    or the median (f < n/2), every kept value per coordinate lies between the honest clients' min and
    max, and so does the clean mean: |robust - clean mean| <= the clean values' range per coordinate.
    FedAvg moves by (c + 1)·|Δ_attacker| / 8 = 11·~0.1/8 ≈ 0.14, far beyond that range (~0.03)."""
    g = generator(0, "test_byzantine")
    glob = {"w": torch.zeros(1000, dtype=torch.float64)}
    clean = [Reply(f"c{i}", {"w": 0.1 + 0.01 * torch.randn(1000, generator=g, dtype=torch.float64)})
             for i in range(8)]
    attacked = corrupt_replies(clean, glob, ["c0"], "sign_flip", scale=10.0, std=0, seed=0, round_=1)
    stacked = torch.stack([r.state["w"] for r in clean])
    bound = stacked.max(0).values - stacked.min(0).values
    clean_mean = Strategy().aggregate(glob, clean, 1, "uniform")["w"]
    for name in ("trimmed_mean", "median"):
        robust = Strategy(StrategyConfig(name=name)).aggregate(glob, attacked, 1, "uniform")["w"]
        assert bool(((robust - clean_mean).abs() <= bound).all()), name
    fedavg = Strategy().aggregate(glob, attacked, 1, "uniform")["w"]
    assert bool(((fedavg - clean_mean).abs() > bound).all())


def test_alie_z_follows_baruch_et_al():
    # s = floor(n/2 + 1) - m; z = Φ⁻¹((n - s)/n): n = 10 gives 0 (void) at m = 1, Φ⁻¹(0.6), Φ⁻¹(0.7)
    assert alie_z(10, 1) == 0.0
    assert alie_z(10, 2) == pytest.approx(0.2533471031, abs=1e-10)
    assert alie_z(10, 3) == pytest.approx(0.5244005127, abs=1e-10)
    assert alie_z(5, 2) == pytest.approx(0.8416212336, abs=1e-10)      # s = 1: Φ⁻¹(0.8)
    assert alie_z(10, 6) == pytest.approx(1.2815515655, abs=1e-10)     # s = -2 kept at 1: Φ⁻¹(0.9)
    assert alie_z(1, 1) == 0.0


def test_alie_and_ipm_send_exact_in_range_weights_from_the_honest_updates():
    """w = 1; honest a, b, c send 2, 3, 4 (updates 1, 2, 3: μ = 2, σ = √(2/3)); d, e attack, n = 5, m = 2:
    ALIE z = Φ⁻¹(0.8), sent 1 + 2 - z·√(2/3); IPM ε = 0.5: 1 - 0.5·2 = 0. Non-float tensors are kept."""
    glob = {"w": torch.tensor([1.0], dtype=torch.float64), "n": torch.tensor([7])}
    replies = [Reply(name, {"w": torch.tensor([v], dtype=torch.float64), "n": torch.tensor([7])})
               for name, v in zip("edcba", [9.0, -9.0, 4.0, 3.0, 2.0])]
    alie = corrupt_replies(replies, glob, ["d", "e"], "alie", scale=0, std=0, seed=0, round_=1)
    z = alie_z(5, 2)
    for r in alie[:2]:
        assert r.state["w"].item() == pytest.approx(3.0 - z * math.sqrt(2 / 3), abs=1e-15)
        assert torch.equal(r.state["n"], torch.tensor([7]))
    assert [r.state["w"].item() for r in alie[2:]] == [4.0, 3.0, 2.0]
    ipm = corrupt_replies(replies, glob, ["d", "e"], "ipm", scale=0, std=0, seed=0, round_=1, eps=0.5)
    assert [r.state["w"].item() for r in ipm] == [0.0, 0.0, 4.0, 3.0, 2.0]
    assert 2 <= alie[0].state["w"].item() <= 4   # ALIE: 3 - 0.687 = 2.31, inside the honest [2, 4]
    with pytest.raises(ValueError, match="not a per-client attack"):
        corrupt_state(glob, replies[0].state, "alie", scale=0, std=0)


def test_report_score_changes_only_the_attackers_metric():
    replies = [Reply("a", vec(1.0), metrics={"heldout_alignment": 0.8}),
               Reply("b", vec(2.0), metrics={"heldout_alignment": 0.8})]
    out = corrupt_replies(replies, vec(0.0), ["b"], "report_score", scale=0, std=0, seed=0, round_=1, report=0.0)
    assert out[0] is replies[0] and out[1].metrics == {"heldout_alignment": 0.0}
    assert out[1].state is replies[1].state and replies[1].metrics == {"heldout_alignment": 0.8}
    # against adaptive, the lie draws the capped weight: 1 of 10 lying gets 0.3 instead of 0.1
    many = [Reply(f"c{i}", vec(float(i)), metrics={"heldout_alignment": 0.8}) for i in range(10)]
    s = Strategy(StrategyConfig(name="adaptive"))
    s.aggregate(vec(0.0), corrupt_replies(many, vec(0.0), ["c3"], "report_score", scale=0, std=0, seed=0,
                                          round_=1), 1, "uniform")
    assert s.last_info["max_client_weight"] == pytest.approx(0.3, abs=1e-15) and s.last_info["capped_clients"] == 1


def test_alie_moves_trimmed_mean_and_median_more_than_fedavg_within_an_honest_bound():
    """3 ALIE attackers of 10 (z = Φ⁻¹(0.7) = 0.524) send μ - zσ of the 7 honest values in every coordinate.
    FedAvg moves by exactly 3/10 of that, -0.157σ; the trimmed mean (2 cut per end) by -0.261σ and the median
    by -0.422σ on average over 1000 coordinates: the in-range attack defeats exactly the rules that resist
    sign flips. Bound, for the honest majority alone: every value kept lies in [min(min_h, μ - zσ), max_h],
    so |robust - μ| <= max(μ - min_h, zσ, max_h - μ) per coordinate."""
    g = generator(0, "test_alie")
    glob = {"w": torch.zeros(1000, dtype=torch.float64)}
    clean = [Reply(f"c{i}", {"w": 0.1 + 0.01 * torch.randn(1000, generator=g, dtype=torch.float64)})
             for i in range(10)]
    bad = ["c0", "c1", "c2"]
    attacked = corrupt_replies(clean, glob, bad, "alie", scale=0, std=0, seed=0, round_=1)
    honest = torch.stack([r.state["w"] for r in clean if r.name not in bad])
    mu, sd = honest.mean(0), honest.std(0, correction=0)
    z = alie_z(10, 3)
    bound = torch.stack([mu - honest.min(0).values, z * sd, honest.max(0).values - mu]).max(0).values
    shift = {}
    for name in ("fedavg", "trimmed_mean", "median"):
        strategy = Strategy(StrategyConfig(name=name))
        robust = strategy.aggregate(glob, attacked, 1, "uniform")["w"]
        without = strategy.aggregate(glob, clean, 1, "uniform")["w"]
        shift[name] = float(((robust - mu) / sd).mean())
        assert abs(float(((without - mu) / sd).mean())) < 0.01, name    # clean: centred on the honest mean
        assert bool(((robust - mu).abs() <= bound).all()), name
    assert shift["fedavg"] == pytest.approx(-0.3 * z, abs=1e-12)
    assert shift["trimmed_mean"] == pytest.approx(-0.26072213, abs=1e-8)
    assert shift["median"] == pytest.approx(-0.42207421, abs=1e-8)


# --- flags -------------------------------------------------------------------------------

def parse(*argv):
    """The server configuration main_fl.py builds from these flags."""
    return run_config(build_parser("fedavg").parse_args(list(argv))).server


def check_strategy_flags(cfg, num_train_clients):
    cfg.strategy.validate()
    return cfg.strategy.warnings(num_sampled_clients(num_train_clients, cfg.client_fraction))


def check_attack_flags(cfg, num_train_clients):
    return cfg.attack.validate(num_train_clients, cfg.strategy, num_sampled_clients(num_train_clients,
                                                                                    cfg.client_fraction))


def test_default_flags_build_the_fedavg_path():
    args = parse()
    assert check_strategy_flags(args, 8) == [] and check_attack_flags(args, 8) == []
    assert Strategy(StrategyConfig()).name == "fedavg"


@pytest.mark.parametrize("argv, match", [
    (["--proximal_mu", "-1"], "--proximal_mu -1.0"),
    (["--qffl_q", "-0.5"], "--qffl_q -0.5"),
    (["--max_weight_ratio", "0.9"], "--max_weight_ratio 0.9"),
    (["--adaptive_temperature", "0"], "--adaptive_temperature 0.0"),
    (["--adaptive_window", "0"], "--adaptive_window 0"),
    (["--trim_fraction", "0.5"], "--trim_fraction 0.5"),
    (["--trim_fraction", "-0.1"], "--trim_fraction -0.1"),
    (["--server_opt", "adam", "--server_lr", "0"], "--server_lr 0.0"),
    (["--server_lr", "0.5"], "--server_lr 0.5: has no effect without --server_opt"),
    (["--server_beta1", "1"], "--server_beta1 1.0"),
    (["--server_tau", "0"], "--server_tau 0.0"),
])
def test_strategy_flag_errors_name_the_flag(argv, match):
    with pytest.raises(DataError, match=match) as err:
        check_strategy_flags(parse(*argv), 8)
    assert err.value.hint


def test_strategy_flag_warnings():
    w = check_strategy_flags(parse("--strategy", "trimmed_mean", "--trim_fraction", "0.1"), 8)
    assert any("trims nothing with 8" in x for x in w)
    assert any("no effect" in x for x in check_strategy_flags(parse("--proximal_mu", "0.1"), 8))


@pytest.mark.parametrize("argv, match", [
    (["--byzantine", "-1"], "--byzantine -1"),
    (["--byzantine", "8"], "no honest client"),
    (["--byzantine", "1", "--attack_scale", "-2"], "--attack_scale -2.0"),
    (["--byzantine", "1", "--attack_std", "-1"], "--attack_std -1.0"),
    (["--byzantine", "1", "--attack", "ipm", "--attack_eps", "-1"], "--attack_eps -1.0"),
    (["--byzantine", "1", "--attack", "report_score", "--attack_report", "nan"], "--attack_report nan"),
])
def test_attack_flag_errors(argv, match):
    with pytest.raises(DataError, match=match):
        check_attack_flags(parse(*argv), 8)


def test_attack_flag_warns_when_trimming_is_too_small():
    w = check_attack_flags(parse("--byzantine", "2", "--strategy", "trimmed_mean"), 8)
    assert any("not bounded" in x for x in w)
    assert check_attack_flags(parse("--byzantine", "1", "--strategy", "trimmed_mean"), 8) == []
    assert any("half" in x for x in check_attack_flags(parse("--byzantine", "4", "--strategy", "median"), 8))


def test_attack_flag_warns_when_alie_is_void_or_report_score_is_ignored():
    assert any("void" in x for x in check_attack_flags(parse("--byzantine", "1", "--attack", "alie"), 10))
    assert check_attack_flags(parse("--byzantine", "3", "--attack", "alie"), 10) == []
    w = check_attack_flags(parse("--byzantine", "1", "--attack", "report_score"), 10)
    assert any("does nothing with --strategy fedavg" in x for x in w)
    assert check_attack_flags(parse("--byzantine", "1", "--attack", "report_score", "--strategy", "adaptive"), 10) == []
