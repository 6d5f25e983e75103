"""--secagg: Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod) under this project's ServerApp.

`WireGrid` delivers every message to the ClientApp in this process after a round trip
through Flower's protobuf serialisation (as a SuperLink would: Flower's workflow sends
one RecordDict to several nodes, and the mod edits what it receives), and keeps every
reply the server receives. The real SecAgg+ deployment test is in
tests/test_flower_deploy.py.

Measured on these settings (3 clients, d_model 16, default --secagg_clip_range 8 and
--secagg_quant_range 2**22, so one quantisation step is 16 / 2**22 = 3.8e-6):
the aggregate differs from the plain weighted FedAvg of the same client weights by at
most 3.2e-6 (relative L2 5.5e-6) with dataset-size weights, 9.1e-6 (1.5e-5) with
episode-point weights, 2.9e-6 (5.0e-6) uniform: `pytest -s -k within` prints them.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIAGNOSTIC_KEYS
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto

import federated.client as client_mod
import flower_app.node as node_mod
from data_loaders.datasets import chosen_groups
from data_loaders.schema import DataError
from federated.aggregation import aggregate
from flower_app.client_app import make_client_app
from flower_app.federation import discover, federated_data, make_setup
from flower_app.secagg_server import SecAggTrainer, effective_shares
from orchestration.cli import build_parser
from orchestration.config import run_config
from orchestration.entry import main
from utils.checkpoint import load_checkpoint

SMALL = ["--dataset", "synthetic", "--syn_groups", "5", "--syn_questions", "40", "--syn_dim", "16",
         "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "1", "--min_ctx_num_qs", "3",
         "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5",
         "--epochs", "2", "--comm_round", "2", "--federated_eval", "1", "--wandb", "off", "--quiet",
         "--client_engine", "loop"]
TRAIN, EVAL = ["g00", "g01", "g03"], ["g02", "g04"]
STEP = 2 * 8.0 / 2 ** 22  # one quantisation level at the default clip and quantisation ranges


class WireGrid:
    """FlowerTrainer's Grid calls, answered by a ClientApp here; messages serialised both ways."""

    def __init__(self, app, groups):
        self.app = app
        self.contexts = {100 + i: Context(run_id=7, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={}) for i in range(len(groups))}
        self.replies: dict[str, Message] = {}
        self.received: list[Message] = []  # everything the server pulled

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            delivered = message_from_proto(message_to_proto(msg))
            try:
                reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - what Flower's runtimes do with a ClientApp error
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=delivered)
            self.replies[msg.metadata.message_id] = message_from_proto(message_to_proto(reply))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        got = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        self.received.extend(got)
        return got


@pytest.fixture(autouse=True)
def one_thread_and_task_identity():
    """One torch thread (tiny models, shared cores); the task identity a runtime would set; and no
    node client (with its Adam state) kept from an earlier test with the same flags."""
    from flwr.supercore.task_identity import TaskIdentity
    node_mod._NODES.clear()
    saved = (torch.get_num_threads(), TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    torch.set_num_threads(saved[0])
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved[1:]


@pytest.fixture
def client_updates(monkeypatch):
    """Every client's locally trained weights, recorded on the client side (the server never gets them)."""
    seen: dict[tuple[str, int], client_mod.FitResult] = {}
    fit = client_mod.GroupClient.fit

    def recording_fit(self, model, global_state, round_, fit_config=None):
        res = fit(self, model, global_state, round_, fit_config)
        seen[(res.name, round_)] = res
        return res

    monkeypatch.setattr(client_mod.GroupClient, "fit", recording_fit)
    return seen


def check_secagg_flags(args):
    """The secure-aggregation check main_fl.py runs on its flags."""
    run = run_config(args)
    server = run.server
    run.secagg.validate(engine=args.engine, dp=server.privacy.enabled, strategy=server.strategy.name,
                                 byzantine=server.attack.byzantine, save_client=args.save_client)


def parse(out, *extra):
    return build_parser("fedavg").parse_args([*SMALL, "--out_dir", str(out), "--engine", "flower", "--secagg", *extra])


def secure_trainer(tmp_path, *extra, app=None):
    """A SecAggTrainer on fresh WireGrid nodes, set up as run_federation does (no run folder, no evaluation)."""
    node_mod._NODES.clear()
    args = parse(tmp_path / "unused", *extra)
    check_secagg_flags(args)
    run = run_config(args)
    train, evals = chosen_groups(run.data)
    grid = WireGrid(app or make_client_app(train + evals), train + evals)
    setup = make_setup(run.data, run.client, run.model, run.federation.device, args.weighting, train, evals)
    reports = discover(grid, setup, train + evals, 5, log=lambda *a: None)
    data = federated_data(args.dataset, grid, setup, reports, train, evals, log=lambda *a: None)
    trainer = SecAggTrainer(run.secagg, data, run.client, run.model_for(data.dim_x), weighting=args.weighting,
                                  client_fraction=args.client_fraction, min_clients=args.min_clients,
                                  round_timeout=args.round_timeout)
    return trainer, grid


def errors(a: dict, b: dict) -> tuple[float, float]:
    """(max abs difference, relative L2 difference) of two weight dicts."""
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    num = math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a))
    den = math.sqrt(sum(float(b[k].double().square().sum()) for k in b))
    return diff, num / den


@pytest.mark.parametrize("weighting", ["dataset_size", "episode_points", "uniform"])
def test_secure_round_equals_fedavg_of_the_same_updates_within_quantisation(tmp_path, client_updates, weighting):
    trainer, _ = secure_trainer(tmp_path, "--weighting", weighting)
    stats = trainer.train_round(1)
    updates = [client_updates[(n, 1)] for n in TRAIN]
    plain = aggregate(updates, weighting)
    max_abs, rel = errors(trainer.global_state, plain)
    print(f"secagg {weighting}: max abs {max_abs:.3g}, relative L2 {rel:.3g}")
    # Each client's scaled weights are rounded to one level (STEP) at random; the sum of 3
    # such errors is divided by Σ w_g / max_weight; plus float32's last bit on weights up to 1.
    raw = {"dataset_size": [u.num_examples for u in updates], "uniform": [1, 1, 1],
           "episode_points": [u.episode_points for u in updates]}[weighting]
    bound = {"dataset_size": 40, "episode_points": max(trainer.data.train[n].num_points for n in TRAIN), "uniform": 1}
    assert 0 < max_abs <= 3 * STEP / (sum(raw) / bound[weighting]) + 2 ** -24
    assert rel < 3e-5
    assert stats["clients"] == TRAIN and stats["grad_steps"] == 3 * 2
    assert stats["train_loss_per_client"] == {u.name: sum(u.losses) / len(u.losses) for u in updates}
    assert trainer.last_client_states == {}


def test_secure_aggregate_is_reproducible_bit_for_bit(tmp_path):
    """Masks cancel exactly; the stochastic rounding is seeded from (seed, group, round)."""
    first, _ = secure_trainer(tmp_path)
    first.train_round(1)
    second, _ = secure_trainer(tmp_path)
    second.train_round(1)
    assert all(torch.equal(first.global_state[k], second.global_state[k]) for k in first.global_state)


def test_server_receives_only_masked_vectors_and_the_unmasked_sum(tmp_path, client_updates):
    trainer, grid = secure_trainer(tmp_path)
    grid.received.clear()
    trainer.train_round(1)
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(replies) == 4 * len(TRAIN)  # setup, share keys, masked vectors, unmask: one reply each
    group_of = {node: name for name, node in trainer.data.nodes.items()}
    masked = {}
    for reply in replies:
        content = reply.content
        assert all(len(record) == 0 for record in content.array_records.values())  # no weights, ever
        secagg = content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in secagg:
            masked[group_of[reply.metadata.src_node_id]] = np.concatenate(
                [bytes_to_ndarray(b).ravel() for b in secagg[Key.MASKED_PARAMETERS]])
            assert dict(content.config_records["fitres.metrics"]).keys() == {
                "num_examples", "episode_points", "points", "losses"}
    assert sorted(masked) == TRAIN
    size = sum(v.numel() for v in trainer.global_state.values()) + 1  # + the client's weight factor
    for name, vec in masked.items():
        # A quantised vector lies in [0, 2**22]; masked, it is uniform in [0, 2**32): ~0.1% of it in range.
        assert vec.size == size and vec.min() >= 0 and vec.max() < 2 ** 32
        assert np.mean(vec <= 2 ** 22) < 0.01, name
    # ... and only their sum, unmasked, is the average of the clients' weights
    max_abs, _ = errors(trainer.global_state, aggregate([client_updates[(n, 1)] for n in TRAIN], "dataset_size"))
    assert max_abs <= 3 * STEP


def test_run_folder_on_flowers_simulation_runtime_matches_the_in_process_engine(tmp_path, monkeypatch):
    """main_fl.py --engine flower --secagg's path: Flower's simulation runtime, thread backend (nodes in
    concurrent threads). The same RunLoop writes the run: same files, rounds, counts; numbers within
    the quantisation. Evaluations run one group at a time in name order there (serial_eval), so round 0
    equals the in-process engine's exactly (concurrent ones differed by 8e-10 about one run in four)."""
    from flwr.simulation import run_simulation

    from flower_app.federation import FlowerTrainer
    from orchestration.flower_server import make_server_app
    from orchestration.flower_simulation import backend_config, use_backend
    serial = []
    evaluate = FlowerTrainer.evaluate

    def recording_evaluate(self, round_):
        serial.append(self.data.serial_eval)
        return evaluate(self, round_)

    monkeypatch.setattr(FlowerTrainer, "evaluate", recording_evaluate)
    ref, out = tmp_path / "inprocess", tmp_path / "secagg"
    assert main("fedavg", [*SMALL, "--out_dir", str(ref)]) == 0
    args = parse(out, "--sim_client_cpus", "0.5")  # 4 nodes at once on 2 cores
    with use_backend("thread"):
        run_simulation(server_app=make_server_app(args, runtime="simulation-thread"),
                       client_app=make_client_app(TRAIN + EVAL), num_supernodes=len(TRAIN + EVAL),
                       backend_config=backend_config(run_config(args).federation))
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in ref.iterdir()] + ["federation.json"])
    config = json.loads((out / "config.json").read_text())
    assert config["secagg"] is True and config["secagg_quant_range"] == 2 ** 22
    got, want = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, ref)]
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2]
    for g, w in zip(got, want):
        assert (g["grad_steps"], g["points"]) == (w["grad_steps"], w["points"])
        assert g["eval_alignment_score"] == pytest.approx(w["eval_alignment_score"], abs=1e-5)
    plain = lambda r: {k: v for k, v in r.items() if k not in DIAGNOSTIC_KEYS | {"wall_time_s", "comm_bytes_total"}}  # noqa: E731
    assert plain(got[0]) == plain(want[0])  # round 0: the same initial weights
    # a SecAgg+ round moves more than the weights: masked, quantised vectors, keys and shares, in 4 stages
    (sec, ref_losses) = [[json.loads(line) for line in (d / "losses.jsonl").read_text().splitlines()] for d in (out, ref)]
    assert all(s["comm_bytes_up"] > r["comm_bytes_up"] and s["comm_bytes_down"] > r["comm_bytes_down"]
               for s, r in zip(sec, ref_losses))
    assert got[1]["train_loss"] == want[1]["train_loss"]  # round 1 trains from those same weights
    a, b = [load_checkpoint(d / "checkpoints", "round_00001")[0] for d in (out, ref)]
    assert errors(a, b)[0] <= 3 * STEP
    fed = json.loads((out / "federation.json").read_text())
    assert fed["failures"] == [] and fed["runtime"] == "simulation-thread"
    assert serial == [True, True, True]


def test_serial_evaluation_asks_one_group_at_a_time_in_name_order(tmp_path):
    """The simulation's thread backend (run_federation sets serial_eval there) evaluates one group at a
    time, evaluation groups then training groups, each in name order; the scores are those of the
    concurrent path, whose order on a shared torch thread pool was what made the test above flaky."""
    trainer, grid = secure_trainer(tmp_path)
    batches = []
    push = grid.push_messages

    def recording_push(messages):
        messages = list(messages)
        batches.append([trainer_group(trainer, m.metadata.dst_node_id) for m in messages])
        return push(messages)

    grid.push_messages = recording_push
    together = trainer.evaluate(0)
    assert batches == [EVAL + TRAIN]
    batches.clear()
    trainer.data.serial_eval = True
    one_by_one = trainer.evaluate(0)
    assert batches == [[g] for g in sorted(EVAL) + sorted(TRAIN)]
    for a, b in zip(together, one_by_one):
        assert list(a) == list(b) and all(torch.equal(a[n].distances, b[n].distances) for n in a)


def trainer_group(trainer, node_id: int) -> str:
    return next(g for g, n in trainer.data.nodes.items() if n == node_id)


def test_client_dropping_out_mid_protocol_is_left_out_and_the_rest_aggregated(tmp_path, client_updates):
    """g01 fails after the key exchange; SecAgg+ rebuilds its masks from the others' shares."""
    groups = TRAIN + EVAL
    app = make_client_app(groups)
    inner = app._registered_funcs["train.default"]

    def train(msg, context):
        if context.node_config["partition-id"] == groups.index("g01") and "fitins.config" in msg.content.config_records:
            raise RuntimeError("g01 lost its connection")
        return inner(msg, context)

    app._registered_funcs["train.default"] = train
    trainer, _ = secure_trainer(tmp_path, "--secagg_num_shares", "3", "--secagg_threshold", "2", app=app)
    stats = trainer.train_round(1)
    assert stats["clients"] == ["g00", "g03"]
    assert [(f["client"], f["reason"].split(":")[0]) for f in trainer.data.failures] == [
        ("g01", "SecAgg+ stage collect_masked_vectors")]
    plain = aggregate([client_updates[(n, 1)] for n in ("g00", "g03")], "dataset_size")
    assert errors(trainer.global_state, plain)[0] <= 2 * STEP


def test_weight_outside_the_clip_range_stops_the_run(tmp_path):
    trainer, _ = secure_trainer(tmp_path, "--secagg_clip_range", "0.5")
    with pytest.raises(DataError, match=r"round 1: client g0[013] stopped the run: .* exceeds --secagg_clip_range 0.5"):
        trainer.train_round(1)


def test_diverged_client_stops_the_run_as_without_secagg(tmp_path, monkeypatch):
    """The server cannot see a NaN through the masks: the node checks before masking, the server stops
    with the same DivergenceError (run folder marked failed) as when it sees the weights."""
    from training.local import DivergenceError
    fit = client_mod.GroupClient.fit

    def nan_fit(self, model, global_state, round_, fit_config=None):
        res = fit(self, model, global_state, round_, fit_config)
        if res.name == "g01":
            next(iter(res.state.values()))[0] = float("nan")
        return res

    monkeypatch.setattr(client_mod.GroupClient, "fit", nan_fit)
    trainer, _ = secure_trainer(tmp_path)
    with pytest.raises(DivergenceError, match=r"diverged at round 1: weight '.+' holds NaN/inf \(client 'g01'\)"):
        trainer.train_round(1)


def test_too_few_clients_for_a_secure_sum_are_refused_before_training(tmp_path):
    with pytest.raises(DataError, match=r"--secagg needs at least 3 clients per round; 1 sampled"):
        secure_trainer(tmp_path, "--client_fraction", "0.3")
    for shares in ("1.0", "3"):  # two clients: each learns the other's update from the sum, whatever the shares
        with pytest.raises(DataError, match=r"at least 3 clients per round; 2 sampled .*learns the other's"):
            secure_trainer(tmp_path, "--client_fraction", "0.5", "--secagg_num_shares", shares,
                           "--secagg_threshold", "2")
    with pytest.raises(DataError, match=r"--secagg_quant_range 2000000000 times 3 clients reaches 2\*\*32"):
        secure_trainer(tmp_path, "--secagg_quant_range", "2000000000")
    with pytest.raises(DataError, match=r"give 3 shares and a threshold of 4 for 3 clients"):
        secure_trainer(tmp_path, "--secagg_threshold", "4")


@pytest.mark.parametrize("flags, message", [
    (["--engine", "inprocess"], r"--secagg needs --engine flower \(got --engine inprocess\)"),
    (["--secagg_num_shares", "2"], r"--secagg_num_shares 2: an integer count must be at least 3"),
    (["--secagg_num_shares", "1.5"], r"--secagg_num_shares 1.5: a fraction must be in \(0, 1\]"),
    (["--secagg_num_shares", "4", "--secagg_threshold", "4"],
     r"--secagg_threshold 4 must be below --secagg_num_shares 4"),
    (["--secagg_threshold", "0"], r"--secagg_threshold 0: an integer must be at least 2"),
    (["--secagg_clip_range", "0"], r"--secagg_clip_range 0 must be above 0"),
    (["--secagg_quant_range", str(2 ** 31)], r"--secagg_quant_range 2147483648 must be in \[2, 2\*\*31\)"),
    (["--save_client"], r"--save_client writes each client's weights, which --secagg keeps from the server"),
    ({"dp": True}, r"--dp clips each client's update on the server"),
    ({"strategy": "median"}, r"--strategy median with --secagg: the server sees only the weighted sum"),
])
def test_bad_secagg_flags_are_refused_with_a_hint(flags, message):
    """Flags of other modules (--dp, --strategy) are set on the namespace as their parsers would."""
    cli = flags if isinstance(flags, list) else []
    args = build_parser("fedavg").parse_args(["--engine", "flower", "--secagg", *cli])
    if isinstance(flags, dict):
        vars(args).update(flags)
    with pytest.raises(DataError, match=message) as err:
        check_secagg_flags(args)
    assert "hint:" in str(err.value)


def test_flags_parse_counts_or_fractions_and_need_secagg():
    args = build_parser("fedavg").parse_args(["--secagg_num_shares", "5", "--secagg_threshold", "0.5"])
    assert (args.secagg, args.secagg_num_shares, args.secagg_threshold) == (False, 5, 0.5)
    check_secagg_flags(args)  # without --secagg nothing is checked
    with pytest.raises(SystemExit):
        build_parser("fedavg").parse_args(["--secagg_num_shares", "many"])
    # what Flower's workflow makes of them (flwr 1.41 SecAggPlusWorkflow.setup_stage)
    assert effective_shares(1.0, 0.67, 3) == (3, 2) and effective_shares(1.0, 0.67, 8) == (8, 5)
    assert effective_shares(3, 2, 8) == (3, 2) and effective_shares(0.5, 1.0, 8) == (5, 5)


def test_flag_module_imports_nothing_heavy():
    """orchestration/cli.py imports flower_app.secagg: no flwr, no torch at import time."""
    code = "import sys, flower_app.secagg; print(sorted(m for m in ('flwr', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
