"""kill -9 a real training process mid-run, rerun the same command with --resume, and get
exactly the numbers of an uninterrupted run (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--syn_groups", "6", "--syn_questions", "40", "--syn_dim", "16",
         "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1",
         "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10",
         "--eval_num_qs", "5", "--wandb", "off", "--quiet", "--device", "cpu"]
COMMANDS = {
    "fedavg": ["main_fl.py", "--comm_round", "40", "--federated_eval", "4", "--epochs", "2"],
    "centralized": ["main_centralized.py", "--central_epochs", "60", "--eval_freq", "4"],
}


def env():
    return {**os.environ, "PYTHONHASHSEED": "0", "WANDB_MODE": "disabled"}


def command(method, out, *extra):
    script, *flags = COMMANDS[method]
    return [sys.executable, str(ROOT / script), *SMALL, *flags, "--out_dir", str(out), *extra]


def finish(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def kill_after(cmd, losses: Path, rows: int) -> None:
    """Start the run and SIGKILL it once `rows` rounds are logged (between two checkpoints)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if losses.exists() and losses.read_bytes().count(b"\n") >= rows:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed; give it more rounds"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def lines(path: Path, drop=("wall_time_s",)) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


# centralized --dropout draws from torch's global generator (FedAvg clients reseed it per client and
# round), which the checkpoint saves and a resume restores
@pytest.mark.parametrize("method, extra", [("fedavg", []), ("centralized", []), ("centralized", ["--dropout", "0.1"])])
def test_kill_9_then_resume_gives_the_uninterrupted_numbers(tmp_path, method, extra):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    finish(command(method, full, *extra))
    kill_after(command(method, crashed, *extra), crashed / "losses.jsonl", rows=14)
    assert not (crashed / "summary.json").exists()  # nothing left looking complete
    logged = lines(crashed / "losses.jsonl")
    assert 14 <= len(logged) < len(lines(full / "losses.jsonl"))
    out = finish(command(method, crashed, *extra, "--resume")).stdout
    assert "resumed from checkpoint round_000" in out
    for name in ("metrics.jsonl", "losses.jsonl"):
        assert lines(crashed / name) == lines(full / name), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, crashed))
    assert {k: v for k, v in a.items() if k != "wall_time_s"} == {k: v for k, v in b.items() if k != "wall_time_s"}


def test_resume_without_out_dir_picks_the_latest_run_with_the_same_config(tmp_path):
    """--resume alone continues the newest unfinished run under runs/ whose flags match."""
    script, *flags = COMMANDS["fedavg"]
    base = [sys.executable, str(ROOT / script), *SMALL, *flags]
    work = tmp_path / "work"
    work.mkdir()

    def run_in(cmd, **kw):
        return subprocess.run(cmd, cwd=work, env={**env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=300, **kw)

    other = run_in([*base, "--seed", "1", "--comm_round", "4"])  # another config: never picked
    assert other.returncode == 0, other.stderr
    proc = subprocess.Popen(base, cwd=work, env={**env(), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            found = [p for p in (work / "runs").glob("*_fedavg_s0/losses.jsonl") if p.read_bytes().count(b"\n") >= 9]
            if found:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (crashed,) = [p.parent for p in (work / "runs").glob("*_fedavg_s0/config.json")]
    resumed = run_in([*base, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing run runs/{crashed.name}" in resumed.stdout
    assert (crashed / "summary.json").exists()
    again = run_in([*base, "--resume"])
    assert "already finished" in again.stdout and again.returncode == 0
    assert len(list((work / "runs").iterdir())) == 2  # no new folder was made


def test_resume_with_other_flags_is_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    finish(command("fedavg", out, "--comm_round", "2"))
    proc = subprocess.run(command("fedavg", out, "--comm_round", "2", "--lr", "1e-3", "--resume"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--resume: the flags differ from the run in" in proc.stderr and "lr: 0.0003 -> 0.001" in proc.stderr


def test_fresh_run_into_a_used_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    finish(command("fedavg", out, "--comm_round", "2"))
    before = (out / "metrics.jsonl").read_bytes()
    proc = subprocess.run(command("fedavg", out, "--comm_round", "2"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
