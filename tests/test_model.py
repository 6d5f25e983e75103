"""GPO model: equal to the GPO-masked nn.TransformerEncoder, vectorised softmax, one-pass scoring."""
import math

import pytest
import torch
import torch.nn as nn

from data_loaders.episodes import collate
from data_loaders.schema import build_group_data
from data_loaders.synthetic import SyntheticSpec, make_synthetic
from models.gpo import GPO, GPOConfig, segment_softmax


def tiny_model(dim_x=6, seed=0):
    torch.manual_seed(seed)
    return GPO(GPOConfig(dim_x=dim_x, d_model=16, dim_feedforward=24, nhead=4, num_layers=2))


def reference_targets(model: GPO, ep) -> torch.Tensor:
    """The original formulation: full self-attention over [ctx; tgt] with the GPO mask."""
    layer = nn.TransformerEncoderLayer(16, 4, 24, 0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, len(model.layers), enable_nested_tensor=False)
    for ref, ours in zip(enc.layers, model.layers):
        ref.load_state_dict(ours.state_dict(), strict=False)
    ctx = torch.cat([ep.xc, ep.yc.unsqueeze(-1)], -1)
    tgt = torch.cat([ep.xt, torch.zeros_like(ep.xt[..., :1])], -1)
    h = model.embedder(torch.cat([ctx, tgt], 1))
    nc, nt = ep.xc.shape[1], ep.xt.shape[1]
    mask = torch.full((nc + nt, nc + nt), float("-inf"))
    mask[:, :nc] = 0.0
    pad = torch.cat([~ep.ctx_mask, torch.zeros_like(ep.tgt_mask)], 1)
    enc.eval()
    with torch.no_grad():
        return enc(h, mask=mask, src_key_padding_mask=pad)[:, nc:]


def toy_episode(seed=1):
    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=12, dim=6, seed=seed))
    gs = [build_group_data(raw, n, x) for n in raw.groups]
    ctx = [torch.tensor([0, 3, 5]), torch.tensor([1, 2])]
    tgt = [torch.tensor([7, 8, 9, 11]), torch.tensor([4, 6])]
    return collate(gs, ctx, tgt), gs


def test_matches_masked_transformer_encoder():
    model = tiny_model().eval()
    ep, _ = toy_episode()
    with torch.no_grad():
        ours = model.encode_targets(ep)
    ref = reference_targets(model, ep)
    real = ep.tgt_mask
    assert torch.allclose(ours[real], ref[real], atol=1e-5)


def test_segment_softmax_exact():
    vals = torch.tensor([[0.0, math.log(3.0), 5.0, 1.0], [2.0, 2.0, 9.0, 0.0]])
    seg = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = segment_softmax(vals, seg, mask, 2)
    expected = torch.tensor([[0.25, 0.75, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-7)


def test_predict_all_targets_equals_one_at_a_time():
    model = tiny_model().eval()
    _, gs = toy_episode()
    g = gs[0]
    ctx = torch.tensor([0, 1, 2])
    targets = torch.arange(3, g.num_questions)
    together = model.predict(collate([g], [ctx], [targets]))[0]
    alone = torch.cat([model.predict(collate([g], [ctx], [t.view(1)]))[0] for t in targets])
    assert torch.allclose(together[: len(alone)], alone, atol=1e-6)
    sums = torch.zeros(len(targets)).index_add(0, collate([g], [ctx], [targets]).tgt_seg[0], together)
    assert torch.allclose(sums, torch.ones(len(targets)), atol=1e-6)


def test_padding_does_not_change_predictions():
    model = tiny_model().eval()
    ep, gs = toy_episode()
    batched = model.predict(ep)
    single = model.predict(collate([gs[1]], [torch.tensor([1, 2])], [torch.tensor([4, 6])]))
    n = int(ep.tgt_mask[1].sum())
    assert torch.allclose(batched[1, :n], single[0, :n], atol=1e-6)


def test_loss_is_gaussian_nll_summed_over_real_targets():
    model = tiny_model().eval()
    ep, _ = toy_episode()
    mean, std = model.predict_raw(ep)
    dist = torch.distributions.Normal(mean, std)
    expected = -(dist.log_prob(ep.yt) * ep.tgt_mask).sum(-1).mean()
    assert torch.allclose(model.loss(ep), expected, atol=1e-5)


def test_score_group_projected_path_equals_gathering_the_embeddings():
    """Evaluation embeds a group's points once (GPO.project) and gathers d_model-wide rows;
    the distances equal those of a plainly collated episode, with and without chunks."""
    from training.evaluation import score_group
    from utils.distances import score_questions
    raw, x = make_synthetic(SyntheticSpec(num_groups=2, num_questions=30, dim=6, seed=3))
    group = build_group_data(raw, next(iter(raw.groups)), x)
    local, heldout = group.split(0.8)
    model = tiny_model()
    model.eval()
    for ctx, ctx_q, tgt, tgt_q in ((group, torch.tensor([4, 0, 17]), group, torch.tensor([1, 2, 3, 9, 29])),
                                   (local, torch.tensor([5, 6]), heldout, torch.arange(heldout.num_questions))):
        ep = collate([ctx], [ctx_q], [tgt_q], tgt_groups=[tgt])
        pred = model.predict(ep)[0]
        sizes = tgt.sizes[tgt_q]
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        want = score_questions(pred.double(), ep.yt[0].double(), offsets, metric="jsd")
        for chunk in (0, 2):
            got = score_group(model, ctx, ctx_q, tgt, tgt_q, "jsd", chunk=chunk).distances
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def loss_and_grads_on_both_paths(model: GPO, ep) -> list[tuple[torch.Tensor, dict]]:
    """[(loss, gradients)] through FirstLayer (the training path), then through the plain path."""
    out = []
    for fused in (True, False):
        model.zero_grad()
        model._fused_first_layer = (lambda e: True) if fused else (lambda e: False)
        loss = model.loss(ep)
        loss.backward()
        out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    return out


def test_first_layer_function_gives_autograds_gradients():
    """FirstLayer (training path) against autograd through the sliced weight (plain path)."""
    from models.gpo import FirstLayer
    model, (ep, _) = tiny_model(), toy_episode()
    grads = loss_and_grads_on_both_paths(model, ep)
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6)
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], atol=1e-6), name
    gen = torch.Generator().manual_seed(0)
    xc, yc, xt = (torch.randn(2, 4, 5, generator=gen, dtype=torch.double),
                  torch.rand(2, 4, generator=gen, dtype=torch.double),
                  torch.randn(2, 3, 5, generator=gen, dtype=torch.double))
    w = torch.randn(7, 6, generator=gen, dtype=torch.double, requires_grad=True)
    b = torch.randn(7, generator=gen, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b: FirstLayer.apply(xc, yc, xt, w, b), (w, b))


def test_last_layer_computes_target_rows_only():
    """The last layer's context rows feed nothing; skipping them changes no target row."""
    model, (ep, _) = tiny_model(), toy_episode()
    h = torch.randn(2, ep.xc.shape[1] + ep.xt.shape[1], 16)
    layer, nc = model.layers[-1], ep.xc.shape[1]
    full = layer(h, nc, ep.ctx_mask)
    assert torch.allclose(layer(h, nc, ep.ctx_mask, targets_only=True), full[:, nc:], atol=1e-6)


def test_inputs_that_want_a_gradient_get_one():
    """FirstLayer computes the weights' gradient only: an episode whose inputs require one takes the plain path."""
    from dataclasses import replace
    model, (ep, _) = tiny_model(), toy_episode()
    xc = ep.xc.clone().requires_grad_(True)
    model.loss(replace(ep, xc=xc)).backward()
    assert xc.grad is not None and xc.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_training_step_on_cuda_matches_cpu():
    """FirstLayer writes its weight gradient through strided out= views; cuBLAS must agree."""
    model, (ep, _) = tiny_model(), toy_episode()
    cpu = loss_and_grads_on_both_paths(model, ep)[0]
    gpu_model = tiny_model().cuda()
    gpu = loss_and_grads_on_both_paths(gpu_model, ep.to("cuda"))[0]
    assert torch.allclose(cpu[0], gpu[0].cpu(), rtol=1e-4)
    for name, g in cpu[1].items():
        assert torch.allclose(g, gpu[1][name].cpu(), rtol=1e-3, atol=1e-5), name
