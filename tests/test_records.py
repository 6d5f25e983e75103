"""Run records (orchestration/records.py) and their verified reuse by scripts/reproduce.py and
scripts/sweep.py: deterministic and small, the one path mapping, reused without training,
refused when their flags differ, stale when a replay's losses move, reports from records alone
equal to reports from the run folders, --status, --commit_records, --jobs."""
from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from data_loaders.schema import DataError
from orchestration import records, resume
from orchestration.cli import build_parser
from orchestration.config import run_config
from orchestration.replay import compare_losses, relative_difference, tolerance_for
from reporting import reproduce
from reporting.jobs import resolve_jobs
from utils.jsonl_log import read_metrics

TINY = ["--dataset", "synthetic", "--syn_groups", "5", "--syn_questions", "30", "--syn_dim", "8",
        "--d_model", "8", "--dim_feedforward", "8", "--num_layers", "1", "--nhead", "2", "--emb_depth", "2",
        "--epochs", "2", "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "6", "--min_tar_num_qs", "3",
        "--max_tar_num_qs", "6", "--eval_num_qs", "5", "--comm_round", "4", "--central_epochs", "4",
        "--federated_eval", "2", "--eval_freq", "2", "--wandb", "off", "--quiet", "--no_plots",
        "--methods", "fedavg", "centralized", "--jobs", "1"]


def _argv(root: Path, records_dir: Path, seeds=("0",), *more: str) -> list[str]:
    return [*TINY, "--seeds", *seeds, "--out_root", str(root), "--records_dir", str(records_dir),
            "--results_dir", str(root.parent / "report"), "--name", "tiny", *more]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Seed 0 of FedAvg and centralized, trained once: (run folders' root, records' root)."""
    base = tmp_path_factory.mktemp("trained")
    root, rec = base / "runs" / "reproduce" / "tiny", base / "results"
    assert reproduce.main(_argv(root, rec)) == 0
    return root, rec / "reproduce" / "tiny"


@pytest.fixture
def copied(trained, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the records (and an empty place for run folders) for one test."""
    rec = tmp_path / "results"
    shutil.copytree(trained[1], rec / "reproduce" / "tiny")
    return tmp_path / "runs" / "reproduce" / "tiny", rec


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("trained a run that has a verified record")
    real = reproduce.run_method
    monkeypatch.setattr(reproduce, "run_method", refuse)
    return real


# ----------------------------------------------------------------------------------------
# the record itself


def test_record_path_maps_runs_to_results(tmp_path):
    assert records.record_path("runs/reproduce/opinionqa_paper/fedavg_s0", "results") == Path(
        "results/reproduce/opinionqa_paper/fedavg_s0")
    assert records.record_path("/scratch/u/runs/sweeps/strategies/median_s2", tmp_path) == (
        tmp_path / "sweeps" / "strategies" / "median_s2")
    assert records.source_name(tmp_path / "sweeps" / "x_s0", tmp_path) == "runs/sweeps/x_s0"
    for bad in ("elsewhere/fedavg_s0", "runs"):
        with pytest.raises(DataError, match="not inside a folder named runs/"):
            records.record_path(bad, "results")


def test_record_is_deterministic_small_and_complete(trained, tmp_path):
    root, rec = trained
    record = rec / "fedavg_s0"
    assert sorted(p.name for p in record.iterdir()) == [
        "config.json", "losses.jsonl.gz", "metrics.jsonl.gz", "record.json", "summary.json"]
    for name in ("config.json", "summary.json"):
        assert (record / name).read_bytes() == (root / "fedavg_s0" / name).read_bytes()
    for name in ("metrics.jsonl", "losses.jsonl"):
        raw = (record / f"{name}.gz").read_bytes()
        assert gzip.decompress(raw) == (root / "fedavg_s0" / name).read_bytes()
        assert raw[3] == 0 and raw[4:8] == b"\0\0\0\0"  # no file name flag, mtime 0
    info = json.loads((record / "record.json").read_text())
    env = json.loads((record / "config.json").read_text())["environment"]
    assert (info["cpu_model"], info["torch_threads"], info["torch"]) == (env["cpu_model"], env["torch_threads"],
                                                                          env["torch"])
    assert info["source"] == "runs/reproduce/tiny/fedavg_s0" and info["status"] == "finished"
    total = sum(p.stat().st_size for p in record.iterdir())
    assert total <= records.MAX_BYTES

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in record.iterdir()}
    records.write_record(root / "fedavg_s0", rec.parent.parent)   # unchanged: left alone
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in record.iterdir()} == before
    fresh = tmp_path / "again"
    again = records.write_record(root / "fedavg_s0", fresh)       # written anew: the same bytes
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {k: v[0] for k, v in before.items()}
    assert read_metrics(record / "losses.jsonl.gz") == read_metrics(root / "fedavg_s0" / "losses.jsonl")


def test_interrupted_runs_are_never_recorded_and_diverged_ones_keep_failed_json(trained, tmp_path, capsys):
    run = tmp_path / "runs" / "x" / "fedavg_s0"
    shutil.copytree(trained[0] / "fedavg_s0", run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "summary.json").unlink()
    assert records.main([str(run), "--records_dir", str(tmp_path / "results")]) == 2
    assert "interrupted run (no summary.json, no failed.json)" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    (run / "failed.json").write_text(json.dumps({"reason": "training diverged at round 3", "round": 3}))
    assert records.main([str(run), "--records_dir", str(tmp_path / "results")]) == 0
    record = tmp_path / "results" / "x" / "fedavg_s0"
    assert (record / "failed.json").is_file() and not (record / "summary.json").exists()
    assert json.loads((record / "record.json").read_text())["status"] == "diverged"


def test_compare_losses_exact():
    rec = [{"round": 1, "train_loss": 2.0, "train_loss_per_client": {"a": 1.0, "b": 3.0}},
           {"round": 2, "train_loss": 1.0, "train_loss_per_client": {"a": 0.5, "b": 1.5}}]
    rep = json.loads(json.dumps(rec))
    rep[1]["train_loss_per_client"]["b"] = 1.5 * (1 + 2e-6)
    c = compare_losses(rec, rep)
    assert (c.ok, c.values) == (True, 6) and c.max_rel == pytest.approx(2e-6 / (1 + 2e-6))
    rep[1]["train_loss_per_client"]["a"] = 0.5 * 1.001
    c = compare_losses(rec, rep)
    assert not c.ok and c.first_diff.startswith("round 2 train_loss_per_client['a']: record 0.5, replay 0.5005")
    del rep[0]["train_loss_per_client"]["b"]
    assert compare_losses(rec, rep).first_diff.startswith("round 1 train_loss_per_client['b']: record 3.0, "
                                                          "replay None")


# ----------------------------------------------------------------------------------------
# reuse by scripts/reproduce.py


def test_a_record_is_reused_without_training(copied, monkeypatch, capsys):
    root, rec = copied
    _no_training(monkeypatch)
    assert reproduce.main(_argv(root, rec)) == 0
    out = capsys.readouterr().out
    assert "plan: 2 record" in out
    assert out.count(": verified; replay of 2 rounds:") == 2 and "largest relative difference 0 " in out
    assert not any(p.is_dir() for p in root.iterdir())  # no run folder: nothing trained
    manifest = json.loads((root / "reproduce.json").read_text())
    assert manifest["sessions"][-1]["from_records"] == ["fedavg_s0", "centralized_s0"]
    assert "tiny.md" in {p.name for p in (root.parent / "report").iterdir()}


def test_a_record_whose_flags_differ_is_not_reused(copied, capsys):
    root, rec = copied
    assert reproduce.main(_argv(root, rec, ("0",), "--lr", "0.001")) == 0
    out = capsys.readouterr().out
    assert "was made with other flags (record -> planned: lr: 0.0003 -> 0.001); not reused: planned to run" in out
    assert "plan: 2 fresh" in out and (root / "fedavg_s0" / "summary.json").is_file()
    assert json.loads((rec / "reproduce" / "tiny" / "fedavg_s0" / "config.json").read_text())["lr"] == 0.001


def _edit_loss(record: Path, factor: float | None = None, ulp: bool = False) -> None:
    path = record / "losses.jsonl.gz"
    rows = read_metrics(path)
    x = rows[0]["train_loss"]
    rows[0]["train_loss"] = math.nextafter(x, math.inf) if ulp else x * factor
    path.write_bytes(records.gzip_bytes("".join(json.dumps(r) + "\n" for r in rows).encode()))


def test_a_record_whose_losses_moved_is_stale(copied, monkeypatch, capsys):
    root, rec = copied
    record = rec / "reproduce" / "tiny" / "fedavg_s0"
    original = (record / "losses.jsonl.gz").read_bytes()
    _edit_loss(record, ulp=True)  # one ulp: far inside 1e-5, accepted and said
    real = _no_training(monkeypatch)
    assert reproduce.main(_argv(root, rec)) == 0
    out = capsys.readouterr().out
    assert re.search(r"fedavg_s0: verified; replay of 2 rounds: 8 losses, largest relative difference [12]\.\de-16 ",
                     out), out
    (record / "losses.jsonl.gz").write_bytes(original)
    _edit_loss(record, factor=1 + 1e-4)  # beyond 1e-5: stale, and nothing trains
    assert reproduce.main(_argv(root, rec)) == 2
    err = capsys.readouterr().err
    assert "1 record(s) are stale" in err and "results/reproduce/tiny/fedavg_s0: replay of 2 rounds: first " \
                                                 "value beyond 1e-05: round 1 train_loss: record" in err
    assert "recorded on" in err and "replayed on" in err and "--rerun_stale" in err
    assert not (root / "fedavg_s0").exists() and not (root / "centralized_s0").exists()

    monkeypatch.setattr(reproduce, "run_method", real)
    assert reproduce.main(_argv(root, rec, ("0",), "--rerun_stale")) == 0
    out = capsys.readouterr().out
    assert "--rerun_stale: fedavg seed 0 is planned to fresh" in out and "plan: 1 fresh, 1 record" in out
    assert (record / "losses.jsonl.gz").read_bytes() == original  # retrained: the record as it was


def test_a_record_from_another_cpu_model_is_replayed_within_1e_3(copied, monkeypatch, capsys):
    """Another CPU model's kernels move 2-round losses by up to ~5e-5 (orchestration/replay.py): a
    record made there passes at 1e-4 and is still stale at 1e-2."""
    root, rec = copied
    record = rec / "reproduce" / "tiny" / "fedavg_s0"
    info = json.loads((record / "record.json").read_text())
    (record / "record.json").write_text(json.dumps({**info, "cpu_model": "Some Other CPU"}))
    original = (record / "losses.jsonl.gz").read_bytes()
    _no_training(monkeypatch)
    _edit_loss(record, factor=1 + 1e-4)
    assert reproduce.main(_argv(root, rec)) == 0
    out = capsys.readouterr().out
    assert re.search(r"fedavg_s0: verified; replay of 2 rounds: 8 losses, largest relative difference [0-9.e-]+ "
                     r"\(tolerance 0\.001\); recorded on Some Other CPU with \d+ torch thread\(s\), replayed on ", out), out
    assert "centralized_s0: verified" in out and "(tolerance 1e-05)" in out
    (record / "losses.jsonl.gz").write_bytes(original)
    _edit_loss(record, factor=1 + 1e-2)
    assert reproduce.main(_argv(root, rec)) == 2
    assert "first value beyond 0.001: round 1 train_loss" in capsys.readouterr().err


def test_a_round_s_losses_are_compared_on_its_largest_loss():
    # round 1 of an OpinionQA run: clients from -28 to +28 whose mean cancels to -2.5; a move of
    # 2e-3 in the mean is 8e-4 of itself but 7e-5 of the round's scale
    rec = [{"round": 1, "train_loss": -2.528, "train_loss_per_client": {"a": -28.0, "b": 22.944}}]
    rep = [{"round": 1, "train_loss": -2.526, "train_loss_per_client": {"a": -28.0, "b": 22.944}}]
    c = compare_losses(rec, rep, tolerance=1e-3)
    assert c.ok and c.max_rel == pytest.approx(2e-3 / 28)
    assert not compare_losses(rec, rep, tolerance=5e-5).ok


def test_tolerance_depends_on_the_cpu_model_and_small_values_compare_absolutely():
    assert tolerance_for("AMD EPYC", "AMD EPYC") == 1e-5
    assert tolerance_for("AMD EPYC", "Intel(R) Xeon(R) Processor") == 1e-3
    assert tolerance_for(None, "AMD EPYC") == 1e-3  # a record that did not say where it ran
    # a group specificity of 2e-6 moving by 7e-9 is no relative difference of 3.5e-3
    assert relative_difference(-2.0336e-6, -2.0408e-6) == pytest.approx(7.2e-9 / 1e-3)
    assert relative_difference(40.0, 40.0004) == pytest.approx(1e-5, rel=1e-3)
    assert relative_difference(float("nan"), 1.0) == math.inf and relative_difference(float("nan"), float("nan")) == 0


def test_status_lists_the_plan_against_the_records(copied, capsys):
    root, rec = copied
    shutil.copytree(rec / "reproduce" / "tiny" / "centralized_s0", rec / "reproduce" / "tiny" / "centralized_s1")
    cfg_path = rec / "reproduce" / "tiny" / "centralized_s1" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["seed"] = 1
    cfg["lr"] = 0.01
    cfg_path.write_text(json.dumps(cfg))
    assert reproduce.main(_argv(root, rec, ("0", "1"), "--status")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("finished") and "fedavg_s0" in ln for ln in lines)
    assert any(ln.startswith("missing") and "fedavg_s1" in ln for ln in lines)
    assert any(ln.startswith("stale-config") and "centralized_s1" in ln and "lr: 0.01 -> 0.0003" in ln
               for ln in lines)
    assert "4 planned: 2 finished, 0 diverged, 1 stale-config, 1 missing" in lines[-1]
    assert not root.exists()  # --status writes nothing


def _set_config(record: Path, **keys) -> dict:
    path = record / "config.json"
    cfg = {**json.loads(path.read_text()), **keys}
    path.write_text(json.dumps(cfg))
    return cfg


def test_removed_flags_at_their_retired_default_are_no_difference(copied, capsys):
    """Committed records carry "model": "gpo", "vmap_chunk": 0 and "precision": "fp32" (also in model_config)
    from before those flags were removed."""
    root, rec = copied
    for run in ("fedavg_s0", "centralized_s0"):
        cfg = _set_config(rec / "reproduce" / "tiny" / run, model="gpo", vmap_chunk=0, precision="fp32")
        cfg = _set_config(rec / "reproduce" / "tiny" / run, model_config={**cfg["model_config"], "precision": "fp32"})
    assert reproduce.main(_argv(root, rec, ("0",), "--status")) == 0
    assert "2 planned: 2 finished, 0 diverged, 0 stale-config" in capsys.readouterr().out.splitlines()[-1]
    bare = {k: v for k, v in cfg.items() if k not in ("model", "vmap_chunk", "precision")}
    bare["model_config"] = {k: v for k, v in cfg["model_config"].items() if k != "precision"}
    assert resume.fingerprint(cfg) == resume.fingerprint(bare) and resume.differences(cfg, bare) == []


def test_a_record_or_run_with_a_retired_setting_is_refused_naming_it(copied, capsys, tmp_path):
    root, rec = copied
    vmap = _set_config(rec / "reproduce" / "tiny" / "fedavg_s0", client_engine="vmap")
    _set_config(rec / "reproduce" / "tiny" / "centralized_s0", precision="bf16_input")
    assert reproduce.main(_argv(root, rec, ("0",), "--status")) == 0
    lines = capsys.readouterr().out.splitlines()
    for run, why in (("fedavg_s0", "client_engine: 'vmap' was retired"),
                     ("centralized_s0", "precision: 'bf16_input' was retired")):
        assert any(ln.startswith("stale-config") and run in ln and why in ln for ln in lines), (run, lines)
    assert resume.differences({**vmap, "client_engine": "auto", "vmap_chunk": 4}, vmap) == [
        "vmap_chunk: 4 was retired (issue 25; benchmarks/README.md says why)"]
    assert resume.differences({**vmap, "client_engine": "auto", "precision": "bf16"}, vmap) == [
        "precision: 'bf16' was retired (issue 25; benchmarks/README.md says why)"]
    folder = tmp_path / "interrupted"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(vmap))
    with pytest.raises(DataError, match="no longer runs: client_engine: 'vmap' was retired"):
        run = run_config(build_parser("fedavg").parse_args(["--resume", "--out_dir", str(folder)]), "fedavg")
        resume.plan_run(run, {**vmap, "client_engine": "loop"}, out_dir=folder)


def test_report_from_records_equals_report_from_run_folders(trained, tmp_path, monkeypatch):
    root, rec = tmp_path / "runs" / "reproduce" / "tiny", tmp_path / "results"
    shutil.copytree(trained[0], root, ignore=shutil.ignore_patterns("checkpoints", "reproduce.json", ".lock"))
    shutil.copytree(trained[1], rec / "reproduce" / "tiny")
    # Fig. 3 needs weights, which records do not carry, and reproduce.json belongs to the out_root,
    # not to a run: both left out of the folders, so that what is compared is what records hold.
    argv = [*TINY, "--seeds", "0", "--report_only", "--out_root", str(root), "--results_dir", str(tmp_path / "rep"),
            "--name", "tiny"]
    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path / "no_records"))
    assert reproduce.main(argv) == 0
    from_folders = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    shutil.rmtree(tmp_path / "rep")
    shutil.rmtree(root)
    monkeypatch.setenv(records.RECORDS_ENV, str(rec))
    assert reproduce.main(argv) == 0
    from_records = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    assert set(from_records) == set(from_folders) and "tiny.md" in from_records
    for name in ("tiny.md", "tiny_table.md", "tiny_table.csv"):
        assert from_records[name] == from_folders[name], name
    assert b"partial" not in from_records["tiny.md"]


def test_a_partial_plan_is_labelled(copied, capsys):
    root, rec = copied
    argv = [*TINY, "--seeds", "0", "1", "--report_only", "--out_root", str(root), "--records_dir", str(rec),
            "--results_dir", str(root.parent / "rep"), "--name", "tiny"]
    assert reproduce.main(argv) == 0
    assert "report: 1 of 2 seeds finished; partial" in capsys.readouterr().out
    lines = (root.parent / "rep" / "tiny.md").read_text().splitlines()
    assert lines[0].endswith("(1 of 2 seeds finished; partial)")
    assert lines[2].startswith("**1 of 2 seeds finished; partial**: the numbers below cover the finished runs only")
    assert (root.parent / "rep" / "tiny_table.md").read_text().startswith(
        "# tiny: results over seeds (1 of 2 seeds finished; partial)")


# ----------------------------------------------------------------------------------------
# --commit_records, --jobs, the sweep, the paper_unseen preset


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_commit_records_commits_only_the_record(trained, tmp_path, monkeypatch, capsys):
    for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(k, "test")
    for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(k, "test@example.com")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("work in progress\n")
    _git(repo, "add", "notes.txt")
    _git(repo, "commit", "-q", "-m", "start")
    (repo / "notes.txt").write_text("edited, not to be committed\n")
    (repo / "staged.txt").write_text("staged by someone else\n")
    _git(repo, "add", "staged.txt")
    run = tmp_path / "runs" / "reproduce" / "tiny" / "fedavg_s0"
    shutil.copytree(trained[0] / "fedavg_s0", run, ignore=shutil.ignore_patterns("checkpoints"))

    assert records.main([str(run), "--records_dir", str(tmp_path / "no_repo"), "--commit_records"]) == 2
    assert not (tmp_path / "no_repo").exists()  # refused before anything is written
    assert records.main([str(run), "--records_dir", str(repo / "results"), "--commit_records"]) == 0
    assert _git(repo, "log", "-1", "--format=%s").strip() == "record: results/reproduce/tiny/fedavg_s0"
    assert sorted(_git(repo, "show", "--name-only", "--format=", "HEAD").split()) == [
        f"results/reproduce/tiny/fedavg_s0/{f}" for f in
        ("config.json", "losses.jsonl.gz", "metrics.jsonl.gz", "record.json", "summary.json")]
    status = _git(repo, "status", "--porcelain")
    assert " M notes.txt" in status and "A  staged.txt" in status  # left as they were
    commits = _git(repo, "rev-list", "--count", "HEAD")
    assert records.main([str(run), "--records_dir", str(repo / "results"), "--commit_records"]) == 0
    assert _git(repo, "rev-list", "--count", "HEAD") == commits  # unchanged: nothing to commit

    # the pipeline commits each record it writes, here for the finished folders it reuses (fedavg_s0's
    # record is committed already and unchanged)
    root = run.parent
    shutil.copytree(trained[0] / "centralized_s0", root / "centralized_s0", ignore=shutil.ignore_patterns("checkpoints"))
    assert reproduce.main(_argv(root, repo / "results", ("0",), "--commit_records")) == 0
    assert _git(repo, "log", "-2", "--format=%s").split("\n")[:2] == [
        "record: results/reproduce/tiny/centralized_s0", "record: results/reproduce/tiny/fedavg_s0"]
    assert int(_git(repo, "rev-list", "--count", "HEAD")) == int(commits) + 1
    assert " M notes.txt" in _git(repo, "status", "--porcelain")

    (repo / ".git" / "index.lock").write_text("")  # another git process at work, for longer than we wait
    (run / "summary.json").write_text((run / "summary.json").read_text().replace("}", ', "x": 1}', 1))
    record = records.write_record(run, repo / "results")
    with pytest.raises(DataError, match="git could not commit results/reproduce/tiny/fedavg_s0"):
        records.commit_record(record, attempts=2, wait_s=0)


def test_jobs_share_the_cores():
    assert resolve_jobs(None, 0, 2) == (2, 1)   # the measured default on 2 cores
    assert resolve_jobs(None, 0, 1) == (1, 0)
    assert resolve_jobs(None, 0, 16) == (2, 8)
    assert resolve_jobs(1, 0, 2) == (1, 0) and resolve_jobs(3, 0, 16) == (3, 5)
    with pytest.raises(DataError, match="--jobs 2 x --threads 2 = 4 threads on 2 cores"):
        resolve_jobs(2, 2, 2)
    with pytest.raises(DataError, match="must be >= 1"):
        resolve_jobs(0, 0, 2)


def test_sweep_reuses_its_records(tmp_path, capsys, monkeypatch, records_dir):
    from reporting import sweep
    monkeypatch.chdir(tmp_path)
    tiny = ("--dataset synthetic --syn_groups 6 --syn_questions 40 --syn_dim 16 --d_model 16 --dim_feedforward 16 "
            "--num_layers 1 --min_ctx_num_qs 3 --max_ctx_num_qs 10 --min_tar_num_qs 3 --max_tar_num_qs 10 "
            "--eval_num_qs 5 --epochs 1 --comm_round 3 --federated_eval 3 --no_plots")
    argv = ["--preset", "privacy", "--variants", "no_dp", "--seeds", "0", "1", "--extra", tiny, "--jobs", "1",
            "--out_root", "runs/sweeps/privacy", "--report", str(tmp_path / "privacy.md")]
    assert sweep.main(argv) == 0
    assert sorted(p.name for p in (records_dir / "sweeps" / "privacy").iterdir()) == ["no_dp_s0", "no_dp_s1"]
    shutil.rmtree(tmp_path / "runs" / "sweeps" / "privacy" / "no_dp_s1")
    capsys.readouterr()
    monkeypatch.setattr(sweep, "train", lambda *a: pytest.fail("trained a run that has a verified record"))
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "no_dp_s1: verified; replay of 2 rounds" in out and "reuse   runs/sweeps/privacy/no_dp_s0" in out
    assert not (tmp_path / "runs" / "sweeps" / "privacy" / "no_dp_s1").exists()
    report = (tmp_path / "privacy.md").read_text()
    assert "| no_dp | " in report and "| 0, 1 |" in report and "partial" not in report.splitlines()[0]
    assert sweep.main([*argv, "--status"]) == 0
    assert "2 planned: 2 finished, 0 diverged, 0 stale-config, 0 missing" in capsys.readouterr().out


def test_paper_unseen_is_the_paper_preset_on_held_out_questions(monkeypatch):
    monkeypatch.setenv("PLURALLLM_OPINIONQA_DIR", "../shared/data/opinionqa")
    a = reproduce.parse_args(["--preset", "paper_unseen"])
    paper = reproduce.parse_args(["--preset", "paper"])
    assert a.question_split == 0.2 and a.name == "opinionqa_paper_unseen"
    assert {k: v for k, v in vars(a).items() if k not in ("question_split", "name", "out_root", "preset")} == {
        k: v for k, v in vars(paper).items() if k not in ("question_split", "name", "out_root", "preset")}
