"""scripts/sweep.py: variants over seeds, reused when finished, compared with the baseline."""
import json

from reporting.sweep import PRESETS, main

TINY = ("--dataset synthetic --syn_groups 6 --syn_questions 40 --syn_dim 16 --d_model 16 --dim_feedforward 16 "
        "--num_layers 1 --min_ctx_num_qs 3 --max_ctx_num_qs 10 --min_tar_num_qs 3 --max_tar_num_qs 10 "
        "--eval_num_qs 5 --epochs 1 --comm_round 3 --federated_eval 3 --no_plots")


def test_privacy_sweep_trains_reuses_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "privacy", "--variants", "no_dp", "dp_z1", "--seeds", "0", "1", "--extra", TINY,
            "--out_root", str(tmp_path / "runs"), "--report", str(tmp_path / "privacy.md")]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == [
        "dp_z1_s0", "dp_z1_s1", "no_dp_s0", "no_dp_s1"]
    config = json.loads((tmp_path / "runs" / "dp_z1_s1" / "config.json").read_text())
    assert config["dp"] and config["dp_noise"] == 1.0 and config["weighting"] == "uniform" and config["seed"] == 1
    report = (tmp_path / "privacy.md").read_text()
    assert "dp_z1" in report and "no_dp" in report
    assert "```bash\npython scripts/sweep.py --preset privacy" in report and "## Setup" in report
    assert "S = 0.1 is about the median client update norm" in report
    assert "non-private run" in report and "| Uniform predictor, eval alignment (no model) |" in report
    assert "![Signal-to-noise ratio of the server's update vs round](privacy_snr_vs_round.png)" in report
    assert (tmp_path / "privacy_snr_vs_round.png").stat().st_size > 0
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: reused, nothing retrained
    assert capsys.readouterr().out.count("reuse ") == 4


def test_unknown_variant_is_refused(tmp_path, capsys):
    assert main(["--preset", "strategies", "--variants", "fedsgd", "--report_only",
                 "--out_root", str(tmp_path)]) == 2
    assert "fedsgd" in capsys.readouterr().err


def test_presets_keep_the_issue_setups():
    s, p = PRESETS["strategies"], PRESETS["privacy"]
    assert s.seeds == p.seeds == [0, 1, 2]
    for preset in (s, p):
        assert preset.base[preset.base.index("--comm_round") + 1] == "300"
        assert preset.base[preset.base.index("--dataset") + 1] == "opinionqa"
    assert {"fedavg", "fedprox", "qfedavg", "adaptive", "trimmed_mean", "median"} <= set(s.variants)
    for rule in ("fedavg", "trimmed_mean", "median"):  # ALIE with z > 0: 3 of the 10 training groups
        flags = s.variants[f"{rule}_alie"]
        assert flags[flags.index("--attack") + 1] == "alie" and flags[flags.index("--byzantine") + 1] == "3"
        assert rule == "fedavg" or flags[flags.index("--strategy") + 1] == rule
    assert sum("--dp" in v for v in p.variants.values()) >= 3 and p.variants[p.baseline] == []
    clip_only = p.variants["dp_clip_only"]   # the clipping bias alone: the DP variants' clip, no noise
    assert clip_only[clip_only.index("--dp_noise") + 1] == "0"
    assert clip_only[clip_only.index("--dp_clip") + 1] == p.variants["dp_z1"][p.variants["dp_z1"].index("--dp_clip") + 1]


def test_group_use_preset_compares_the_context_answer_on_unseen_questions():
    g = PRESETS["group_use"]
    assert g.seeds == [0, 1] and g.variants == {
        "concat": [], "product": ["--context_answer", "product"],
        "product_tilt0.5": ["--context_answer", "product", "--virtual_tilt", "0.5"],
        "product_tilt1": ["--context_answer", "product", "--virtual_tilt", "1"],
        "factors4": ["--context_factors", "4"]}
    assert g.baseline == "concat" and g.base[g.base.index("--question_split") + 1] == "0.2"
    assert g.base[g.base.index("--comm_round") + 1] == "300"


def test_group_factors_preset_compares_the_fold_in_head_and_question_ids_on_seen_questions():
    g = PRESETS["group_factors"]
    assert g.seeds == [0, 1] and g.variants == {"concat": [], "factors4": ["--context_factors", "4"],
                                                "ids": ["--question_ids"],
                                                "ids_factors4": ["--question_ids", "--context_factors", "4"]}
    assert g.baseline == "concat" and "--question_split" not in g.base
    assert g.base[g.base.index("--comm_round") + 1] == "300"


def test_snr_is_signal_over_noise_per_logged_round():
    from reporting.compare import _snr
    from reporting.runs import Run
    run = Run(path=None, status="finished", losses=[
        {"round": 1, "dp_signal_norm": 0.1, "dp_noise_norm": 0.5},
        {"round": 2, "dp_signal_norm": 0.05, "dp_noise_norm": 0.0},   # clip only: no ratio
        {"round": 3, "train_loss": 1.0},                              # a run before the norms were logged
        {"round": 4, "dp_signal_norm": 0.08, "dp_noise_norm": 0.25}])
    assert _snr(run) == [(1, 0.2), (4, 0.32)]


def test_a_variant_that_diverges_is_reported_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    from reporting.sweep import Preset
    # "boom" diverges at once (lr 10), like a DP noise level that drives the weights to overflow
    monkeypatch.setitem(PRESETS, "toy", Preset(base=[], variants={"ok": [], "boom": ["--lr", "10"]},
                                               baseline="ok", title="toy", report=str(tmp_path / "toy.md")))
    argv = ["--preset", "toy", "--seeds", "0", "1", "--extra", TINY + " --wandb off --quiet",
            "--out_root", str(tmp_path / "runs")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("failed  ") == 2 and "the sweep goes on" in out
    rounds = []
    for seed in (0, 1):  # the seed after a diverged run still trains
        assert (tmp_path / "runs" / f"ok_s{seed}" / "summary.json").is_file()
        rounds.append(json.loads((tmp_path / "runs" / f"boom_s{seed}" / "failed.json").read_text())["round"])
    where = f"seed 0 at round {rounds[0]}, seed 1 at round {rounds[1]}"
    report = (tmp_path / "toy.md").read_text()
    assert "from 2 finished run folders and 2 that diverged" in report
    assert f"| – | {where} | 0 |" in report and f"2 of 2 seeds diverged: {where}." in report
    assert main(argv) == 0  # a rerun does not retrain what diverged: it would diverge the same way
    assert capsys.readouterr().out.count("not retried") == 2
