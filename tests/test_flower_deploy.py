"""Real processes: a SuperLink and one SuperNode per group on 127.0.0.1, runs started with `flwr run`.

The federation is what docs/federation.md tells users to start, minus TLS (`--insecure`
on loopback), through flower_app.loopback: the SuperLink with runtime dependency
installation disabled (nothing is downloaded; nodes use this environment), each
SuperNode pointed at its own group by --node-config. The fixture's teardown stops every
process with its descendants (SuperExec, ServerApp, ClientApp) and fails if any survives.
Every wait is a poll with a deadline.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flower_app.loopback import BIN, LoopbackFederation, alive, poll
from training.experiment import main
from utils.checkpoint import load_checkpoint

GROUPS = ["g00", "g01", "g02"]  # g00, g01 train; g02 evaluation
FLAGS = ["--dataset", "synthetic", "--syn_groups", "3", "--syn_questions", "40", "--syn_dim", "16",
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


def wait(federation, what, check):
    try:
        return poll(check, RUN_DEADLINE_S, what, every=0.2)
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
    assert fed["runtime"] == "deployment" and fed["failures"] == [] and sorted(fed["nodes"]) == GROUPS
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
    assert not alive(federation.procs["g01"].pid)
    wait(federation, "the run to finish", (out / "federation.json").exists)
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
