"""Training end to end: schedule, client sampling, learning, determinism, resume, both CLIs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestration.entry import main
from training.local import OptimConfig, cosine_lr

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--syn_groups", "6", "--syn_questions", "40", "--syn_dim", "16",
         "--d_model", "32", "--dim_feedforward", "32", "--num_layers", "2",
         "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10",
         "--eval_num_qs", "5", "--wandb", "off", "--quiet"]


def run(method, out, *extra):
    assert main(method, [*SMALL, "--out_dir", str(out), *extra]) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def test_cosine_lr_equals_torch_scheduler():
    cfg = OptimConfig(lr=3e-4, num_steps=100)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.num_steps)
    for step in range(250):  # past T_max the schedule climbs back, as in the released code
        assert cosine_lr(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_fedavg_run_folder_and_determinism(tmp_path):
    a = run("fedavg", tmp_path / "a", "--comm_round", "4", "--federated_eval", "2", "--epochs", "2")
    b = run("fedavg", tmp_path / "b", "--comm_round", "4", "--federated_eval", "2", "--epochs", "2")
    assert strip_time(a) == strip_time(b)
    assert [r["round"] for r in a] == [0, 2, 4]
    keys = {"round", "train_loss", "train_loss_per_client", "eval_alignment_score", "eval_group_scores",
            "eval_cov", "eval_fi", "train_alignment_score", "train_group_scores", "train_cov", "train_fi",
            "grad_steps", "wall_time_s"}
    assert keys <= set(a[-1])
    assert a[-1]["grad_steps"] == 4 * 4 * 2  # rounds x 4 training clients (60% of 6) x local steps
    folder = tmp_path / "a"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_eval_alignment_score"] == a[-1]["eval_alignment_score"]
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "fedavg" and config["data"]["source_hash"]
    final = json.loads((folder / "checkpoints" / "final.json").read_text())
    assert final["alias_of"] == "round_00004" and final["files"]["model"]["name"] == "round_00004.safetensors"
    assert (folder / "checkpoints" / "round_00004.safetensors").exists()
    c = run("fedavg", tmp_path / "c", "--comm_round", "4", "--federated_eval", "2", "--epochs", "2", "--seed", "1")
    assert strip_time(c) != strip_time(a)


def test_client_fraction_trains_only_sampled_clients(tmp_path):
    recs = run("fedavg", tmp_path, "--comm_round", "3", "--federated_eval", "3", "--epochs", "2",
               "--client_fraction", "0.5", "--syn_groups", "10", "--save_client")
    losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert all(len(r["train_loss_per_client"]) == 3 for r in losses)  # 0.5 x 6 training groups
    assert recs[-1]["grad_steps"] == 3 * 3 * 2
    saved = sorted(p.stem for p in (tmp_path / "checkpoints" / "clients" / "round_00003").iterdir())
    assert saved == sorted(losses[-1]["train_loss_per_client"])  # --save_client: last round's clients


def test_fedavg_learns_planted_preferences(tmp_path):
    recs = run("fedavg", tmp_path, "--comm_round", "30", "--federated_eval", "30", "--epochs", "3",
               "--syn_groups", "10", "--syn_questions", "60", "--lr", "1e-3")
    assert recs[-1]["eval_alignment_score"] > recs[0]["eval_alignment_score"] + 0.03
    assert recs[-1]["train_alignment_score"] > recs[0]["train_alignment_score"] + 0.03


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_centralized_modes(tmp_path, mode):
    recs = run("centralized", tmp_path, "--central_epochs", "4", "--eval_freq", "2", "--central_mode", mode)
    assert [r["round"] for r in recs] == [0, 2, 4]
    per_epoch = 4 if mode == "sequential" else 1  # 4 training groups; batched fits them in one batch
    assert recs[-1]["grad_steps"] == 4 * per_epoch


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    full = run("fedavg", tmp_path / "full", "--comm_round", "6", "--federated_eval", "2", "--epochs", "2")
    part = tmp_path / "part"
    run("fedavg", part, "--comm_round", "6", "--federated_eval", "2", "--epochs", "2")
    # Pretend the run died after round 4: drop the later checkpoints and records.
    for f in (part / "checkpoints").iterdir():
        if f.name.startswith(("round_00006", "final")):
            f.unlink()
    resumed = run("fedavg", part, "--comm_round", "6", "--federated_eval", "2", "--epochs", "2", "--resume")
    assert strip_time(resumed) == strip_time(full)


def test_also_centralized_writes_both_folders(tmp_path):
    out = tmp_path / "both"
    run("fedavg", out, "--comm_round", "2", "--federated_eval", "2", "--epochs", "1", "--central_epochs", "2",
        "--also_centralized")
    assert (tmp_path / "both_centralized" / "summary.json").exists()


def test_too_few_questions_is_a_clear_error(tmp_path, capsys):
    code = main("fedavg", [*SMALL, "--out_dir", str(tmp_path), "--eval_num_qs", "40", "--comm_round", "1"])
    assert code == 2
    assert "--eval_num_qs" in capsys.readouterr().err


def test_cli_help_lists_every_flag():
    out = subprocess.run([sys.executable, "main_fl.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for flag in ["comm_round", "epochs", "lr", "seed", "central_epochs", "eval_freq", "federated_eval",
                 "eval_num_qs", "eval_seed", "dataset", "group_split", "data_split", "train_batch_size",
                 "eval_batch_size", "num_steps", "max_ctx_num_qs", "min_ctx_num_qs", "max_tar_num_qs",
                 "min_tar_num_qs", "emb_model", "wndb_project_name", "save_client", "data_path",
                 "out_dir", "device", "wandb", "weighting", "client_fraction", "central_mode", "metric"]:
        assert f"--{flag} " in out or f"--{flag}\n" in out, flag


def test_points_count_the_real_points_of_every_local_episode():
    """points = Σ over the local steps of the episode's real context + target points (no padding)."""
    import torch

    from data_loaders.episodes import EpisodeSizes, sample_episode
    from data_loaders.schema import build_group_data
    from data_loaders.synthetic import SyntheticSpec, make_synthetic
    from models.gpo import GPO, GPOConfig
    from training.local import OptimConfig, OptimState, local_train
    raw, emb = make_synthetic(SyntheticSpec(num_groups=2, num_questions=12, dim=8, seed=0))
    group = build_group_data(raw, next(iter(raw.groups)), emb)
    sizes = EpisodeSizes(2, 4, 2, 4)
    model = GPO(GPOConfig(dim_x=8, d_model=16, dim_feedforward=16, num_layers=1))
    res = local_train(model, group, 3, sizes, OptimConfig(), OptimState(), torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    expected = [int(e.ctx_mask.sum() + e.tgt_mask.sum()) for e in (sample_episode(group, sizes, replay) for _ in range(3))]
    assert res.points == sum(expected) and res.first_episode_points == expected[0]
