"""The released code's choices, runnable beside the paper's (README: Paper vs released code), and the
compute-matched centralized baseline."""
import json
import math

import pytest
import torch

from data_loaders.episodes import EpisodeSizes, collate
from data_loaders.schema import build_group_data
from data_loaders.synthetic import SyntheticSpec, make_synthetic
from models.gpo import GPO, GPOConfig
from orchestration.cli import build_parser
from orchestration.config import episode_sizes
from orchestration.entry import main

SMALL = ["--dataset", "synthetic", "--syn_groups", "5", "--syn_questions", "40", "--syn_dim", "8",
         "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1", "--nhead", "2",
         "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "12", "--min_tar_num_qs", "3", "--max_tar_num_qs", "12",
         "--eval_num_qs", "5", "--wandb", "off", "--quiet", "--no_plots"]


def losses(folder) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (folder / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def padded_batch():
    """Two episodes of one group: 2 + 3 target questions, so the second pads the first's targets."""
    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=12, dim=8, min_options=2, max_options=3))
    g = build_group_data(raw, "g00", x)
    ep = collate([g, g], [torch.tensor([0, 1, 2]), torch.tensor([3, 4])],
                 [torch.tensor([5, 6]), torch.tensor([7, 8, 9])])
    return ep


def test_slot_mean_is_the_released_codes_loss_with_padding():
    """Hand computation: −log N(y | μ, σ) summed over each episode's real target points; `sum`
    averages that over the B episodes, `slot_mean` divides by every slot B·Nt, padded ones counted."""
    torch.manual_seed(0)
    ep = padded_batch()
    B, Nt = ep.yt.shape
    real = ep.tgt_mask.sum(1)
    assert B == 2 and real[0] < Nt and real[1] == Nt  # the first episode is padded
    model = GPO(GPOConfig(dim_x=8, d_model=16, dim_feedforward=16, nhead=2, num_layers=1)).double()
    ep = ep.__class__(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                         for k, v in ep.__dict__.items()})
    mean, std = model.predict_raw(ep)
    nll = torch.zeros(B, dtype=torch.float64)
    for b in range(B):  # the Gaussian written out point by point
        for t in range(Nt):
            if ep.tgt_mask[b, t]:
                y, m, s = float(ep.yt[b, t]), float(mean[b, t]), float(std[b, t])
                nll[b] += 0.5 * ((y - m) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)
    assert float(model.loss(ep)) == pytest.approx(float(nll.mean()), rel=1e-6)  # predict_raw computes in float32
    model.config.loss_reduction = "slot_mean"
    assert float(model.loss(ep)) == pytest.approx(float(nll.sum()) / (B * Nt), rel=1e-6)  # predict_raw computes in float32


def test_clones_start_every_layer_equal_independent_does_not():
    torch.manual_seed(0)
    clones = GPO(GPOConfig(dim_x=8, d_model=16, dim_feedforward=16, nhead=2, num_layers=3, layer_init="clones"))
    torch.manual_seed(0)
    indep = GPO(GPOConfig(dim_x=8, d_model=16, dim_feedforward=16, nhead=2, num_layers=3))
    first = clones.layers[0].state_dict()
    for layer in clones.layers[1:]:
        assert all(torch.equal(first[k], v) for k, v in layer.state_dict().items())
    assert not torch.equal(indep.layers[0].linear1.weight, indep.layers[1].linear1.weight)
    assert torch.equal(clones.embedder[0].weight, indep.embedder[0].weight)  # only the layers change


def test_code_episode_bounds_scale_by_data_split():
    args = build_parser("fedavg").parse_args(["--episode_bounds", "code"])
    assert episode_sizes(args) == EpisodeSizes(9, 90, 9, 90)  # int(10·0.9), int(100·0.9)
    assert episode_sizes(build_parser("fedavg").parse_args([])) == EpisodeSizes(10, 100, 10, 100)


# Numbers of the code before --central_steps existed (fb5e8b2, this CPU, torch 2.13): K = 1 must keep
# them. The tolerance only absorbs another CPU's float rounding; a change of episodes or steps moves
# these losses by whole units.
BEFORE = {"sequential": [26.636662483215332, 22.732245445251465, 13.005269050598145],
          "batched": [20.18810780843099, 13.412597020467123, 14.462715148925781],
          "fedavg": [19.46817096074422, 23.684470971425373, 21.99050521850586]}


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_central_steps_one_keeps_the_numbers_and_k_steps_match_a_round(tmp_path, mode):
    flags = [*SMALL, "--central_epochs", "3", "--eval_freq", "3", "--central_mode", mode]
    if mode == "batched":
        flags += ["--train_batch_size", "2"]
    assert main("centralized", [*flags, "--out_dir", str(tmp_path / "k1")]) == 0
    assert losses(tmp_path / "k1") == pytest.approx(BEFORE[mode], rel=1e-6)
    assert main("centralized", [*flags, "--central_steps", "6", "--out_dir", str(tmp_path / "k6")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "k6" / "losses.jsonl").read_text().splitlines()]
    groups = 3  # 60% of 5 synthetic groups train
    per_epoch = groups * 6 if mode == "sequential" else math.ceil(groups / 2) * 6
    assert [r["grad_steps"] for r in rows] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert losses(tmp_path / "k6") != losses(tmp_path / "k1")


def test_matched_epoch_takes_the_gradient_steps_of_a_fedavg_round(tmp_path):
    assert main("fedavg", [*SMALL, "--comm_round", "3", "--federated_eval", "3", "--epochs", "2",
                           "--client_engine", "loop", "--out_dir", str(tmp_path / "f")]) == 0
    assert losses(tmp_path / "f") == pytest.approx(BEFORE["fedavg"], rel=1e-6)
    assert main("centralized", [*SMALL, "--central_epochs", "3", "--eval_freq", "3", "--central_steps", "2",
                                "--out_dir", str(tmp_path / "c")]) == 0
    fed, cen = ([json.loads(line)["grad_steps"] for line in (tmp_path / d / "losses.jsonl").read_text().splitlines()]
                for d in ("f", "c"))
    assert fed == cen == [6, 12, 18]


def test_released_code_variant_runs_end_to_end(tmp_path):
    out = tmp_path / "code"
    assert main("fedavg", [*SMALL, "--comm_round", "2", "--federated_eval", "2", "--loss_reduction", "slot_mean",
                           "--layer_init", "clones", "--episode_bounds", "code", "--weighting", "episode_points",
                           "--out_dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["loss_reduction"] == "slot_mean" and config["model_config"]["layer_init"] == "clones"
