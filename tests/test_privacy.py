"""DP-FedAvg: clipping and noise on toy tensors with exact numbers, the noise's measured std, and
the accountant against Opacus's own values."""
from __future__ import annotations

import io
import math

import pytest
import torch

from data_loaders.schema import DataError
from federated.aggregation import num_sampled_clients, sample_clients
from federated.client import FitResult
from federated.privacy import (
    DPFedAvg,
    PrivacyAccountant,
    PrivacyBudgetExhausted,
    check_budget,
    clip_update,
    dp_mean_delta,
    gdp_delta,
    gdp_epsilon,
    noise_for_epsilon,
    update_noise_multiplier,
)
from federated.strategies import Strategy, StrategyConfig
from orchestration.cli import build_parser
from orchestration.config import run_config
from utils.seeding import generator

opacus = pytest.importorskip("opacus")


def Reply(name, state, *, num_examples=1, episode_points=1, losses=(0.0,), metrics=None):  # noqa: N802
    """A client's reply as the engines build it (FitResult), with toy defaults."""
    return FitResult(name, state, num_examples, episode_points, list(losses), metrics=dict(metrics or {}))


def f64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def opacus_epsilon(z, q, steps, delta):
    acc = opacus.accountants.RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta)


# --- the mechanism ------------------------------------------------------------------------

def test_clip_is_joint_over_all_tensors():
    clipped, norm = clip_update({"a": f64(3.0), "b": f64(4.0)}, 1.0)   # joint norm 5, not 3 and 4
    assert norm == 5.0
    assert torch.allclose(clipped["a"], f64(0.6), rtol=0, atol=1e-15)
    assert torch.allclose(clipped["b"], f64(0.8), rtol=0, atol=1e-15)
    small, _ = clip_update({"a": f64(0.3), "b": f64(0.4)}, 1.0)
    assert torch.equal(small["a"], f64(0.3)) and torch.equal(small["b"], f64(0.4))
    zero, norm0 = clip_update({"a": f64(0.0)}, 1.0)
    assert norm0 == 0.0 and torch.equal(zero["a"], f64(0.0))


def test_mean_of_clipped_updates_over_the_sampled_count_without_noise():
    glob = {"w": f64(1.0, 1.0)}
    states = [{"w": f64(4.0, 5.0)}, {"w": f64(1.3, 1.4)}]   # updates (3,4) norm 5 -> (0.6,0.8); (0.3,0.4) kept
    mean, info = dp_mean_delta(glob, states, clip=1.0, noise_multiplier=0.0, num_sampled=2, gen=generator(0, "x"))
    assert torch.allclose(mean["w"], f64(0.45, 0.6), rtol=0, atol=1e-15)
    assert info["dp_clipped"] == 1 and info["dp_noise_std"] == 0.0
    # the clipped mean (0.45, 0.6) is the signal: norm 0.75; no noise drawn
    assert info["dp_signal_norm"] == pytest.approx(0.75, rel=0, abs=1e-15)
    assert info["dp_noise_norm"] == 0.0 and info["dp_params"] == 2
    # two of four sampled clients replied: the denominator stays 4 (the sum's sensitivity stays S)
    mean4, _ = dp_mean_delta(glob, states, clip=1.0, noise_multiplier=0.0, num_sampled=4, gen=generator(0, "x"))
    assert torch.allclose(mean4["w"], f64(0.225, 0.3), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="only 1 clients were sampled"):
        dp_mean_delta(glob, states, clip=1.0, noise_multiplier=0.0, num_sampled=1, gen=generator(0, "x"))


def test_noise_std_is_z_clip_over_m_and_seeded_by_round():
    n, z, clip, m = 200_000, 2.0, 0.5, 4            # std z·S/m = 0.25
    glob = {"w": torch.zeros(n, dtype=torch.float32)}
    same = [{"w": torch.zeros(n, dtype=torch.float32)}]  # Δ = 0: the mean is pure noise
    noise, info = dp_mean_delta(glob, same, clip=clip, noise_multiplier=z, num_sampled=m, gen=generator(0, "dp", 1))
    assert info["dp_noise_std"] == 0.25
    # no signal (every update 0); the noise norm is its draw's, about std sqrt(P) = 0.25 sqrt(2e5)
    assert info["dp_signal_norm"] == 0.0
    assert info["dp_noise_norm"] == pytest.approx(float(noise["w"].norm()), rel=1e-12)
    assert info["dp_noise_norm"] == pytest.approx(0.25 * math.sqrt(n), rel=0.01)
    # sample std of 2e5 draws: relative standard error 1/sqrt(2n) = 0.16%; allow 1%
    assert float(noise["w"].std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(noise["w"].mean())) < 5 * 0.25 / math.sqrt(n)
    again, _ = dp_mean_delta(glob, same, clip=clip, noise_multiplier=z, num_sampled=m, gen=generator(0, "dp", 1))
    other, _ = dp_mean_delta(glob, same, clip=clip, noise_multiplier=z, num_sampled=m, gen=generator(0, "dp", 2))
    assert torch.equal(noise["w"], again["w"]) and not torch.equal(noise["w"], other["w"])


def test_dp_fedavg_round_is_global_plus_clipped_mean_plus_seeded_noise():
    glob = {"w": torch.tensor([1.0, 1.0])}
    replies = [Reply("b", {"w": torch.tensor([1.3, 1.4])}), Reply("a", {"w": torch.tensor([4.0, 5.0])})]
    dp = DPFedAvg(Strategy(), clip=1.0, noise_multiplier=0.5, seed=3, num_sampled=2)
    out = dp.aggregate(glob, replies, 7, "uniform")
    noise = 0.5 * 1.0 / 2 * torch.randn(2, generator=generator(3, "dp", 7), dtype=torch.float64)
    want = (f64(1.0, 1.0) + f64(0.45, 0.6) + noise).to(torch.float32)
    assert torch.equal(out["w"], want)
    # the server optimizer gets the noisy mean: sgd at lr 1 is the same step
    sgd = DPFedAvg(Strategy(StrategyConfig(server_opt="sgd")), clip=1.0, noise_multiplier=0.5, seed=3, num_sampled=2)
    assert torch.allclose(sgd.aggregate(glob, replies, 7, "uniform")["w"], want, rtol=0, atol=1e-6)


def test_secure_noise_has_the_stated_std_and_differs_between_runs_with_the_same_seed():
    """--dp_secure_noise: OS randomness (Box-Muller, 4 draws per coordinate as Opacus secure_mode), so
    two runs with the same seed differ; the measured std is z·S/m; the seeded path still reproduces."""
    n, z, clip, m = 200_000, 2.0, 0.5, 4            # std z·S/m = 0.25
    glob = {"w": torch.zeros(n, dtype=torch.float32)}
    same = [{"w": torch.zeros(n, dtype=torch.float32)}]
    noise, _ = dp_mean_delta(glob, same, clip=clip, noise_multiplier=z, num_sampled=m, gen=None)
    assert noise["w"].dtype == torch.float64
    assert float(noise["w"].std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(noise["w"].mean())) < 5 * 0.25 / math.sqrt(n)
    # kurtosis of a Gaussian is 3 (a sum of uniforms or a broken Box-Muller would not be)
    x = noise["w"] / noise["w"].std()
    assert float((x ** 4).mean()) == pytest.approx(3.0, abs=0.05)
    glob, replies = {"w": torch.tensor([1.0, 1.0])}, [Reply("a", {"w": torch.tensor([1.3, 1.4])})]
    runs = [DPFedAvg(Strategy(), clip=1.0, noise_multiplier=0.5, seed=3, num_sampled=1, secure_noise=secure)
            .aggregate(glob, replies, 7, "uniform")["w"] for secure in (True, True, False, False)]
    assert not torch.equal(runs[0], runs[1])   # same seed, same round: fresh noise
    assert torch.equal(runs[2], runs[3])       # seeded: bit for bit


def test_build_dp_passes_secure_noise_and_warns_without_it():
    secure = build_dp(parse(*OK, "--dp_secure_noise"), Strategy(), 8, 25)
    assert secure.secure_noise and not build_dp(parse(*OK), Strategy(), 8, 25).secure_noise
    assert any("--dp_secure_noise" in w for w in check_privacy_flags(parse(*OK), 8))
    assert check_privacy_flags(parse(*OK, "--dp_secure_noise"), 8) == []
    assert not build_dp(parse(*OK, "--no-dp_secure_noise"), Strategy(), 8, 25).secure_noise


def test_secure_noise_is_the_default_in_a_deployment_only():
    from orchestration.cli import build_parser
    from orchestration.flower_server import default_secure_noise
    parser = build_parser("fedavg")
    for runtime, flags, want in (("deployment", [*OK], True), ("deployment", [*OK, "--no-dp_secure_noise"], False),
                                 ("simulation-thread", [*OK], None), ("deployment", [], None)):
        args = parser.parse_args(flags)
        default_secure_noise(args, runtime)
        assert args.dp_secure_noise is want, (runtime, flags)


def test_dp_refuses_weighting_and_strategies_whose_sensitivity_is_not_s_over_m():
    dp = DPFedAvg(Strategy(), clip=1.0, noise_multiplier=1.0, seed=0, num_sampled=2)
    with pytest.raises(ValueError, match="uniformly"):
        dp.aggregate({"w": f64(0.0)}, [Reply("a", {"w": f64(1.0)})], 1, "dataset_size")
    for name in ("median", "trimmed_mean", "qfedavg", "adaptive"):
        with pytest.raises(DataError, match=f"--strategy {name}"):
            DPFedAvg(Strategy(StrategyConfig(name=name)), clip=1.0, noise_multiplier=1.0, seed=0, num_sampled=2)
    DPFedAvg(Strategy(StrategyConfig(name="fedprox", server_opt="adam")), clip=1.0, noise_multiplier=1.0, seed=0,
             num_sampled=2)


def test_num_sampled_clients_matches_sample_clients():
    for n in range(1, 13):
        for frac in (0.05, 0.25, 0.5, 0.6, 0.75, 1.0):
            got = sample_clients([f"c{i}" for i in range(n)], frac, generator(0, "s", n))
            assert len(got) == num_sampled_clients(n, frac)


# --- accounting ---------------------------------------------------------------------------

def test_epsilon_equals_opacus_with_all_clients_sampled():
    acc = PrivacyAccountant(1.0, 1.0, 1e-5)
    for _ in range(25):
        acc.step()
    assert acc.epsilon() == opacus_epsilon(1.0, 1.0, 25, 1e-5)
    assert acc.epsilon() == pytest.approx(35.08, abs=0.01)             # extensions.md: ≈ 35 after 25 rounds
    assert acc.epsilon(100) == opacus_epsilon(1.0, 1.0, 100, 1e-5)     # ≈ 96
    assert PrivacyAccountant(5.0, 1.0, 1e-5).epsilon(25) == pytest.approx(4.7, abs=0.05)
    assert PrivacyAccountant(1.0, 1.0, 1e-5).epsilon(0) == 0.0
    assert PrivacyAccountant(0.0, 1.0, 1e-5).epsilon(1) == math.inf


def test_sampled_rounds_are_accounted_as_replace_one_without_amplification():
    acc = PrivacyAccountant(2.0, 0.5, 1e-5)
    assert acc.neighbouring == "replace_one"
    assert acc.epsilon(30) == opacus_epsilon(1.0, 1.0, 30, 1e-5)       # z/2 = 1 per round, rate 1
    assert acc.epsilon(30) > opacus_epsilon(2.0, 0.5, 30, 1e-5)        # more than Poisson accounting claims


def test_noise_for_epsilon_meets_the_budget():
    z = noise_for_epsilon(10.0, 1e-5, 50, 1.0)
    assert 10.0 - 0.01 <= PrivacyAccountant(z, 1.0, 1e-5).epsilon(50) <= 10.0
    assert noise_for_epsilon(10.0, 1e-5, 50, 0.5) == 2 * z


def test_small_epsilons_are_reached_with_more_rdp_orders_and_unreachable_ones_refused():
    """Opacus's default orders stop at 63, which puts a floor of about 0.1 on ε at δ = 1e-5 (z = 1e9 gave
    0.103 after one round and 0.01 over 1,300 rounds was a ValueError traceback)."""
    assert PrivacyAccountant(1e9, 1.0, 1e-5).epsilon(1) < 1e-3
    dp = build_dp(parse("--dp", "--weighting", "uniform", "--dp_epsilon", "0.01"), Strategy(), 8, 1300)
    assert 0 < dp.accountant.epsilon(1300) <= 0.01
    with pytest.raises(DataError, match=r"--dp_epsilon 0.001 cannot be reached in 1000000 rounds at δ = 1e-05: "
                                        r"even noise z = 1e\+06 spends ε = 0.00") as err:
        noise_for_epsilon(0.001, 1e-5, 10 ** 6, 1.0)
    assert "raise --dp_epsilon to 0.00" in err.value.hint
    with pytest.raises(DataError, match=r"--dp_epsilon 1e-05 is below the smallest ε the RDP accountant can certify "
                                        r"at δ = 1e-05 \(0.00013"):
        check_privacy_flags(parse("--dp", "--weighting", "uniform", "--dp_epsilon", "1e-5"), 8)


def test_pre_run_check_refuses_a_run_over_budget():
    with pytest.raises(DataError, match=r"spends ε = 35.08 > --dp_epsilon 10") as err:
        check_budget(PrivacyAccountant(1.0, 1.0, 1e-5), 25, 10.0)
    assert "raise --dp_noise to" in err.value.hint
    assert check_budget(PrivacyAccountant(5.0, 1.0, 1e-5), 25, 10.0) == pytest.approx(4.7, abs=0.05)


def test_mid_run_check_stops_before_the_round_that_would_exceed():
    acc = PrivacyAccountant(5.0, 1.0, 1e-5)
    budget = (acc.epsilon(2) + acc.epsilon(3)) / 2
    dp = DPFedAvg(Strategy(), clip=1.0, noise_multiplier=5.0, seed=0, num_sampled=1, accountant=acc,
                  max_epsilon=budget)
    glob = {"w": f64(0.0)}
    for r in (1, 2):
        glob = dp.aggregate(glob, [Reply("a", {"w": f64(1.0)})], r, "uniform")
    assert dp.last_info["dp_epsilon"] == acc.epsilon(2)
    with pytest.raises(PrivacyBudgetExhausted, match="round 3 would spend"):
        dp.aggregate(glob, [Reply("a", {"w": f64(1.0)})], 3, "uniform")
    assert acc.steps == 2


def test_zero_out_replace_one_and_exact_epsilon_at_300_rounds():
    """Issue 22's numbers (δ = 1e-5, every client sampled, 300 rounds). Zero-out (m fixed and public: one
    group's update replaced by zero), RDP: 231.0, 42.9, 9.0 for z = 1, 3, 10; replace-one (z/2): 771.8,
    120.0, 21.4; the exact composition (μ-GDP, μ = √300/z): 223.0, 40.54, 8.39, which Opacus's PRV
    accountant approximates within its eps_error 0.01."""
    want = {1: (231.04, 771.78, 222.98), 3: (42.85, 120.02, 40.54), 10: (9.01, 21.44, 8.39)}
    for z, (rdp, replace_one, exact) in want.items():
        acc = PrivacyAccountant(z, 1.0, 1e-5)
        assert acc.neighbouring == "zero_out"
        assert acc.epsilon(300) == pytest.approx(rdp, abs=0.01)
        assert acc.epsilon_replace_one(300) == pytest.approx(replace_one, abs=0.01)
        assert acc.epsilon_exact(300) == pytest.approx(exact, abs=0.01)
        prv = opacus.accountants.PRVAccountant()
        prv.history = [(float(z), 1.0, 300)]
        assert acc.epsilon_exact(300) == pytest.approx(prv.get_epsilon(1e-5), abs=0.02)
    sampled = PrivacyAccountant(2.0, 0.5, 1e-5)   # sampling: replace-one already, exact at z/2
    assert sampled.neighbouring == "replace_one" and sampled.epsilon_replace_one(30) == sampled.epsilon(30)
    assert sampled.epsilon_exact(30) == pytest.approx(PrivacyAccountant(1.0, 1.0, 1e-5).epsilon_exact(30), abs=1e-9)
    assert gdp_delta(gdp_epsilon(3.0, 1e-5), 3.0) == pytest.approx(1e-5, rel=1e-6)


def test_dp_round_logs_the_three_epsilons():
    acc = PrivacyAccountant(1.0, 1.0, 1e-5)
    dp = DPFedAvg(Strategy(), clip=1.0, noise_multiplier=1.0, seed=0, num_sampled=1, accountant=acc)
    dp.aggregate({"w": f64(0.0)}, [Reply("a", {"w": f64(1.0)})], 1, "uniform")
    one = PrivacyAccountant(1.0, 1.0, 1e-5)
    assert dp.last_info["dp_epsilon"] == one.epsilon(1)
    assert dp.last_info["dp_epsilon_exact"] == one.epsilon_exact(1) < one.epsilon(1)
    assert dp.last_info["dp_epsilon_replace_one"] == one.epsilon_replace_one(1) > one.epsilon(1)


def test_update_noise_keeps_the_total_cost_at_z():
    # z_Δ⁻² + (2σ_b)⁻² = z⁻²: z = 1, σ_b = 5: z_Δ = (1 - 1/100)^(-1/2)
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(0.99 ** -0.5, abs=1e-15)
    assert update_noise_multiplier(0.0, 0.5) == 0.0
    with pytest.raises(DataError, match="--dp_clip_count_std"):
        update_noise_multiplier(1.0, 0.5)   # m = 10: σ_b = m/20 = 0.5 allows only z < 1


def test_adaptive_clip_moves_toward_the_target_quantile_of_the_update_norms():
    """10 clients whose updates have norms 1..10, every round. From C = 0.1: the share not clipped is 0
    so C grows by e^(0.2·γ) per round until it reaches the γ-quantile, where the share equals γ and C
    stays (noise-free here: z = 0 and σ_b = 0 would leave nothing to move it)."""
    glob = {"w": torch.zeros(1, dtype=torch.float64)}
    replies = [Reply(f"c{k:02d}", {"w": torch.tensor([float(k)], dtype=torch.float64)}) for k in range(1, 11)]
    for gamma, low, high in ((0.5, 5, 6), (0.9, 9, 10), (0.2, 2, 3)):
        dp = DPFedAvg(Strategy(), clip=0.1, noise_multiplier=0.0, seed=0, num_sampled=10, clip_quantile=gamma,
                      count_std=0.0)
        for r in range(1, 301):
            dp.aggregate(glob, replies, r, "uniform")
        assert low <= dp.clip < high, (gamma, dp.clip)
        assert dp.state_dict()["clip"] == dp.clip
    # with the count noised (σ_b = 0.5 of 10 clients) C still settles near the median: within [4, 7]
    noisy = DPFedAvg(Strategy(), clip=0.1, noise_multiplier=0.5, seed=0, num_sampled=10, clip_quantile=0.5)
    clips = []
    for r in range(1, 401):
        noisy.aggregate(glob, replies, r, "uniform")
        clips.append(noisy.clip)
    assert 4 <= sum(clips[200:]) / 200 <= 7
    assert noisy.update_noise == pytest.approx(update_noise_multiplier(0.5, 0.5), abs=0)


def test_accountant_state_dict_loads_with_weights_only_and_refuses_other_settings():
    acc = PrivacyAccountant(1.5, 1.0, 1e-5)
    for _ in range(7):
        acc.step()
    buf = io.BytesIO()
    torch.save(DPFedAvg(Strategy(), clip=1.0, noise_multiplier=1.5, seed=0, num_sampled=2,
                        accountant=acc).state_dict(), buf)
    buf.seek(0)
    back = PrivacyAccountant(1.5, 1.0, 1e-5)
    DPFedAvg(Strategy(), clip=1.0, noise_multiplier=1.5, seed=0, num_sampled=2,
             accountant=back).load_state_dict(torch.load(buf, weights_only=True))
    assert back.steps == 7 and back.epsilon() == acc.epsilon()
    with pytest.raises(DataError, match="noise_multiplier"):
        PrivacyAccountant(2.0, 1.0, 1e-5).load_state_dict(acc.state_dict())


# --- flags -------------------------------------------------------------------------------

def parse(*argv):
    """The server configuration main_fl.py builds from these flags."""
    return run_config(build_parser("fedavg").parse_args(list(argv))).server


def check_privacy_flags(cfg, num_train_clients):
    return cfg.privacy.validate(num_train_clients, weighting=cfg.weighting, strategy=cfg.strategy.name,
                                client_fraction=cfg.client_fraction)


def build_dp(cfg, strategy, num_train_clients, rounds):
    return cfg.build_dp(strategy, num_train_clients, rounds)


OK = ("--dp", "--weighting", "uniform", "--dp_noise", "1.0")


@pytest.mark.parametrize("argv, match", [
    (["--dp_noise", "1"], "--dp_noise has no effect without --dp"),
    (["--dp_epsilon", "1"], "--dp_epsilon has no effect without --dp"),
    ([*OK, "--dp_clip", "0"], "--dp_clip 0.0 must be > 0"),
    ([*OK, "--dp_noise", "-1"], "--dp_noise -1.0 must be >= 0"),
    ([*OK, "--dp_epsilon", "0"], "--dp_epsilon 0.0 must be > 0"),
    (["--dp", "--weighting", "uniform"], "needs --dp_noise or --dp_epsilon"),
    ([*OK, "--dp_noise", "0", "--dp_epsilon", "5"], "cannot meet"),
    ([*OK, "--dp_delta", "0"], "--dp_delta 0.0 must be in"),
    ([*OK, "--dp_delta", "1"], "--dp_delta 1.0 must be in"),
    (["--dp", "--dp_noise", "1"], "--weighting dataset_size"),
    ([*OK, "--strategy", "median"], "--strategy median"),
    ([*OK, "--strategy", "qfedavg"], "--strategy qfedavg"),
    (["--dp_secure_noise"], "--dp_secure_noise has no effect without --dp"),
    (["--dp_clip_quantile", "0.5"], "--dp_clip_quantile has no effect without --dp"),
    ([*OK, "--dp_clip_quantile", "1.0"], "--dp_clip_quantile 1.0 must be in"),
    ([*OK, "--dp_clip_quantile", "0.5", "--dp_clip_lr", "0"], "--dp_clip_lr 0.0 must be > 0"),
    ([*OK, "--dp_clip_count_std", "0"], "--dp_clip_count_std 0.0 must be > 0"),
])
def test_privacy_flag_errors_name_the_flag(argv, match):
    with pytest.raises(DataError, match=match) as err:
        check_privacy_flags(parse(*argv), 8)
    assert err.value.hint


def test_privacy_flag_warnings():
    assert check_privacy_flags(parse(), 8) == [] and check_privacy_flags(parse(*OK, "--dp_secure_noise"), 8) == []
    assert any("exceeds 1/8" in w for w in check_privacy_flags(parse(*OK, "--dp_delta", "0.2"), 8))
    assert any("ε = ∞" in w for w in check_privacy_flags(parse(*OK, "--dp_noise", "0"), 8))
    assert any("replace-one" in w for w in check_privacy_flags(parse(*OK, "--client_fraction", "0.5"), 8))


def test_build_dp_solves_noise_from_epsilon_and_refuses_over_budget_runs():
    assert build_dp(parse(), Strategy(), 8, 25) is None
    dp = build_dp(parse("--dp", "--weighting", "uniform", "--dp_epsilon", "10"), Strategy(), 8, 25)
    assert dp.num_sampled == 8 and dp.accountant.epsilon(25) <= 10.0
    half = build_dp(parse("--dp", "--weighting", "uniform", "--dp_epsilon", "10", "--client_fraction", "0.5"),
                    Strategy(), 8, 25)
    assert half.num_sampled == 4 and half.accountant.sample_rate == 0.5
    with pytest.raises(DataError, match="> --dp_epsilon 10"):
        build_dp(parse(*OK, "--dp_epsilon", "10"), Strategy(), 8, 25)
