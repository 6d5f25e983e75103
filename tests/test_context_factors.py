"""Issue 26: --context_factors (an in-context ridge fit of factor loadings) on toys: the hand-computed fold-in,
the paper's model unchanged bit for bit without it, padding, gradients, evaluation and a saved run's predictor."""
import json
from dataclasses import replace

import pytest
import torch
from conftest import load_script

from data_loaders.episodes import collate
from data_loaders.schema import DataError, build_group_data
from data_loaders.synthetic import SyntheticSpec, make_synthetic
from federated.client import GroupClient
from inference import GroupPredictor
from models.gpo import GPO, GPOConfig
from orchestration.cli import build_parser
from orchestration.entry import main as train_main
from orchestration.experiment import check_flags
from utils.checkpoint import load_checkpoint

CFG = GPOConfig(dim_x=6, d_model=16, dim_feedforward=24, nhead=4, num_layers=2)
CTX = [torch.tensor([0, 3, 5]), torch.tensor([1, 2])]
TGT = [torch.tensor([7, 8, 9, 11]), torch.tensor([4, 6])]


def groups(seed=1):
    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=12, dim=6, seed=seed))
    return [build_group_data(raw, n, x) for n in raw.groups]


def factor_model(factors=2, ridge=1e-2, seed=0) -> GPO:
    torch.manual_seed(seed)
    return GPO(replace(CFG, context_factors=factors, factor_ridge=ridge))


def set_linear_head(model: GPO, w_c: torch.Tensor, w_b: torch.Tensor):
    """Head weights that make c(x) = x·w_c and B(x) = x·w_b exactly: hidden = [relu(x), relu(-x), 0]."""
    first, last = model.factor_head[0], model.factor_head[2]
    d = CFG.dim_x
    with torch.no_grad():
        first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
        first.weight[:d] = torch.eye(d)
        first.weight[d:2 * d] = -torch.eye(d)
        for row, w in enumerate([w_c, *w_b.T]):
            last.weight[row, :d], last.weight[row, d:2 * d] = w, -w


def hand_fold_in(base: torch.Tensor, ep, w_c, w_b, ridge: float) -> list[torch.Tensor]:
    """One episode and one question at a time, in float64: the fold-in the model must compute."""
    out = []
    for b in range(ep.xc.shape[0]):
        xc, yc = ep.xc[b][ep.ctx_mask[b]].double(), ep.yc[b][ep.ctx_mask[b]].double()
        seg = ep.ctx_seg[b][ep.ctx_mask[b]]
        logits_c = xc @ w_c.double()
        resid = torch.cat([yc[seg == s] - logits_c[seg == s].softmax(0) for s in range(int(seg.max()) + 1)])
        b_c = xc @ w_b.double()
        a = torch.linalg.inv(b_c.T @ b_c + ridge * torch.eye(w_b.shape[1], dtype=torch.float64)) @ (b_c.T @ resid)
        xt, tseg = ep.xt[b][ep.tgt_mask[b]].double(), ep.tgt_seg[b][ep.tgt_mask[b]]
        logits_t = base[b][ep.tgt_mask[b]].double() + xt @ w_b.double() @ a
        out.append(torch.cat([logits_t[tseg == s].softmax(0) for s in range(int(tseg.max()) + 1)]))
    return out


def test_target_mean_is_the_hand_computed_fold_in():
    model, ep = factor_model(ridge=0.3), collate(groups(), CTX, TGT)
    w_c = torch.linspace(-1, 1, 6)
    w_b = torch.stack([torch.linspace(1, -0.5, 6), torch.tensor([0.5, 0, 1, -1, 2, 0])], 1)
    set_linear_head(model, w_c, w_b)
    with torch.no_grad():
        base = model.predictor(model.encode_targets(ep))[..., 0]
        mean = model.predict_raw(ep)[0]
    want = hand_fold_in(base, ep, w_c, w_b, 0.3)
    for b in range(2):
        torch.testing.assert_close(mean[b][ep.tgt_mask[b]].double(), want[b], rtol=0, atol=1e-6)
    plain = GPO(replace(model.config, context_factors=0))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("factor_head")})
    assert not torch.allclose(mean, plain.predict(ep), atol=1e-3)  # the fold-in moved the prediction


def test_no_factors_is_the_paper_model_bit_for_bit_and_a_zero_head_changes_nothing():
    torch.manual_seed(0)
    paper = GPO(CFG)
    off = factor_model(factors=0)
    assert off.factor_head is None and off.config.to_dict() == {**CFG.to_dict(), "factor_ridge": 1e-2}
    on = factor_model(factors=3)  # the head is drawn last: the other weights are the paper model's
    for name, w in paper.state_dict().items():
        assert torch.equal(w, off.state_dict()[name]) and torch.equal(w, on.state_dict()[name])
    with torch.no_grad():
        on.factor_head[2].weight.zero_(), on.factor_head[2].bias.zero_()
    ep = collate(groups(), CTX, TGT)
    for model in (off, on):  # training path (fused first layer) and evaluation path
        assert torch.equal(model.loss(ep), paper.loss(ep))
        assert torch.equal(model.predict(ep), paper.predict(ep))


def test_padding_does_not_change_the_solution():
    model, gs = factor_model(factors=3), groups()
    batch = model.predict(collate(gs, CTX, TGT))
    for b, g in enumerate(gs):
        alone = model.predict(collate([g], [CTX[b]], [TGT[b]]))[0]
        n = alone.shape[0]
        torch.testing.assert_close(batch[b, :n], alone, rtol=0, atol=1e-6)


def test_gradients_reach_the_head():
    model, ep = factor_model(factors=2), collate(groups(), CTX, TGT)
    model.loss(ep).backward()
    for name, p in model.factor_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.embedder[0].weight.grad.abs().sum() > 0


def test_projected_episodes_carry_the_head_outputs_and_predict_the_same():
    """Evaluation projects x once (GPO.project): the head's 1 + F outputs travel as the last columns."""
    model, gs = factor_model(factors=2), groups()
    proj = [replace(g, x=model.project(g.x)) for g in gs]
    assert proj[0].x.shape[-1] == CFG.d_model + 3
    want = model.predict(collate(gs, CTX, TGT))
    got = model.predict(replace(collate(proj, CTX, TGT), projected=True))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bad_factor_settings_are_refused():
    with pytest.raises(ValueError, match="context_factors"):
        GPO(replace(CFG, context_factors=-1))
    with pytest.raises(ValueError, match="factor_ridge"):
        GPO(replace(CFG, context_factors=2, factor_ridge=0.0))
    for flag, value in (("--context_factors", "-1"), ("--factor_ridge", "0")):
        args = build_parser("fedavg").parse_args(["--dataset", "synthetic", flag, value])
        with pytest.raises(DataError, match=f"{flag} .* must be"):
            check_flags(args)
    ep = replace(collate(groups(), CTX, TGT), ctx_seg=None)
    with pytest.raises(ValueError, match="ctx_seg"):
        factor_model().predict(ep)


def test_a_run_with_factors_is_loaded_by_the_predictor_and_reproduces_its_scores(tmp_path):
    out = tmp_path / "run"
    assert train_main("fedavg", ["--dataset", "synthetic", "--syn_groups", "4", "--syn_questions", "40",
                                 "--syn_dim", "8", "--train_groups", "g00,g01", "--eval_groups", "g02,g03",
                                 "--min_ctx_num_qs", "3", "--max_ctx_num_qs", "10", "--min_tar_num_qs", "3",
                                 "--max_tar_num_qs", "10", "--eval_num_qs", "5", "--epochs", "2", "--d_model", "16",
                                 "--dim_feedforward", "16", "--num_layers", "1", "--nhead", "2", "--wandb", "off",
                                 "--no_plots", "--quiet", "--comm_round", "2", "--federated_eval", "1",
                                 "--context_factors", "2", "--factor_ridge", "0.1", "--out_dir", str(out)]) == 0
    pred = GroupPredictor.from_run(out, log=lambda *a: None)
    assert pred.model.config.context_factors == 2 and pred.model.config.factor_ridge == 0.1
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["eval_group_scores"]
    weights, _, meta = load_checkpoint(out / "checkpoints", "final")
    data = pred.run_data
    for group in ("g02", "g03"):
        client = GroupClient(data.group(group), replace(data.run.client, metric=pred.metric), "eval")
        want = client.evaluate(pred.model, weights, meta["round"]).distances
        ctx_q, tgt, tgt_q = client.eval_questions(meta["round"])
        bank = data.raw.bank
        answers = lambda q_idx: [(bank.questions[bank.row(int(tgt.qkeys[i]))],  # noqa: E731
                                  list(bank.options[bank.row(int(tgt.qkeys[i]))]),
                                  tgt.y[tgt.offsets[i]:tgt.offsets[i + 1]].tolist()) for i in q_idx.tolist()]
        got = torch.from_numpy(pred.distances(answers(ctx_q), answers(tgt_q)))
        assert torch.equal(got, want) and 1.0 - float(got.mean()) == logged[group]


def test_a_trained_factor_model_reads_the_group_beyond_its_untrained_fold_in(request):
    """The small case of docs/group_use.md with --context_factors 4, 40 centralized epochs (960 steps). Measured on
    an AMD EPYC: specificity +0.0160 untrained (a random head already folds in), +0.0272 +- 0.0017 trained; own
    alignment 0.5776 against the consensus 0.5520."""
    mod = load_script("scripts/group_use.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and no spinning against other jobs
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    small = ["--syn_groups", "40", "--syn_questions", "40", "--syn_dim", "8", "--d_model", "16",
             "--dim_feedforward", "16", "--num_layers", "2", "--max_ctx_num_qs", "20", "--max_tar_num_qs", "20",
             "--eval_num_qs", "10", "--central_steps", "1", "--lr", "1e-3", "--context_factors", "4"]
    untrained, trained = [r["spec"] for r in mod.main(["--checkpoints", "0,40", "--", *small])["rows"]]
    assert trained["specificity"] > max(untrained["specificity"] + 0.005, 3 * trained["specificity_se"])
    assert trained["own"] > trained["consensus"] + 0.01
