"""Runs left alone for hours: bounded disk, one process per run folder, a divergence guard,
clean interrupts, progress lines in log files, and the bad inputs a new user hit."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script

from orchestration.entry import main
from utils.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--syn_groups", "6", "--syn_questions", "40", "--syn_dim", "16",
         "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1",
         "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10",
         "--eval_num_qs", "5", "--wandb", "off", "--quiet", "--device", "cpu", "--no_plots"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def env():
    return {**os.environ, "PYTHONHASHSEED": "0", "WANDB_MODE": "disabled"}


def records(path: Path, drop=("wall_time_s",)) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------
# 1. disk


def test_pruning_bounds_disk_and_keeps_the_numbers(tmp_path):
    """100 rounds, a checkpoint every 10: --keep_checkpoints 3 keeps rounds 80, 90, 100 (final and
    best are indexes naming those files), the unpruned run keeps all 11, and the logs agree."""
    flags = [*SMALL, "--comm_round", "100", "--federated_eval", "10", "--epochs", "1"]
    assert main("fedavg", [*flags, "--out_dir", str(tmp_path / "pruned"), "--keep_best"]) == 0
    assert main("fedavg", [*flags, "--out_dir", str(tmp_path / "all"), "--keep_checkpoints", "1000"]) == 0
    pruned, full = tmp_path / "pruned" / "checkpoints", tmp_path / "all" / "checkpoints"
    rounds = sorted(p.stem for p in pruned.glob("round_*.json"))
    assert rounds == ["round_00080", "round_00090", "round_00100"]
    assert len(list(full.glob("round_*.json"))) == 11
    per_checkpoint = sum(f.stat().st_size for f in full.glob("round_00100.*"))
    best = json.loads((pruned / "best.json").read_text())
    kept_files = 3 + (best["alias_of"] not in rounds)
    assert folder_bytes(pruned) <= kept_files * per_checkpoint + 50_000  # indexes are a few hundred bytes
    assert folder_bytes(full) > 10 * per_checkpoint
    final = json.loads((pruned / "final.json").read_text())
    assert final["alias_of"] == "round_00100" and not (pruned / "final.safetensors").exists()
    for name in ("metrics.jsonl", "losses.jsonl"):
        assert records(tmp_path / "pruned" / name) == records(tmp_path / "all" / name)
    w_final, _, meta = load_checkpoint(pruned, "final")
    w_full = load_checkpoint(full, "round_00100")[0]
    assert meta["round"] == 100 and all((w_final[k] == w_full[k]).all() for k in w_full)
    metrics = records(tmp_path / "pruned" / "metrics.jsonl")
    top = max(metrics, key=lambda r: r["eval_alignment_score"])
    assert best["round"] == top["round"] and (pruned / best["files"]["model"]["name"]).exists()
    assert latest_checkpoint(pruned) in ("round_00100", "final")


# ---------------------------------------------------------------------------------------
# 2. one process per run folder


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        assert proc.poll() is None, f"the process ended before {what}: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


def test_a_second_process_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    """Two `--resume` runs of one interrupted folder would both train and append: the second is
    refused, names the first one's PID, and writes nothing."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_fl.py"), *SMALL, "--comm_round", "400", "--federated_eval", "50",
           "--epochs", "1", "--out_dir", str(out)]
    first = _start(cmd)
    try:
        lock = out / ".lock"
        _wait_for(lambda: lock.exists() and f'"pid": {first.pid}' in lock.read_text(), first, "the lock")
        _wait_for(lambda: (out / "losses.jsonl").exists(), first, "the first round")
        before = (out / "losses.jsonl").read_bytes()
        second = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is in use by process {first.pid}" in second.stderr and "hint:" in second.stderr
        assert (out / "losses.jsonl").read_bytes().startswith(before)  # only the first process appends
    finally:
        _stop(first)  # kill -9
    # the kernel dropped the dead holder's lock: the folder resumes and finishes
    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "summary.json").exists()


def test_a_log_written_twice_names_the_file_and_the_repair(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*SMALL, "--comm_round", "6", "--federated_eval", "2", "--epochs", "1"]
    assert main("fedavg", [*flags, "--comm_round", "4", "--out_dir", str(out)]) == 0
    for f in (out / "summary.json", *out.joinpath("checkpoints").glob("final*")):
        f.unlink()
    losses = out / "losses.jsonl"
    rows = losses.read_text().splitlines(keepends=True)
    losses.write_text("".join(rows[:3] + rows[1:]))  # rounds 1 2 3 2 3 4: two writers interleaved
    capsys.readouterr()
    assert main("fedavg", [*flags, "--comm_round", "4", "--out_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(losses) in err and "round 2 after round 3" in err and "python scripts/repair_logs.py" in err
    repair = load_script("scripts/repair_logs.py").main
    assert repair([str(out)]) == 0
    assert [r["round"] for r in records(losses)] == [1, 2, 3, 4]
    assert main("fedavg", [*flags, "--comm_round", "4", "--out_dir", str(out), "--resume"]) == 0


# ---------------------------------------------------------------------------------------
# 3. divergence


def test_a_diverging_run_stops_naming_round_and_client_and_is_marked_failed(tmp_path, capsys):
    out = tmp_path / "nan"
    assert main("fedavg", [*SMALL, "--comm_round", "20", "--federated_eval", "5", "--epochs", "2",
                           "--lr", "1", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "training diverged at round 1: loss is nan" in err and "client 'g" in err
    assert "--grad_clip" in err and "Traceback" not in err
    failed = json.loads((out / "failed.json").read_text())
    assert failed["round"] == 1 and failed["client"].startswith("g") and not (out / "summary.json").exists()
    assert all(r["round"] == 0 for r in records(out / "metrics.jsonl"))  # nothing non-finite was logged
    # not mistaken for an interrupted run
    assert main("fedavg", [*SMALL, "--comm_round", "20", "--federated_eval", "5", "--epochs", "2",
                           "--lr", "1", "--out_dir", str(out), "--resume"]) == 2
    assert "failed" in capsys.readouterr().err


def test_centralized_divergence_is_caught_too(tmp_path, capsys):
    assert main("centralized", [*SMALL, "--central_epochs", "5", "--eval_freq", "5", "--lr", "10",
                                "--out_dir", str(tmp_path / "c")]) == 2
    assert "training diverged at round 1" in capsys.readouterr().err
    assert (tmp_path / "c" / "failed.json").exists()


def test_nan_predictions_at_evaluation_are_a_divergence_whose_hint_names_the_dp_noise(tmp_path, capsys):
    """Noise of std 1e9/m leaves the weights finite (no loss or weight is NaN) but the predictions
    are not: the same guard as a NaN loss, failed.json, and a hint about the noise."""
    out = tmp_path / "noisy"
    flags = [*SMALL, "--comm_round", "3", "--federated_eval", "1", "--epochs", "1", "--dp", "--weighting", "uniform",
             "--dp_noise", "1e9", "--out_dir", str(out)]
    assert main("fedavg", flags) == 2
    err = capsys.readouterr().err
    assert "training diverged at round 1: predictions are NaN/inf at evaluation" in err and "Traceback" not in err
    assert "hint: --dp_noise 1e+09 adds Gaussian noise" in err and "lower --dp_noise" in err
    assert json.loads((out / "failed.json").read_text())["round"] == 1
    assert main("fedavg", [*flags, "--resume"]) == 2
    assert "failed" in capsys.readouterr().err


def test_grad_clip_bounds_the_step_and_is_off_by_default(tmp_path):
    import torch

    from data_loaders.episodes import EpisodeSizes, sample_episode
    from data_loaders.schema import build_group_data
    from data_loaders.synthetic import SyntheticSpec, make_synthetic
    from models.gpo import GPO, GPOConfig
    from training.local import OptimConfig, OptimState, adam_step, make_adam

    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=30, dim=8))
    group = build_group_data(raw, "g00", x)
    torch.manual_seed(0)
    model = GPO(GPOConfig(dim_x=8, d_model=16, dim_feedforward=16, nhead=2, num_layers=1))
    ep = sample_episode(group, EpisodeSizes(3, 10, 3, 10), torch.Generator().manual_seed(0))
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def grad_norm_after_step(clip):
        model.load_state_dict(start)
        cfg = OptimConfig(grad_clip=clip)
        adam_step(model, make_adam(model, cfg, OptimState()), ep, cfg, OptimState())
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))

    unclipped = grad_norm_after_step(0.0)
    assert unclipped > 0.5
    assert grad_norm_after_step(0.5) == pytest.approx(0.5, rel=1e-4)
    assert grad_norm_after_step(1e9) == unclipped  # a bound above the norm changes nothing


# ---------------------------------------------------------------------------------------
# 4. interrupts


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_with_one_line_and_resume(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_fl.py"), *SMALL, "--comm_round", "400", "--federated_eval", "5",
           "--epochs", "1", "--log_every", "1", "--out_dir", str(out)]
    proc = _start(cmd)
    try:
        _wait_for(lambda: len(list((out / "checkpoints").glob("round_00005.json"))) == 1, proc, "a checkpoint")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.strip()]
    assert line.startswith("interrupted at round ") and "rerun the same command with --resume" in line
    assert not (out / "summary.json").exists() and not (out / "failed.json").exists()
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint round_" in resumed.stdout and (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------
# 5. progress lines in log files


def test_progress_lines_when_output_is_not_a_terminal(tmp_path, capsys):
    assert main("fedavg", [*SMALL, "--comm_round", "6", "--federated_eval", "3", "--epochs", "1",
                           "--log_every", "2", "--out_dir", str(tmp_path / "r")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fedavg round ")]
    assert [line.split()[2] for line in lines] == ["2/6", "3/6", "4/6", "6/6"]  # every 2 rounds and each evaluation
    for line in lines:
        assert " | loss " in line and " s/round, ETA " in line
    assert "eval alignment" in lines[1] and "(worst group " in lines[1]
    assert lines[2].endswith("ETA 0m00s") or "at round 3" in lines[2]


# ---------------------------------------------------------------------------------------
# 6. flags checked before anything is loaded or written


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--round_timeout", "inf"), ("--round_timeout", "nan"),
                                         ("--grad_clip", "nan")])
def test_non_finite_float_flags_are_refused_before_anything_is_written(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert main("fedavg", [*SMALL, flag, value, "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {float(value)} is not a finite number" in err and "hint:" in err
    assert not out.exists()


def test_an_unknown_device_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    assert main("fedavg", [*SMALL, "--device", "mps", "--out_dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert "--device 'mps' is not one of auto, cpu, cuda, cuda:N" in captured.err
    assert "loaded" not in captured.out and not out.exists()


def test_an_empty_group_list_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main("fedavg", [*SMALL, "--train_groups", ""])
    assert exc.value.code == 2
    assert "--train_groups: '' names no group" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--keep_checkpoints", "0"), ("--central_steps", "0"),
                                         ("--log_every", "-1"), ("--grad_clip", "-1")])
def test_new_flags_are_range_checked(tmp_path, capsys, flag, value):
    assert main("fedavg", [*SMALL, flag, value, "--out_dir", str(tmp_path / "r")]) == 2
    assert f"{flag} {value}" in capsys.readouterr().err
