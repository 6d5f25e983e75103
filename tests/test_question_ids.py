"""Issue 26: --question_ids (one-hot question identities after the option embeddings) on toys: the exact columns,
the held-out questions without one, weights that start at 0 and stay there for a question no client trains on,
the paper's model unchanged without it, and the refusals (Flower, the text predictor)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_loaders.episodes import collate
from data_loaders.question_ids import with_question_ids
from data_loaders.schema import DataError, GroupData, QuestionBank
from inference.loading import embedding_of
from models.gpo import GPO, GPOConfig
from orchestration.cli import build_parser
from orchestration.config import check_federation, run_config
from orchestration.entry import main as train_main

BANK = QuestionBank(qkeys=[3, 7, 9], questions=["a", "b", "c"], options=[["x", "y"], ["z"], ["u", "v", "w"]])
EMB = torch.arange(12, dtype=torch.float32).reshape(6, 2)


def test_every_question_gets_its_column_on_its_options_rows():
    out, n = with_question_ids(BANK, EMB, None)
    assert n == 3
    assert torch.equal(out[:, :2], EMB)
    assert out[:, 2:].tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]


def test_held_out_questions_get_no_column():
    out, n = with_question_ids(BANK, EMB, torch.tensor([7]))
    assert n == 2
    assert out[:, 2:].tolist() == [[1, 0], [1, 0], [0, 0], [0, 1], [0, 1], [0, 1]]


CFG = GPOConfig(dim_x=7, d_model=16, dim_feedforward=24, nhead=4, num_layers=2)


def built(cfg, seed=0):
    torch.manual_seed(seed)
    return GPO(cfg)


@pytest.mark.parametrize("extra", [{}, {"context_answer": "product"}, {"context_factors": 2}])
def test_id_weights_start_at_zero_and_the_rest_is_the_model_without_them(extra):
    plain, ids = built(replace(CFG, **extra)), built(replace(CFG, question_ids=3, **extra))
    first = ids.embedder[0].weight
    assert first[:, 4:7].abs().sum() == 0
    if extra.get("context_answer") == "product":
        assert first[:, -3:].abs().sum() == 0 and first[:, 8:-3].abs().sum() > 0
    if extra.get("context_factors"):
        assert ids.factor_head[0].weight[:, 4:].abs().sum() == 0
    for (name, a), b in zip(plain.state_dict().items(), ids.state_dict().values()):
        nonzero = b != 0
        assert torch.equal(a[nonzero], b[nonzero]), name


def test_a_question_no_client_trains_on_keeps_zero_weights():
    """Adam moves a weight only where it has a gradient: the column of a question in no episode stays exactly 0."""
    model = built(replace(CFG, question_ids=3))
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(8, 4, generator=g), torch.zeros(8, 3)], dim=1)
    x[:4, 4], x[4:, 5] = 1, 1  # two questions, ids 0 and 1; id 2 never appears
    group = GroupData("g", x, torch.tensor([.5, .5, .2, .8, .3, .7, .6, .4]), torch.tensor([0, 2, 4, 6, 8]),
                      torch.tensor([0, 1, 2, 3]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.loss(collate([group], [torch.tensor([0, 1])], [torch.tensor([2, 3])])).backward()
        opt.step()
    first = model.embedder[0].weight
    assert first[:, 6].abs().sum() == 0
    assert first[:, 4].abs().sum() > 0 and first[:, 5].abs().sum() > 0


def test_question_ids_must_fit_the_input():
    with pytest.raises(ValueError, match="question_ids 8: give 0 .off. or at most dim_x .7."):
        GPO(replace(CFG, question_ids=8))


def flags(*extra):
    return build_parser("fedavg").parse_args(["--dataset", "synthetic", *extra])


def test_flower_refuses_question_ids():
    with pytest.raises(DataError, match="--question_ids does not work with --engine flower"):
        check_federation(run_config(flags("--engine", "flower", "--question_ids")))


def test_the_text_predictor_refuses_a_run_with_question_ids():
    with pytest.raises(DataError, match="trained with --question_ids"):
        embedding_of({"model_config": {"question_ids": 5}, "data": {"embedding": {"emb_model": "minilm"}}}, 389, "run r")


SMALL = ["--dataset", "synthetic", "--syn_groups", "4", "--syn_questions", "40", "--syn_dim", "8",
         "--train_groups", "g00,g01", "--eval_groups", "g02,g03", "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10",
         "--min_tar_num_qs", "3", "--max_tar_num_qs", "10", "--eval_num_qs", "5", "--epochs", "2", "--d_model", "16",
         "--dim_feedforward", "16", "--num_layers", "1", "--nhead", "2", "--wandb", "off", "--no_plots", "--quiet",
         "--comm_round", "2", "--federated_eval", "1"]


@pytest.mark.parametrize("split, columns", [("0", 40), ("0.25", 30)])
def test_a_run_records_its_question_columns(tmp_path, split, columns):
    out = tmp_path / "run"
    assert train_main("fedavg", [*SMALL, "--question_ids", "--question_split", split, "--out_dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["question_ids"] == columns
    assert config["dim_x"] == 8 + columns and config["model_config"]["question_ids"] == columns
    scores = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval_group_scores"]
    assert all(np.isfinite(v) for v in scores.values())
