"""The README's bad-input table, row by row (rows pinned in other files are named there).

Each row's test feeds the bad input through the user-facing command (`main`) where the
failure can be reached without an embedding pass, and checks the exit code, that the
message names the input and carries a hint, and that nothing is left looking complete.
"""
import errno
import json
import os
import re
from pathlib import Path

import pytest

from data_loaders.globalqa import load_globalqa
from data_loaders.schema import DataError
from orchestration.entry import main
from utils import atomic_write, jsonl_log
from utils.run_lock import RunLock

SMALL = ["--dataset", "synthetic", "--syn_groups", "6", "--syn_questions", "40", "--syn_dim", "16",
         "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1",
         "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10",
         "--eval_num_qs", "5", "--wandb", "off", "--quiet", "--comm_round", "2", "--federated_eval", "1",
         "--epochs", "1", "--device", "cpu"]
QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """A command that wrongly went ahead would write runs/ here, not into the checkout."""
    monkeypatch.chdir(tmp_path)


def write_all_through(monkeypatch, write_all) -> None:
    """Every file of a run goes through write_all: the atomic files and the appended logs."""
    for module in (atomic_write, jsonl_log):
        monkeypatch.setattr(module, "write_all", write_all)


def fails(capsys, *argv, method="fedavg", expect: str) -> str:
    """Run the command, which must exit 2 with `expect` and a hint in its message."""
    assert main(method, list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and "hint:" in err, err
    return err


def sel(d):
    return f"defaultdict(<class 'list'>, {d!r})"


def write_csv(path: Path, rows, header=("question", "selections", "options", "source")) -> str:
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


GOOD = ["Q0", sel({"Japan": [0.25, 0.75], "China": [0.5, 0.5]}), "['Yes', 'No']", "GAS"]


def load_with(tmp_path, bad_row, **kw):
    return load_globalqa(write_csv(tmp_path / "g.csv", [GOOD, bad_row]), groups=["Japan", "China"],
                         log=QUIET, **kw)


# ---------------------------------------------------------------- survey files (rows 1-9)

def test_row01_missing_data_file(tmp_path, capsys):
    fails(capsys, "--dataset", "globalqa", "--data_path", str(tmp_path / "nope.csv"),
          expect=f"GlobalOpinionQA CSV not found: {tmp_path / 'nope.csv'} (from --data_path)")


def test_row02_csv_without_a_required_column(tmp_path, capsys):
    path = write_csv(tmp_path / "g.csv", [["Q0", "['A']", "GAS"]], header=("question", "options", "source"))
    fails(capsys, "--dataset", "globalqa", "--data_path", path, expect="missing column(s) ['selections']")


def test_row03_malformed_row_is_skipped_and_counted_or_fatal_with_strict(tmp_path, capsys):
    bad = ["Q1", "defaultdict(<class 'list'>, {'Japan': [0.5,", "['A']", "GAS"]
    with pytest.warns(UserWarning, match="row 1"):
        raw = load_with(tmp_path, bad)
    assert raw.report.dropped == {"unparsable row": 1}
    fails(capsys, "--dataset", "globalqa", "--data_path", str(tmp_path / "g.csv"), "--strict",
          expect="row 1 (ending on line 3): unparsable")


def test_row04_selections_not_a_dict(tmp_path):
    bad = ["Q1", "defaultdict(<class 'list'>, {1, 2})", "['A']", "GAS"]
    with pytest.raises(DataError, match="selections is a set, not a dict"):
        load_with(tmp_path, bad, strict=True)
    with pytest.warns(UserWarning):
        assert load_with(tmp_path, bad).report.dropped == {"unparsable row": 1}


def test_row05_options_not_a_list(tmp_path):
    bad = ["Q1", sel({"Japan": [1.0]}), "'Yes'", "GAS"]
    with pytest.raises(DataError, match="options is a str, not a list"):
        load_with(tmp_path, bad, strict=True)
    with pytest.warns(UserWarning):
        assert load_with(tmp_path, bad).report.dropped == {"unparsable row": 1}


@pytest.mark.parametrize("vector,reason", [
    ([0.2, 0.3, 0.5], "options/selections length mismatch"),   # row 6
    ([-0.5, 1.5], "negative probability"),                       # row 7
    ([0.0, 0.0], "all-zero probability vector"),                 # row 9
])
def test_rows06_07_09_unusable_probability_vectors_drop_the_question_and_are_counted(tmp_path, vector, reason):
    bad = ["Q1", sel({"Japan": vector, "China": [0.5, 0.5]}), "['A', 'B']", "GAS"]
    raw = load_with(tmp_path, bad)
    assert raw.report.dropped == {f"question with a considered group's {reason}": 1}
    assert raw.report.kept_questions == 1 and raw.groups["China"].qkeys.tolist() == [0]
    assert any(reason in line for line in raw.report.lines())
    if reason == "all-zero probability vector":  # the paper's filter: dropped even with --strict
        assert load_with(tmp_path, bad, strict=True).report.dropped == raw.report.dropped
    else:
        with pytest.raises(DataError, match=r"row 1 .*group 'Japan' has"):
            load_with(tmp_path, bad, strict=True)


def test_row08_nan_probability(tmp_path):
    """The CSV can only spell NaN as the bare word nan, which is not a literal: the row is unparsable."""
    bad = ["Q1", sel({"Japan": [0.5, 0.5], "China": [0.5, 0.5]}).replace("[0.5, 0.5]", "[nan, 1.0]", 1),
           "['A', 'B']", "GAS"]
    with pytest.warns(UserWarning, match="row 1"):
        assert load_with(tmp_path, bad).report.dropped == {"unparsable row": 1}
    with pytest.raises(DataError, match="row 1"):
        load_with(tmp_path, bad, strict=True)


def test_row62_selections_naming_a_country_twice_is_skipped_and_counted_or_fatal_with_strict(tmp_path):
    """A dict literal keeps the last of two values silently; the loader must see both."""
    bad = ["Q1", "defaultdict(<class 'list'>, {'Japan': [0.9, 0.1], 'China': [0.5, 0.5], 'Japan': [0.1, 0.9]})",
           "['A', 'B']", "GAS"]
    with pytest.warns(UserWarning, match=r"row 1 .*selections name 'Japan' twice"):
        raw = load_with(tmp_path, bad)
    assert raw.report.dropped == {"selections naming a group twice": 1} and raw.report.kept_questions == 1
    with pytest.raises(DataError, match=r"row 1 .*'Japan' twice"):
        load_with(tmp_path, bad, strict=True)
    other = bad[:1] + [bad[1].replace("'Japan'", "'Peru'")] + bad[2:]  # a group not considered: harmless
    assert load_with(tmp_path, other).report.dropped == {}


def test_row63_a_repeated_question_row_is_skipped_and_counted_or_fatal_with_strict(tmp_path):
    again = ["Q0", sel({"Japan": [0.5, 0.5], "China": [0.1, 0.9]}), "['Yes', 'No']", "WVS"]
    with pytest.warns(UserWarning, match=r"row 1 .*repeats row 0 \(same question and options\)"):
        raw = load_with(tmp_path, again)
    assert raw.report.dropped == {"repeated question row": 1} and raw.groups["Japan"].qkeys.tolist() == [0]
    with pytest.raises(DataError, match="row 1 .*repeats row 0"):
        load_with(tmp_path, again, strict=True)
    other_options = ["Q0", sel({"Japan": [0.5, 0.5], "China": [0.1, 0.9]}), "['Agree', 'Disagree']", "WVS"]
    assert load_with(tmp_path, other_options).report.kept_questions == 2  # another question to the model


def test_row10_opinionqa_folder_missing(tmp_path, capsys):
    fails(capsys, "--dataset", "opinionqa", "--data_path", str(tmp_path / "nope"), expect=str(tmp_path / "nope"))


# ---------------------------------------------------------------- groups (rows 12-16)

def test_row12_unknown_group_name(capsys):
    err = fails(capsys, *SMALL, "--train_groups", "g00,g1", "--eval_groups", "g02",
                expect="group(s) ['g1'] not found in the synthetic data")
    assert "available: g00, g01" in err


def test_row12_unknown_group_name_on_real_data_suggests_the_closest(capsys, globalqa_csv):
    fails(capsys, "--dataset", "globalqa", "--data_path", str(globalqa_csv), "--train_groups", "Japn",
          "--eval_groups", "China", expect="did you mean 'Japan'")


def test_row13_train_and_eval_groups_overlap(capsys):
    fails(capsys, *SMALL, "--train_groups", "g00,g01", "--eval_groups", "g01",
          expect="groups ['g01'] are in both --train_groups and --eval_groups")


def test_row14_group_left_with_no_questions(tmp_path, capsys):
    path = write_csv(tmp_path / "g.csv", [["Q0", sel({"Japan": [0.0, 0.0], "China": [0.5, 0.5]}), "['A', 'B']", "GAS"],
                                          ["Q1", sel({"China": [0.5, 0.5]}), "['A', 'B']", "GAS"]])
    fails(capsys, "--dataset", "globalqa", "--data_path", path, "--train_groups", "China", "--eval_groups", "Japan",
          expect="group 'Japan' has no questions left after the data filter")


def test_row15_eval_num_qs_not_below_a_groups_questions(capsys):
    fails(capsys, *SMALL, "--eval_num_qs", "40",
          expect="has 40 questions; --eval_num_qs 40 leaves none to score")


def test_row16_too_few_questions_for_the_episode_sizes(capsys):
    fails(capsys, *SMALL, "--min_ctx_num_qs", "35", "--max_ctx_num_qs", "35",
          expect="has 36 local questions (0.9 of 40), fewer than --min_ctx_num_qs + --min_tar_num_qs = 38")


# ---------------------------------------------------------------- outputs (rows 21-25)

def finished_run(tmp_path) -> Path:
    out = tmp_path / "run"
    assert main("fedavg", [*SMALL, "--out_dir", str(out)]) == 0
    return out


def as_if_killed(out: Path) -> None:
    """Remove what only a finished run has: its summary and final checkpoint."""
    (out / "summary.json").unlink()
    for f in (out / "checkpoints").glob("final.*"):
        f.unlink()


def test_row21_corrupted_checkpoint_on_resume(tmp_path, capsys):
    out = finished_run(tmp_path)
    as_if_killed(out)
    victim = out / "checkpoints" / "round_00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    err = fails(capsys, *SMALL, "--out_dir", str(out), "--resume", expect="round_00002.safetensors")
    assert "delete it or resume from an earlier checkpoint" in err
    assert not (out / "summary.json").exists()


def test_row22_truncated_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path):
    out = finished_run(tmp_path)
    reference = (out / "metrics.jsonl").read_text().splitlines()
    as_if_killed(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train_lo')  # what a crash in the middle of an append leaves
    with pytest.warns(UserWarning, match="truncated or invalid JSON"):
        assert main("fedavg", [*SMALL, "--out_dir", str(out), "--resume"]) == 0
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k != "wall_time_s"} for l in lines]  # noqa
    assert strip((out / "metrics.jsonl").read_text().splitlines()) == strip(reference)


def test_row67_temp_files_of_a_killed_write_are_removed_at_resume_and_at_pruning(tmp_path):
    from utils.checkpoint import prune_checkpoints
    out = finished_run(tmp_path)
    as_if_killed(out)
    ckpt = out / "checkpoints"
    stale = [ckpt / ".round_00002.safetensors.0123abcd.tmp", ckpt / ".final.json.89abcdef.tmp",
             out / ".metrics.jsonl.deadbeef.tmp"]
    kept = [ckpt / "notes.tmp", out / ".hidden"]  # not the temp names of an atomic write
    for f in stale + kept:
        f.write_bytes(b"x" * 1000)
    assert main("fedavg", [*SMALL, "--out_dir", str(out), "--resume"]) == 0
    assert not [f for f in stale if f.exists()] and all(f.exists() for f in kept)
    stale[0].write_bytes(b"x")
    prune_checkpoints(ckpt, keep=1)
    assert not stale[0].exists() and kept[0].exists()


def test_row23_unwritable_out_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        fails(capsys, *SMALL, "--out_dir", str(locked / "run"), expect=f"cannot create run folder {locked / 'run'}")
    finally:
        locked.chmod(0o700)


def test_row23_out_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    fails(capsys, *SMALL, "--out_dir", str(target / "run"), expect=f"cannot create run folder {target / 'run'}")


def test_row24_disk_full_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    real_write_all = atomic_write.write_all

    def fill_up(fd, data):
        if len(data) > 10_000:  # the model weights: the first large file of the run
            os.write(fd, bytes(data[:100]))  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    write_all_through(monkeypatch, fill_up)
    out = tmp_path / "run"
    err = fails(capsys, *SMALL, "--out_dir", str(out), expect="No space left on device")
    assert "free some disk space" in err
    ckpt = out / "checkpoints"
    assert not list(ckpt.glob("*.safetensors")) and not list(ckpt.glob("*.json"))  # nothing half-written
    assert not list(ckpt.glob(".*.tmp")) and not (out / "summary.json").exists()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_row65_a_metrics_log_deleted_or_replaced_mid_run_stops_the_run_and_its_resume(tmp_path, capsys, monkeypatch,
                                                                                       how):
    """The open descriptor would write on into the unlinked file: the next record is refused instead."""
    from orchestration.loop import RunLoop
    log_round = RunLoop._log_round

    def meddle(self, losses, rnd, stats, server):
        if rnd == 2:
            path = self.run_dir.metrics_path
            if how == "deleted":
                path.unlink()
            else:
                (path.parent / "copy").write_bytes(path.read_bytes())
                os.replace(path.parent / "copy", path)
        return log_round(self, losses, rnd, stats, server)

    monkeypatch.setattr(RunLoop, "_log_round", meddle)
    out = tmp_path / "run"
    vanished = "vanished (deleted or moved)" if how == "deleted" else "was replaced by another file"
    err = fails(capsys, *SMALL, "--out_dir", str(out), expect=f"{out / 'metrics.jsonl'} {vanished}")
    assert "Traceback" not in err and "start the run anew in another --out_dir" in err
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(RunLoop, "_log_round", log_round)
    if how == "deleted":
        fails(capsys, *SMALL, "--out_dir", str(out), "--resume",
              expect="metrics.jsonl is missing, but the run has a checkpoint of round 1")


@pytest.mark.parametrize("victim", ["checkpoint", "metrics line"])
def test_row24_a_full_disk_mid_run_is_exit_2_and_the_last_checkpoint_resumes(tmp_path, capsys, monkeypatch, victim):
    """Round 2's checkpoint or metrics record meets a full disk after part of it landed: a clear exit 2,
    and once there is space again --resume ends with the numbers of an uninterrupted run."""
    import contextlib
    reference = finished_run(tmp_path)
    out = tmp_path / "full"
    real_write_all = atomic_write.write_all

    def full_at_round_2(fd, data):
        if victim == "checkpoint":  # round 2's state, after its weights, once round 1's checkpoint is complete
            hit = (out / "checkpoints" / "round_00002.safetensors").exists() and len(data) > 10_000
        else:  # round 2's metrics record (its losses.jsonl row has no eval scores)
            hit = bytes(data[:12]) == b'{"round": 2,' and b"eval_alignment_score" in bytes(data)
        if hit:
            os.write(fd, bytes(data[:50]))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    write_all_through(monkeypatch, full_at_round_2)
    err = fails(capsys, *SMALL, "--out_dir", str(out), expect="No space left on device")
    assert "free some disk space" in err and "Traceback" not in err and not (out / "summary.json").exists()
    assert not list((out / "checkpoints").glob("round_00002.*"))  # no weights without their index
    write_all_through(monkeypatch, real_write_all)
    cut = pytest.warns(UserWarning, match="truncated") if victim == "metrics line" else contextlib.nullcontext()
    with cut:  # the half line is dropped
        assert main("fedavg", [*SMALL, "--out_dir", str(out), "--resume"]) == 0
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"}  # noqa: E731
                       for line in p.read_text().splitlines()]
    assert strip(out / "metrics.jsonl") == strip(reference / "metrics.jsonl")


def test_row25_wandb_online_without_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "run"
    fails(capsys, *[a if a != "off" else "online" for a in SMALL], "--out_dir", str(out),
          expect="--wandb online: no W&B credentials found")
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------- flags (rows 27-31)

@pytest.mark.parametrize("flags,module,extra", [
    (("--engine", "flower"), "flwr", "flower"),
    (("--dp", "--weighting", "uniform", "--dp_noise", "1"), "opacus", "dp"),
])
def test_row66_a_missing_optional_package_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                  flags, module, extra):
    import sys
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees after a plain `pip install -e .`
    out = tmp_path / "run"
    err = fails(capsys, *SMALL, *flags, "--out_dir", str(out), expect=f"needs the optional package {module!r}")
    assert f"pip install 'plurallm[{extra}]'" in err and not out.exists()


def test_row27_cuda_requested_without_cuda(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(capsys, *SMALL, "--device", "cuda", expect="--device cuda: this PyTorch build sees no CUDA device")


@pytest.mark.parametrize("flags,expect", [
    (("--client_engine", "threads", "--dropout", "0.1"), "--dropout 0.1 does not work with --client_engine threads"),
])
def test_row28_conflicting_flags(capsys, flags, expect):
    fails(capsys, *SMALL, *flags, expect=expect)


def test_row29_min_above_max_episode_size(capsys):
    fails(capsys, *SMALL, "--min_ctx_num_qs", "12", expect="--min_ctx_num_qs 12 / --max_ctx_num_qs 10")


@pytest.mark.parametrize("flag,value,expect", [
    ("--data_split", "1.5", "--data_split 1.5 must be in (0, 1)"),
    ("--epochs", "0", "--epochs 0 must be >= 1 local steps"),
    ("--lr", "0", "--lr 0.0 must be > 0"),
    ("--client_fraction", "0", "--client_fraction 0.0 must be in (0, 1]"),
    ("--comm_round", "0", "--comm_round 0 must be >= 1"),
    ("--nhead", "3", "--d_model 16 is not divisible by --nhead 3"),
    ("--syn_min_options", "1", "--syn_min_options 1 / --syn_max_options 7"),
])
def test_row30_out_of_range_values(capsys, flag, value, expect):
    fails(capsys, *SMALL, flag, value, expect=expect)


def test_row31_wasserstein_on_data_without_ordinals(capsys):
    fails(capsys, *SMALL, "--metric", "wasserstein", expect="--metric wasserstein needs ordinal options")


def test_row32_resume_a_folder_without_a_run(tmp_path, capsys):
    fails(capsys, *SMALL, "--out_dir", str(tmp_path), "--resume", expect="holds no run (no config.json)")


def test_row71_what_the_flags_refuse_is_refused_before_loading_the_data(tmp_path, capsys):
    """A missing CSV would be the first error if the data were loaded first."""
    nope = ["--dataset", "globalqa", "--data_path", str(tmp_path / "nope.csv"), "--wandb", "off", "--quiet"]
    fails(capsys, *nope, "--byzantine", "8", expect="--byzantine 8 leaves no honest client among the 8 training clients")
    out = finished_run(tmp_path)
    fails(capsys, *nope, "--out_dir", str(out), "--resume",
          expect=f"--resume: the run in {out} is on --dataset synthetic, not globalqa")
    (out / "failed.json").write_text('{"reason": "diverged"}')
    fails(capsys, *SMALL, "--syn_questions", "10", "--out_dir", str(out), "--resume", expect="failed (diverged)")


def test_row71_the_reproduce_lock_is_checked_before_loading_and_names_out_root(tmp_path, capsys, monkeypatch):
    import sys

    from reporting import reproduce
    monkeypatch.setattr(sys, "argv", ["scripts/reproduce.py", *["--an_argument_that_is_long"] * 10])
    root = tmp_path / "r"
    with RunLock(root, "reproduction folder", "--out_root"):
        assert reproduce.main(["--dataset", "globalqa", "--data_path", str(tmp_path / "nope.csv"), "--seeds", "0",
                              "--out_root", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"reproduction folder {root} is in use by process {os.getpid()}" in err and "another --out_root" in err
    assert "…)" in err and "--an_argument_that_is_long" in err  # the holder's command, cut with an ellipsis


def test_row71_hints_and_help_say_what_the_flags_are():
    from orchestration.cli import build_parser
    text = " ".join(build_parser("fedavg").format_help().split())
    assert not re.search(r"default[^()]*\) \(default:", text)  # was "(default: …) (default: None)"
    assert "--save_client also save each client's locally trained weights" in text
    assert "virtual clients in threads, or Ray workers with --sim_backend ray" in text


def test_nothing_was_left_looking_complete_by_any_refused_command(tmp_path, capsys):
    """A refused command leaves no run folder with a summary (the folder of a config error is never made)."""
    out = tmp_path / "run"
    fails(capsys, *SMALL, "--out_dir", str(out), "--metric", "wasserstein", expect="ordinal")
    assert not out.exists()


def test_every_readme_row_has_a_test():
    """The README's bad-input table and these tests stay in step: each row number has a
    test_rowNN here, or names the test elsewhere that pins it, and that test exists."""
    import re
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Crashes, resume and bad input", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \|(.*)$", table, flags=re.M)
    assert len(rows) >= 20
    here = (root / "tests" / "test_bad_inputs.py").read_text(encoding="utf-8")
    covered = {int(n) for names in re.findall(r"def test_rows?((?:\d\d_?)+)", here) for n in re.findall(r"\d\d", names)}
    for number, text in rows:
        named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text)
        for path, test in named:
            assert f"def {test}(" in (root / path).read_text(encoding="utf-8"), (number, test)
        assert int(number) in covered or named, f"README bad-input row {number} has no test"


def test_every_command_line_exits_through_one_wrapper(capsys):
    """exit_on_error: a user error is one line and code 2; an interrupt one line naming the round
    and the hint, with the shell's code; a bug keeps its traceback; the body's own code passes."""
    import signal

    from utils.errors import UserError, exit_on_error
    from utils.interrupts import Interrupted

    def bad():
        raise UserError("--foo 3 is not allowed", "use --foo 2")
    assert exit_on_error(bad) == 2
    assert capsys.readouterr().err == "error: --foo 3 is not allowed\n  hint: use --foo 2\n"

    def stopped():
        err = Interrupted(signal.SIGTERM)
        err.round = 7
        raise err
    assert exit_on_error(stopped, interrupts=True, resume_hint="rerun with --resume") == 143
    assert capsys.readouterr().err == "interrupted at round 7; rerun with --resume\n"
    with pytest.raises(KeyboardInterrupt):  # a command that does not handle interrupts leaves them alone
        exit_on_error(stopped)
    with pytest.raises(ZeroDivisionError):
        exit_on_error(lambda: 1 / 0)
    assert exit_on_error(lambda: None) == 0 and exit_on_error(lambda: 3) == 3
    print_to = []

    class Stream:
        def write(self, text):
            print_to.append(text)
    assert exit_on_error(bad, stream=Stream()) == 2 and "".join(print_to).startswith("error: --foo 3")
