"""Communication cost: the counted bytes of a round, against a hand count and Flower's own."""
import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.serde import recorddict_to_proto

from federated.client import FitResult
from federated.comm import down_bytes, human_bytes, pooling_bytes, record_bytes, round_comm, tensor_bytes, up_bytes
from flower_app.protocol import fit_reply, instruction, payload_bytes
from orchestration.entry import main

STATE = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
NPY_HEADER = 128  # numpy's .npy v1.0 header, padded to a multiple of 64 bytes, for these small shapes


@pytest.fixture(autouse=True)
def task_identity(flower_task_identity):
    """Every Message built here is stamped with a task identity (conftest.py)."""


def msg_with_id(msg):
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def test_a_toy_round_counts_the_tensor_sizes_plus_the_framing_by_hand():
    assert tensor_bytes(STATE) == (NPY_HEADER + 24 + 1) + (NPY_HEADER + 12 + 1)
    # instruction: weights, then "round" (5 characters + an 8-byte number), then the strategy's config as JSON
    cfg = {"proximal_mu": 0.1}
    assert down_bytes(STATE, 7, cfg) == 294 + (5 + 8) + (len("fit_config") + len(json.dumps(cfg)))
    res = FitResult("g", STATE, num_examples=9, episode_points=40, losses=[0.5, 0.25], points=80,
                    metrics={"heldout_alignment": 0.8})
    # reply: weights; 3 counts of 8 bytes; 2 losses of 8 bytes; one strategy metric; every key's characters
    keys = len("num_examples") + len("episode_points") + len("points") + len("losses") + len("metric.heldout_alignment")
    assert up_bytes(res) == 294 + 3 * 8 + 2 * 8 + 8 + keys
    comm = round_comm(STATE, 7, cfg, 3, [res, FitResult("h", STATE, 9, 40, [0.5], 80)])
    assert comm["comm_bytes_down"] == 3 * down_bytes(STATE, 7, cfg)  # every sampled client got one
    assert comm["comm_bytes_up_per_client"] == {"g": up_bytes(res), "h": 294 + 3 * 8 + 8 + keys - 24}  # no metric
    assert comm["comm_bytes_up"] == sum(comm["comm_bytes_up_per_client"].values())


def test_the_count_is_flowers_own_count_of_the_messages_it_sends():
    big = {"layer.weight": torch.randn(128, 384), "n": torch.zeros((), dtype=torch.int64)}
    assert tensor_bytes(big) == ArrayRecord(torch_state_dict=big).count_bytes()
    rec = {"a": 1, "bb": 2.5, "losses": [0.1, 0.2, 0.3]}
    assert record_bytes(rec) == MetricRecord(rec).count_bytes()
    cfg = {"round": 3, "fit_config": '{"x": 1}', "flag": True}
    assert record_bytes(cfg) == ConfigRecord(cfg).count_bytes()

    fit_config = {"metrics": ["heldout_alignment"]}
    msg = instruction("train", 5, '{"setup": "the run flags"}', 3, big, fit_config)
    assert payload_bytes(msg) == down_bytes(big, 3, fit_config)
    res = FitResult("g", big, 11, 30, [1.0, 2.0, 3.0], 90, {"heldout_alignment": 0.5})
    reply = fit_reply(msg_with_id(msg), res)
    assert payload_bytes(reply) == up_bytes(res)
    # what goes on the wire: the payload plus protobuf framing (and, down, the setup string)
    for m, counted, extra in ((msg, down_bytes(big, 3, fit_config), len('{"setup": "the run flags"}')),
                              (reply, up_bytes(res), 0)):
        wire = recorddict_to_proto(m.content).ByteSize()
        assert counted + extra <= wire <= counted + extra + 400, (counted, wire)


SYN = ["--dataset", "synthetic", "--syn_groups", "5", "--syn_questions", "40", "--syn_dim", "16", "--d_model", "16",
       "--dim_feedforward", "16", "--num_layers", "1", "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10",
       "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5", "--wandb", "off", "--quiet",
       "--no_plots"]
FED = ["--epochs", "2", "--comm_round", "4", "--federated_eval", "2", "--client_engine", "loop"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_logs_per_round_bytes_whose_sums_are_the_summary_totals(tmp_path):
    assert main("fedavg", [*SYN, *FED, "--out_dir", str(tmp_path / "f")]) == 0
    losses, metrics = read(tmp_path / "f" / "losses.jsonl"), read(tmp_path / "f" / "metrics.jsonl")
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    down, up = sum(r["comm_bytes_down"] for r in losses), sum(r["comm_bytes_up"] for r in losses)
    assert (summary["total_comm_bytes_down"], summary["total_comm_bytes_up"]) == (down, up) and down > 0
    assert losses[-1]["comm_bytes_down_total"] == down and losses[-1]["comm_bytes_up_total"] == up
    assert [m["comm_bytes_total"] for m in metrics] == [0] + [
        r["comm_bytes_down_total"] + r["comm_bytes_up_total"] for r in losses if r["round"] in (2, 4)]
    conv = next(r for r in losses if r["round"] == summary["convergence_round"])
    assert summary["convergence_comm_bytes"] == conv["comm_bytes_down_total"] + conv["comm_bytes_up_total"]
    assert summary["pooling_bytes"] > 0
    # the centralized baseline moves no weights; its one-off cost is pooling the same local data
    assert main("centralized", [*SYN, "--central_epochs", "2", "--eval_freq", "2", "--out_dir", str(tmp_path / "c")]) == 0
    c_sum = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert c_sum["pooling_bytes"] == summary["pooling_bytes"] and "total_comm_bytes" not in c_sum
    assert all("comm_bytes_down" not in r for r in read(tmp_path / "c" / "losses.jsonl"))


def test_pooling_bytes_and_human_units():
    class G:
        num_points, x = 10, torch.zeros(10, 7)
    assert pooling_bytes([G(), G()]) == 2 * 10 * 8 * 4
    assert [human_bytes(v) for v in (None, 12, 1500, 2.5e6, 3.25e9)] == ["—", "12 B", "1.50 kB", "2.50 MB", "3.25 GB"]


def test_payload_ignores_the_setup_string():
    small = instruction("train", 1, "x" * 1000, 1, STATE)
    assert payload_bytes(small) == down_bytes(STATE, 1, None)
