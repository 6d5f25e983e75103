"""The Flower engine (flower_app/): wire format, equivalence with the in-process engine, faults.

Most tests drive the real ServerApp logic and the real ClientApp through `LocalGrid`, a
stand-in for Flower's Grid that delivers each message to the ClientApp in this process
(fast, and able to reorder, fail or silence nodes on purpose). One test runs the whole
experiment on Flower's simulation runtime (Ray workers) and checks it against the
in-process engine; tests/test_flower_deploy.py does the same on real SuperLink/SuperNode
processes.
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import DIAGNOSTIC_KEYS
from flwr.app import Context, Error, Message, RecordDict

import flower_app.node as node_mod
from data_loaders.datasets import chosen_groups
from data_loaders.schema import DataError
from flower_app.client_app import make_client_app
from flower_app.federation import make_setup
from flower_app.node import NodeIdentity, handle_train, node_data, node_identity
from flower_app.protocol import (
    ADAM_ARRAYS,
    ADAM_META,
    adam_from_records,
    adam_to_records,
    eval_reply,
    instruction,
    read_eval_reply,
    read_instruction,
)
from orchestration.cli import build_parser
from orchestration.config import run_config
from orchestration.entry import main
from orchestration.flower_server import run_federation
from training.evaluation import GroupEval
from utils.checkpoint import load_checkpoint

# 5 synthetic groups: 3 train (g00, g01, g03) + 2 eval (g02, g04) with the default 60/40 split.
SMALL = ["--dataset", "synthetic", "--syn_groups", "5", "--syn_questions", "40", "--syn_dim", "16",
         "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1", "--min_ctx_num_qs", "3",
         "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5",
         "--epochs", "2", "--comm_round", "2", "--federated_eval", "1", "--wandb", "off", "--quiet"]
TRAIN, EVAL = ["g00", "g01", "g03"], ["g02", "g04"]


class LocalGrid:
    """The three Grid calls FlowerTrainer uses, answered by a ClientApp in this process.

    order="reversed" handles each batch of messages last to first; fresh=True forgets the
    node's loaded client before every message (as a deployment's one-process-per-message
    does); dead nodes never answer; a ClientApp exception becomes an error reply, as in Flower.
    """

    def __init__(self, app, groups, order="forward", fresh=False):
        self.app, self.order, self.fresh, self.dead = app, order, fresh, set()
        self.contexts = {100 + i: Context(run_id=7, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={}) for i in range(len(groups))}
        self.replies: dict[str, Message] = {}
        self.handled: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
        for msg in (messages[::-1] if self.order == "reversed" else messages):
            node = msg.metadata.dst_node_id
            if node in self.dead:
                continue
            if self.fresh:
                node_mod._NODES.clear()
            self.handled.append((msg.metadata.message_type, node))
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - what Flower's runtimes do with a ClientApp error
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only spins (both engines alike)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def task_identity(flower_task_identity):
    """Every Message built here is stamped with a task identity (conftest.py)."""


def parse(out: Path, *extra):
    return build_parser("fedavg").parse_args([*SMALL, "--out_dir", str(out), *extra])


def local_run(out: Path, *extra, app=None, **grid_kw):
    args = parse(out, *extra)
    train, evals = chosen_groups(run_config(args).data)
    grid = LocalGrid(app or make_client_app(train + evals), train + evals, **grid_kw)
    logs: list[str] = []
    summary = run_federation(grid, args, runtime="local-test", log=logs.append)
    return summary, grid, logs


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def strip_time(recs):
    """Records without wall time and without the diagnostics that only the in-process engines
    compute (the Flower server holds no data)."""
    return [{k: v for k, v in r.items() if k != "wall_time_s" and k not in DIAGNOSTIC_KEYS} for r in recs]


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    """The in-process engine's run of SMALL: the reference every Flower run must reproduce."""
    out = tmp_path_factory.mktemp("inprocess") / "run"
    assert main("fedavg", [*SMALL, "--out_dir", str(out)]) == 0
    return out


# --- wire format ----------------------------------------------------------------------------

def test_resolved_groups_match_the_in_process_split(inprocess):
    config = json.loads((inprocess / "config.json").read_text())
    assert chosen_groups(run_config(parse(inprocess)).data) == (TRAIN, EVAL)
    assert (config["train_groups"], config["eval_groups"]) == (TRAIN, EVAL)


def test_weights_adam_state_and_distances_cross_the_wire_unchanged():
    state = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    msg = instruction("train", 5, '{"a": 1}', 3, state)
    setup, rnd, back = read_instruction(msg)
    assert setup == {"a": 1} and rnd == 3 and msg.metadata.group_id == "3"
    assert all(torch.equal(state[k], back[k]) for k in state)

    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.9))
    sum(p.square().sum() for p in params).backward()
    opt.step()
    arrays, meta = adam_to_records({"adam": opt.state_dict(), "step": 4})
    restored = adam_from_records(arrays, meta)
    assert restored["step"] == 4
    assert restored["adam"]["param_groups"] == opt.state_dict()["param_groups"]
    for i, per_param in opt.state_dict()["state"].items():
        for k, v in per_param.items():
            assert torch.equal(restored["adam"]["state"][i][k], v), (i, k)

    dist = torch.tensor([0.1, 1 / 3, 2.0 ** -40], dtype=torch.float64)
    got = read_eval_reply("g", eval_reply(msg_with_id(msg), GroupEval("g", dist)))
    assert got.distances.dtype == torch.float64 and torch.equal(got.distances, dist)
    assert read_eval_reply("g", eval_reply(msg_with_id(msg), None)) is None


def msg_with_id(msg):
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


# --- equivalence with the in-process engine ----------------------------------------------------

def test_flower_server_and_clients_reproduce_in_process_bit_for_bit(inprocess, tmp_path):
    """Same process, same threads: the message path adds no rounding at all."""
    summary, grid, _ = local_run(tmp_path / "f")
    a, b = load_checkpoint(inprocess / "checkpoints", "final")[0], load_checkpoint(tmp_path / "f" / "checkpoints", "final")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert strip_time(records(tmp_path / "f" / "metrics.jsonl")) == strip_time(records(inprocess / "metrics.jsonl"))
    assert strip_time(records(tmp_path / "f" / "losses.jsonl")) == strip_time(records(inprocess / "losses.jsonl"))
    assert summary["final_eval_alignment_score"] == json.loads((inprocess / "summary.json").read_text())[
        "final_eval_alignment_score"]
    fed = json.loads((tmp_path / "f" / "federation.json").read_text())
    assert fed["failures"] == [] and sorted(fed["nodes"]) == sorted(TRAIN + EVAL) and len(fed["round_seconds"]) == 2
    # evaluation groups are clients too: queried, evaluated 3 times (rounds 0, 1, 2), never trained
    eval_nodes = {fed["nodes"][g] for g in EVAL}
    assert [k for k, n in grid.handled if n in eval_nodes].count("train") == 0
    assert [k for k, n in grid.handled if n in eval_nodes].count("evaluate") == 3 * len(EVAL)


def test_randomness_does_not_depend_on_message_order_or_process(inprocess, tmp_path):
    """Reversed delivery, and every message on a freshly built client (Adam from context.state)."""
    local_run(tmp_path / "r", order="reversed", fresh=True)
    a, b = load_checkpoint(inprocess / "checkpoints", "final")[0], load_checkpoint(tmp_path / "r" / "checkpoints", "final")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_time(records(tmp_path / "r" / "metrics.jsonl")) == strip_time(records(inprocess / "metrics.jsonl"))


@pytest.mark.parametrize("backend", ["thread", pytest.param("ray", marks=pytest.mark.skipif(
    os.environ.get("PLURALLLM_TEST_RAY") != "1",
    reason="Ray's own servers listen on every interface, tests keep to 127.0.0.1; PLURALLLM_TEST_RAY=1 runs it"))])
def test_flower_simulation_runtime_matches_in_process_engine(inprocess, tmp_path, backend):
    """main_fl.py --engine flower: Flower's simulation runtime with the thread or the Ray backend."""
    from flower_app.loopback import descendants
    out = tmp_path / "sim"
    assert main("fedavg", [*SMALL, "--out_dir", str(out), "--engine", "flower", "--sim_backend", backend]) == 0
    a, b = load_checkpoint(inprocess / "checkpoints", "final")[0], load_checkpoint(out / "checkpoints", "final")[0]
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in inprocess.iterdir()] + ["federation.json"])
    got, want = records(out / "metrics.jsonl"), records(inprocess / "metrics.jsonl")
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2]
    for g, w in zip(got, want):
        assert g["grad_steps"] == w["grad_steps"] and g["points"] == w["points"]
        assert g["eval_alignment_score"] == pytest.approx(w["eval_alignment_score"], abs=1e-6)
        assert g["train_group_scores"] == pytest.approx(w["train_group_scores"], abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["engine"] == "flower" and config["data"]["federation"]["engine"] == "flower"
    fed = json.loads((out / "federation.json").read_text())
    assert fed["runtime"] == f"simulation-{backend}" and fed["failures"] == []
    if backend == "thread":  # same process, same threads: exact; and nothing was started beside us
        assert diff == 0.0
        assert not descendants(os.getpid())


# --- faults ------------------------------------------------------------------------------------

def failing_app(groups, group="g01", round_=2):
    """The real ClientApp, except that `group` raises in its train handler at `round_`."""
    app = make_client_app(groups)
    inner = app._registered_funcs["train.default"]

    def train(msg, context):
        ident = node_identity(dict(context.node_config), groups)
        if ident.group == group and read_instruction(msg)[1] == round_:
            raise RuntimeError(f"injected failure of {group} in round {round_}")
        return inner(msg, context)

    app._registered_funcs["train.default"] = train
    return app


def test_erroring_client_is_left_out_logged_and_the_run_continues(tmp_path):
    summary, _, logs = local_run(tmp_path / "e", app=failing_app(TRAIN + EVAL))
    losses = records(tmp_path / "e" / "losses.jsonl")
    assert sorted(losses[0]["train_loss_per_client"]) == TRAIN
    assert sorted(losses[1]["train_loss_per_client"]) == ["g00", "g03"]
    assert losses[1]["grad_steps"] == 3 * 2 + 2 * 2  # cumulative: round 1 all three, round 2 two of them
    fed = json.loads((tmp_path / "e" / "federation.json").read_text())
    assert [(f["round"], f["phase"], f["client"]) for f in fed["failures"]] == [(2, "train", "g01")]
    assert "injected failure of g01 in round 2" in fed["failures"][0]["reason"]
    assert any("round 2 train: client g01 left out" in line for line in logs)
    assert summary["rounds"] == 2


def test_silent_node_times_out_and_is_left_out(tmp_path):
    args = parse(tmp_path / "t", "--round_timeout", "0.3", "--comm_round", "1")
    train, evals = chosen_groups(run_config(args).data)
    grid = LocalGrid(make_client_app(train + evals), train + evals)
    grid.dead.add(101)  # g01's node: joins, then never answers again
    original = grid.push_messages

    def push(messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query":
            grid.dead.discard(101)
            ids = original(messages)
            grid.dead.add(101)
            return ids
        return original(messages)

    grid.push_messages = push
    run_federation(grid, args, runtime="local-test", log=lambda *a: None)
    fed = json.loads((tmp_path / "t" / "federation.json").read_text())
    assert {(f["round"], f["phase"], f["client"]) for f in fed["failures"]} == {
        (0, "evaluate", "g01"), (1, "train", "g01"), (1, "evaluate", "g01")}
    assert "no reply within --round_timeout 0.3 s" in fed["failures"][0]["reason"]
    assert sorted(records(tmp_path / "t" / "losses.jsonl")[0]["train_loss_per_client"]) == ["g00", "g03"]


def test_min_clients_refuses_to_aggregate_a_short_round(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(DataError, match=r"round 2: 2 of 3 sampled clients replied, fewer than --min_clients 3"):
        local_run(out, "--min_clients", "3", app=failing_app(TRAIN + EVAL))
    assert [r["round"] for r in records(out / "losses.jsonl")] == [1]  # round 2 never aggregated
    assert (out / "checkpoints" / "round_00001.json").exists()
    assert not (out / "summary.json").exists()
    assert json.loads((out / "federation.json").read_text())["failures"][0]["client"] == "g01"


def test_min_clients_above_the_sample_size_fails_before_training(tmp_path, capsys):
    """Both engines check --min_clients against the per-round sample (0.5 of 3 groups = 2)."""
    assert main("fedavg", [*SMALL, "--out_dir", str(tmp_path / "i"), "--client_fraction", "0.5",
                           "--min_clients", "3"]) == 2
    assert "--min_clients 3 exceeds the 2 client(s) sampled per round" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"--min_clients 3 exceeds the 2 client\(s\) sampled per round"):
        local_run(tmp_path / "f", "--client_fraction", "0.5", "--min_clients", "3")


# --- nodes and flags -----------------------------------------------------------------------------

def test_node_identity_comes_from_node_config_or_partition():
    assert node_identity({"group": "g03", "dataset": "synthetic", "data-path": ""}, None) == \
        NodeIdentity("g03", "synthetic", None, None, None)
    assert node_identity({"partition-id": 1, "num-partitions": 2}, ["a", "b"]) == NodeIdentity("b")
    with pytest.raises(DataError, match="names no group"):
        node_identity({"dataset": "synthetic"}, None)
    with pytest.raises(DataError, match="node config of group 'g03' names no dataset"):
        node_identity({"group": "g03"}, None)
    setup = {"data": asdict(run_config(parse(Path("/tmp/x"))).data)}
    with pytest.raises(DataError, match="holds dataset 'globalqa', but the run uses --dataset synthetic"):
        node_data(setup, NodeIdentity("g00", "globalqa"))
    assert node_data(setup, NodeIdentity("g00", "synthetic", "/data/here", None, "cpu")).data_path == "/data/here"


def test_missing_group_node_is_a_clear_error(tmp_path):
    args = parse(tmp_path / "x", "--node_wait", "0.5")
    grid = LocalGrid(make_client_app(TRAIN + EVAL), TRAIN + EVAL)
    del grid.contexts[104]  # nobody holds g04
    with pytest.raises(DataError, match=r"no node holds group\(s\) \['g04'\] after waiting 0.5 s"):
        run_federation(grid, args, runtime="local-test", log=lambda *a: None)


def test_eval_node_refuses_to_train():
    groups = TRAIN + EVAL
    grid = LocalGrid(make_client_app(groups), groups)
    run = run_config(parse(Path("/tmp/x")))
    setup = make_setup(run.data, run.client, run.model, "cpu", "dataset_size", TRAIN, EVAL)
    msg = msg_with_id(instruction("train", 103, setup, 1, {}))  # node 103 holds groups[3] = g02
    with pytest.raises(DataError, match="'g02' is an evaluation group and never trains"):
        handle_train(msg, grid.contexts[103], groups)
    assert ADAM_ARRAYS not in grid.contexts[103].state and ADAM_META not in grid.contexts[103].state


@pytest.mark.parametrize("flag", ["--resume", "--also_centralized"])
def test_flags_without_meaning_in_a_federation_are_refused(tmp_path, capsys, flag):
    assert main("fedavg", [*SMALL, "--out_dir", str(tmp_path), "--engine", "flower", flag]) == 2
    assert flag in capsys.readouterr().err


def test_node_loads_exactly_its_groups_tensors_from_real_data(globalqa_csv, monkeypatch):
    """GlobalOpinionQA sample: a node's GroupData equals prepare_experiment's for that group, and it asks
    the embedding cache for the same entry (same parsed questions, same options). The embedder is
    replaced by a fixed table (MiniLM on the sample takes minutes on 2 busy cores)."""
    import data_loaders.embeddings as emb_mod
    from data_loaders.datasets import prepare_experiment
    from flower_app.node import load_group
    calls = []

    def fake_embeddings(raw, emb_model, **kw):
        calls.append((raw.source_hash, len(raw.bank), emb_model, {k: v for k, v in kw.items() if k != "log"}))
        x = torch.linspace(-1, 1, raw.bank.num_points * 8).reshape(-1, 8)
        return x, {"emb_model": emb_model, "dim": 8, "model_id": "fixed-table"}

    monkeypatch.setattr(emb_mod, "get_embeddings", fake_embeddings)
    args = build_parser("fedavg").parse_args(["--dataset", "globalqa", "--data_path", str(globalqa_csv),
                                              "--emb_model", "minilm", "--quiet"])
    run = run_config(args)
    data = prepare_experiment(run.data, log=lambda *a: None)
    train, evals = chosen_groups(run.data)
    assert (sorted(data.train), sorted(data.eval)) == (sorted(train), sorted(evals))
    for group, want in [(train[0], data.train[train[0]]), (evals[-1], data.eval[evals[-1]])]:
        got, has_ordinals, info = load_group(run.data, group, train + evals, log=lambda *a: None)
        for name in ("x", "y", "offsets", "qkeys"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (group, name)
        assert not has_ordinals and info["source_hash"] == data.info["source_hash"]
        assert calls[-1] == calls[0]  # same raw questions and the same cache key ingredients


def test_out_dir_holding_another_run_is_refused_and_left_alone(inprocess, tmp_path):
    before = sorted(p.name for p in inprocess.iterdir())
    with pytest.raises(DataError, match="already holds a run"):
        local_run(inprocess)
    assert sorted(p.name for p in inprocess.iterdir()) == before  # no federation.json written into it


def test_dropout_masks_come_from_seed_group_and_round_not_from_order(tmp_path):
    """With --dropout the nodes seed torch's global RNG per (seed, group, round): any order, same weights."""
    local_run(tmp_path / "a", "--dropout", "0.2")
    local_run(tmp_path / "b", "--dropout", "0.2", order="reversed", fresh=True)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoints", "final")[0], load_checkpoint(tmp_path / "b" / "checkpoints", "final")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    local_run(tmp_path / "c")
    c = load_checkpoint(tmp_path / "c" / "checkpoints", "final")[0]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # dropout did act
