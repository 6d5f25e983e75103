"""Real processes: a SuperLink and one SuperNode per group on 127.0.0.1, runs started with `flwr run`.

The federation is what docs/federation.md tells users to start, minus TLS (`--insecure`
on loopback), through flower_app/loopback.py: the SuperLink with runtime dependency
installation disabled (nothing is downloaded; nodes use this environment), each
SuperNode pointed at its own group by --node-config. The fixture's teardown stops every
process with its descendants (SuperExec, ServerApp, ClientApp) and fails if any survives.
Every wait is a poll with a deadline.

Also here: a SecAgg+ run on the same processes (test_secure_aggregation_...), and the
`python scripts/loopback.py` command itself: SIGTERM and SIGINT stop and reap every
Flower process it started, and its printed `flwr run` line names the run folder the
ServerApp will really write.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flower_app.loopback import BIN, REPO, LoopbackFederation, alive, descendants, poll, run_config_value
from orchestration.cli import build_parser
from orchestration.entry import main
from utils.checkpoint import load_checkpoint

GROUPS = ["g00", "g01", "g02", "g03"]  # g00, g01 train; g02 evaluation; g03 trains only under SecAgg+
FLAGS = ["--dataset", "synthetic", "--syn_groups", "4", "--syn_questions", "40", "--syn_dim", "16",
         "--train_groups", "g00,g01", "--eval_groups", "g02", "--d_model", "16", "--dim_feedforward", "16",
         "--num_layers", "1", "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3",
         "--max_tar_num_qs", "10", "--eval_num_qs", "5", "--epochs", "2", "--wandb", "off", "--quiet",
         "--round_timeout", "90", "--node_wait", "60"]
RUN_DEADLINE_S = 150

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                reason=f"flwr's commands are not installed next to the Python running the tests ({BIN})")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    # one torch thread per ClientApp process: three of them share 2 cores
    fed = LoopbackFederation(tmp_path_factory.mktemp("federation"), env={"OMP_NUM_THREADS": "1"})
    try:
        fed.start_superlink()
        for group in GROUPS:
            fed.start_supernode(group)
        yield fed
    finally:
        survivors = fed.close()
        assert not survivors, f"processes left behind: {survivors}"


def wait(federation, what, check, deadline: float = RUN_DEADLINE_S):
    try:
        return poll(check, deadline, what, every=0.2)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{federation.logs()}")


def final_status(federation, run_id: str) -> str:
    """The SuperLink marks the run finished once the ServerApp process has exited (just after federation.json)."""
    def finished():
        status = federation.status(run_id)
        return status if status.startswith("finished") else None
    try:
        return poll(finished, 60, f"run {run_id} to be marked finished", every=1.0)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{federation.logs()}")


def start(federation, out: Path, *extra: str) -> str:
    return federation.run([*FLAGS, "--out_dir", str(out), *extra])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_rounds_on_superlink_and_supernodes_match_the_in_process_engine(federation, tmp_path):
    out = tmp_path / "deployed"
    run_id = start(federation, out, "--comm_round", "2", "--federated_eval", "2")
    wait(federation, "the run to finish", (out / "federation.json").exists)
    assert (out / "summary.json").exists(), federation.logs()
    assert final_status(federation, run_id) == "finished:completed"
    fed = json.loads((out / "federation.json").read_text())
    assert fed["runtime"] == "deployment" and fed["failures"] == [] and sorted(fed["nodes"]) == ["g00", "g01", "g02"]
    metrics, losses = records(out / "metrics.jsonl"), records(out / "losses.jsonl")
    assert [r["round"] for r in metrics] == [0, 2] and [r["round"] for r in losses] == [1, 2]
    assert all(sorted(r["train_loss_per_client"]) == ["g00", "g01"] for r in losses)
    assert metrics[-1]["grad_steps"] == 2 * 2 * 2 and sorted(metrics[-1]["eval_group_scores"]) == ["g02"]
    assert 0 < metrics[-1]["eval_alignment_score"] < 1

    # the same flags in one process give the same weights (and the same numbers)
    ref = tmp_path / "inprocess"
    assert main("fedavg", [*FLAGS, "--comm_round", "2", "--federated_eval", "2", "--out_dir", str(ref)]) == 0
    a, b = load_checkpoint(ref / "checkpoints", "final")[0], load_checkpoint(out / "checkpoints", "final")[0]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    for got, want in zip(metrics, records(ref / "metrics.jsonl")):
        assert got["eval_alignment_score"] == pytest.approx(want["eval_alignment_score"], abs=1e-6)
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)


def test_killed_supernode_is_left_out_and_the_run_continues(federation, tmp_path):
    """SIGTERM the node of g01 once round 1 is aggregated: round 2 goes on with g00 alone."""
    out = tmp_path / "killed"
    run_id = start(federation, out, "--comm_round", "2", "--federated_eval", "2", "--min_clients", "1")
    wait(federation, "round 1", lambda: (out / "losses.jsonl").exists() and records(out / "losses.jsonl"))
    federation.stop("g01")
    try:
        assert not alive(federation.procs["g01"].pid)
        wait(federation, "the run to finish", (out / "federation.json").exists)
    finally:
        federation.start_supernode("g01")  # the module's later tests need every group's node again
    assert (out / "summary.json").exists(), federation.logs()
    assert final_status(federation, run_id) == "finished:completed"
    losses = records(out / "losses.jsonl")
    assert [r["round"] for r in losses] == [1, 2]
    assert sorted(losses[0]["train_loss_per_client"]) == ["g00", "g01"]
    assert sorted(losses[1]["train_loss_per_client"]) == ["g00"]
    assert losses[1]["grad_steps"] == 2 * 2 + 2  # cumulative: round 1 both clients, round 2 g00 only
    failures = json.loads((out / "federation.json").read_text())["failures"]
    assert {(f["round"], f["phase"], f["client"]) for f in failures} == {(2, "train", "g01"), (2, "evaluate", "g01")}
    final = records(out / "metrics.jsonl")[-1]
    assert final["round"] == 2 and sorted(final["train_group_scores"]) == ["g00"]  # g01 can no longer score
    assert sorted(final["eval_group_scores"]) == ["g02"] and 0 < final["eval_alignment_score"] < 1


# --- SecAgg+ on the real processes ------------------------------------------------------------

def test_secure_aggregation_on_superlink_and_supernodes_matches_the_in_process_engine(federation, tmp_path):
    """One SecAgg+ round (4 messages per client) on the real processes: the aggregate is the in-process
    engine's FedAvg within the quantisation step (16 / 2**22 = 3.8e-6), and the run folder is complete.
    Three clients: with two, each could subtract its own update from the sum (refused)."""
    out = tmp_path / "secagg"
    flags = [*FLAGS, "--train_groups", "g00,g01,g03", "--comm_round", "1", "--federated_eval", "1"]
    run_id = federation.run([*flags, "--secagg", "--out_dir", str(out)])
    # 7 messages per node instead of 4 (query, evaluation, 4 SecAgg+ stages, evaluation): about 40 s of
    # CPU, several minutes of wall time on 2 cores shared with other jobs
    wait(federation, "the SecAgg+ run to finish", (out / "federation.json").exists, deadline=3 * RUN_DEADLINE_S)
    assert (out / "summary.json").exists(), federation.logs()
    assert final_status(federation, run_id) == "finished:completed"
    assert json.loads((out / "federation.json").read_text())["failures"] == []
    assert json.loads((out / "config.json").read_text())["secagg"] is True
    ref = tmp_path / "inprocess"
    assert main("fedavg", [*flags, "--out_dir", str(ref)]) == 0
    a, b = load_checkpoint(ref / "checkpoints", "final")[0], load_checkpoint(out / "checkpoints", "final")[0]
    assert 0 < max(float((a[k] - b[k]).abs().max()) for k in a) <= 2 * 16 / 2 ** 22
    got, want = records(out / "metrics.jsonl"), records(ref / "metrics.jsonl")
    assert [r["round"] for r in got] == [0, 1] and got[1]["grad_steps"] == want[1]["grad_steps"]
    assert got[1]["eval_alignment_score"] == pytest.approx(want[1]["eval_alignment_score"], abs=1e-5)


# --- the loopback command: signals and the printed run line -----------------------------------

def settled_descendants(pid: int, every: float = 0.5) -> list[int]:
    """The process's descendants once two reads `every` seconds apart agree (or after the stop deadline)."""
    deadline, before = time.monotonic() + STOP_DEADLINE_S, None
    while True:
        now = sorted(descendants(pid))
        if now == before or time.monotonic() > deadline:
            return now
        before = now
        time.sleep(every)


def our_processes(flwr_home: Path) -> list[int]:
    """Every process (whoever its parent now is) started with this FLWR_HOME in its environment."""
    needle = f"FLWR_HOME={flwr_home}".encode() + b"\0"
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes() and alive(int(env.parent.name)):
                found.append(int(env.parent.name))
        except (OSError, ValueError):
            continue
    return found


READY = "Ctrl+C stops every process."  # the loopback command's last startup line: every node started
STOP_DEADLINE_S = 600  # a safety net for a hung command, not a timing assumption


def kill_all(flwr_home: Path) -> None:
    """SIGKILL every process started with this FLWR_HOME, whatever its session or parent, until none is left."""
    def none_left() -> bool:
        for pid in our_processes(flwr_home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not our_processes(flwr_home)
    poll(none_left, 60, "every process of the test to be killed", every=0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_loopback_command_stops_and_reaps_every_process_on_a_signal(tmp_path, sig):
    """Waits on events (the command's ready line, the processes' exit), so a loaded machine only
    makes it slower; whatever happens, every process it started is killed at the end."""
    root = tmp_path / "loopback root"  # a space: the printed command must quote it
    home = root / "flwr_home"
    argv = [sys.executable, str(REPO / "scripts" / "loopback.py"), "--groups", "g00", "--root", str(root)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        printed = []
        for line in proc.stdout:  # blocks until the command has started every process (or exits)
            printed.append(line)
            if READY in line:
                break
        assert proc.poll() is None and any(READY in line for line in printed), "".join(printed)
        # SuperLink + its SuperExec, the SuperNode + its SuperExec (the SuperExecs start on their own)
        poll(lambda: len(descendants(proc.pid)) >= 4, STOP_DEADLINE_S, "the SuperExecs", every=0.1)
        family = settled_descendants(proc.pid)  # not a snapshot taken while a short-lived child exists
        assert set(family) <= set(our_processes(home))
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=STOP_DEADLINE_S)
        out = "".join(printed) + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
        leftover = our_processes(home)
        kill_all(home)  # the SuperLink, SuperNode and SuperExecs run in sessions of their own
    assert proc.returncode == 128 + sig, err
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        f"interrupted ({sig.name}): stopping the SuperLink and 1 SuperNode(s) with their processes; "
        "rerun the same command to start the federation again"]
    assert not [p for p in family if alive(p)] and not leftover, err

    # the printed line runs the demo flags into the folder the next line names (absolute, under --root)
    command = next(line.strip() for line in out.splitlines() if " flwr run " in line)
    folder = Path(re.search(r"That run writes (.+?) \(give each further run another --out_dir\)", out).group(1))
    assert folder.is_absolute() and folder.parent == (root / "runs").resolve()
    assert run_flags(command).out_dir == str(folder)


def run_flags(command: str):
    """main_fl.py's flags as the ServerApp will read them from a printed `flwr run` line."""
    from flwr.common.config import parse_config_args
    words = shlex.split(command)
    config = parse_config_args([words[words.index("--run-config") + 1]])
    return build_parser("fedavg").parse_args(shlex.split(config["flags"]))


def test_run_command_quotes_paths_for_the_shell_toml_and_the_flag_parser(tmp_path):
    fed = LoopbackFederation(tmp_path / "it's here")
    out = tmp_path / "it's here" / "runs" / "a b"
    args = run_flags(fed.run_command(out, "--dataset synthetic --comm_round 3"))
    assert (args.out_dir, args.comm_round, args.dataset) == (str(out), 3, "synthetic")
    with pytest.raises(ValueError, match="cannot hold a double quote"):
        run_config_value('--out_dir "x"')
