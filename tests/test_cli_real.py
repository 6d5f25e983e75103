"""Both command lines, as users run them, on the real survey data with MiniLM embeddings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--emb_model", "minilm", "--wandb", "off", "--quiet", "--d_model", "32", "--dim_feedforward", "32",
        "--num_layers", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.setdefault("PLURALLLM_CACHE_DIR", str(tmp_path_factory.mktemp("emb_cache")))
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    return e


def cli(script, env, *args):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_cli_on_opinionqa(opinionqa_dir, env, tmp_path):
    out = tmp_path / "fl"
    log = cli("main_fl.py", env, "--dataset", "opinionqa", "--data_path", str(opinionqa_dir), "--comm_round", "3",
              "--federated_eval", "3", "--epochs", "2", "--out_dir", str(out), *FAST)
    assert "loaded opinionqa: 10 train + 7 eval groups, dim 384" in log
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 3]
    assert len(recs[-1]["eval_group_scores"]) == 7 and len(recs[-1]["train_loss_per_client"]) == 10
    config = json.loads((out / "config.json").read_text())
    assert config["metric"] == "wasserstein" and config["data"]["embedding"]["dim"] == 384


def test_centralized_cli_on_globalqa_sample(globalqa_csv, env, tmp_path):
    out = tmp_path / "c"
    cli("main_centralized.py", env, "--dataset", "globalqa", "--data_path", str(globalqa_csv),
        "--central_epochs", "2", "--eval_freq", "1", "--eval_num_qs", "5", "--min_ctx_num_qs", "2",
        "--max_ctx_num_qs", "8", "--min_tar_num_qs", "2", "--max_tar_num_qs", "8", "--out_dir", str(out), *FAST)
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert sorted(recs[-1]["eval_group_scores"]) == sorted(["China", "Japan", "France", "Spain", "Brazil",
                                                             "New Zealand"])
    assert 0 < recs[-1]["eval_alignment_score"] < 1


def test_globalqa_sample_with_paper_defaults_explains_too_few_questions(globalqa_csv, env):
    proc = subprocess.run([sys.executable, "main_fl.py", "--data_path", str(globalqa_csv), "--comm_round", "1",
                           *FAST], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    assert ("'India (Current national sample)' has 11 local questions (0.9 of 13), fewer than "
            "--min_ctx_num_qs + --min_tar_num_qs = 20") in proc.stderr
    assert "embedding" not in proc.stdout  # failed before any embedding work
