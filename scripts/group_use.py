"""Why the trained GPO ignores the group (issue 26, item 1), on synthetic data with planted groups.

    python scripts/group_use.py                       # the small protocol below, seed 0
    python scripts/group_use.py --seed 1 --out runs/group_use_s1.json -- --d_model 64

Trains the centralized model and, at each checkpoint epoch, prints the group specificity (own /
partner / consensus alignment, how far predictions move with the partner's answers), where the loss
gradient enters a context token (answer y against option embedding x), and what the targets'
attention does. Flags after `--` are main_centralized.py's and override the protocol's.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_loaders.episodes import collate, sample_batch  # noqa: E402
from orchestration.experiment import make_trainer, run_and_data  # noqa: E402
from training.diagnostics import Diagnostics  # noqa: E402
from training.evaluation import GroupEval, eval_split, group_stats  # noqa: E402
from utils.seeding import generator  # noqa: E402

# No shared preference (gamma 0), strong group preference (beta 3): all there is to learn beyond
# the consensus is the group, and only the context answers say which group it is.
PROTOCOL = ["--dataset", "synthetic", "--syn_groups", "10", "--syn_questions", "60", "--syn_dim", "16",
            "--syn_gamma", "0", "--syn_beta", "3", "--d_model", "32", "--dim_feedforward", "32",
            "--central_steps", "3", "--bound_std", "--wandb", "off"]
CHECKPOINTS = (0, 10, 30, 100, 200, 300)


# --- specificity -------------------------------------------------------------------------
def pair_episode(diag: Diagnostics, pair, kind: str):
    """The episode `Diagnostics` scores a pair on, with context answers `kind` (own / partner)."""
    group = diag.eval_clients[pair.name].local
    ctx = replace(group.subset(pair.ctx), y=diag._answers(pair, kind).to(group.y.dtype))
    return collate([ctx], [torch.arange(len(pair.ctx))], [pair.targets], tgt_groups=[group])


def specificity_block(diag: Diagnostics, train_diag: Diagnostics, heldout_diag: Diagnostics) -> dict:
    spec, controls = diag.specificity(), diag.controls()
    cons = {p.name: GroupEval(p.name, diag.reference.distances("consensus", diag.eval_clients[p.name].local,
                                                                 p.targets, diag.metric)) for p in diag.pairs}
    moves = []
    with torch.no_grad():
        for pair in diag.pairs:
            ep, other = pair_episode(diag, pair, "own"), pair_episode(diag, pair, "partner")
            tv = (diag.model.predict(ep)[0] - diag.model.predict(other)[0]).abs()
            moves.append(torch.zeros(ep.num_tgt_q).index_add_(0, ep.tgt_seg[0], tv) / 2)
    return {"specificity": spec["eval_group_specificity"], "specificity_se": spec["eval_group_specificity_se"],
            "train_specificity": train_diag.specificity()["eval_group_specificity"],
            "train_heldout_specificity": heldout_diag.specificity()["eval_group_specificity"],
            "own": controls["own"], "partner": controls["partner"], "uniform_ctx": controls["uniform"],
            "consensus": group_stats(cons)["alignment_score"],
            "prediction_tv": float(torch.cat(moves).mean())}


# --- gradient channels -------------------------------------------------------------------
def gradient_block(model, ep) -> dict:
    """Where the loss gradient enters the embedder on `ep` (inputs that require a gradient take the
    plain first-layer path, so the input gradients exist)."""
    model.train()
    model.zero_grad(set_to_none=True)
    xc, yc, xt = (t.clone().requires_grad_(True) for t in (ep.xc, ep.yc, ep.xt))
    model.loss(replace(ep, xc=xc, yc=yc, xt=xt)).backward()
    m, mt = ep.ctx_mask, ep.tgt_mask
    first, dim_x = model.embedder[0], model.config.dim_x
    w_x, w_y = first.weight[:, :dim_x].detach(), first.weight[:, dim_x].detach()
    g_w = first.weight.grad
    pre_x = (F.linear(ep.xc, w_x, first.bias.detach())).norm(dim=-1)
    pre_y = (ep.yc.abs() * w_y.norm())
    out = {"dL_dy": float(yc.grad.abs()[m].mean()), "dL_dx": float(xc.grad.norm(dim=-1)[m].mean()),
           "dL_dx_per_dim": float(xc.grad.norm(dim=-1)[m].mean() / math.sqrt(dim_x)),
           "gxi_y": float((yc.grad * ep.yc).abs()[m].mean()),
           "gxi_x": float((xc.grad * ep.xc).sum(-1).abs()[m].mean()),
           "dL_dx_target": float(xt.grad.norm(dim=-1)[mt].mean()),
           "grad_w_y": float(g_w[:, dim_x].norm()), "grad_w_x_per_col": float(g_w[:, :dim_x].norm() / math.sqrt(dim_x)),
           "w_y": float(w_y.norm()), "w_x_per_col": float(w_x.norm() / math.sqrt(dim_x)),
           "answer_share": float((pre_y / pre_x)[m].mean())}
    model.zero_grad(set_to_none=True)
    return out


# --- attention -----------------------------------------------------------------------------
def capture_layer_inputs(model, ep) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(h, num_ctx, key_mask) entering each layer on `ep`."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, a: seen.append((a[0].detach(), a[1], a[2])))
             for layer in model.layers]
    try:
        with torch.no_grad():
            model.eval()
            model.predict(ep)
    finally:
        for h in hooks:
            h.remove()
    return seen


def target_attention(layer, h, num_ctx, key_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, weights [B, H, Nt, Nc], attention output [B, Nt, d]) of the target rows."""
    d = h.shape[-1]
    hd = d // layer.nhead
    w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
    q = F.linear(h[:, num_ctx:], w[:d], b[:d])
    k, v = F.linear(h[:, :num_ctx], w[d:], b[d:]).chunk(2, dim=-1)
    B = h.shape[0]
    split = lambda t: t.view(B, -1, layer.nhead, hd).transpose(1, 2)  # noqa: E731
    logits = (split(q) @ split(k).transpose(-2, -1)) / math.sqrt(hd)
    weights = logits.masked_fill(~key_mask[:, None, None, :], -torch.inf).softmax(-1)
    att = layer.self_attn.out_proj((weights @ split(v)).transpose(1, 2).reshape(B, -1, d))
    return logits, weights, att


@torch.no_grad()
def attention_block(model, diag: Diagnostics) -> dict:
    per_layer = [dict(entropy=[], tv_partner=[], tv_targets=[], out_move=[], cos_corr=[], ctx_mass=[])
                 for _ in model.layers]
    for pair in diag.pairs:
        own_ep, other_ep = pair_episode(diag, pair, "own"), pair_episode(diag, pair, "partner")
        own_in, other_in = capture_layer_inputs(model, own_ep), capture_layer_inputs(model, other_ep)
        xc, xt = F.normalize(own_ep.xc[0], dim=-1), F.normalize(own_ep.xt[0], dim=-1)
        cos = xt @ xc.T  # [Nt, Nc]
        for i, (layer, (h, nc, km), (h2, _, _)) in enumerate(zip(model.layers, own_in, other_in)):
            logits, w, att = target_attention(layer, h, nc, km)
            _, w2, att2 = target_attention(layer, h2, nc, km)
            n = w.shape[-1]
            ent = -(w * w.clamp_min(1e-30).log()).sum(-1) / math.log(n)
            rec = per_layer[i]
            rec["ctx_mass"].append(float(w.sum(-1).mean()))  # all keys are context tokens (the GPO mask)
            rec["entropy"].append(float(ent.mean()))
            rec["tv_partner"].append(float((w - w2).abs().sum(-1).mean() / 2))
            # how different two targets' attention is, for scale: each target against the next one
            rec["tv_targets"].append(float((w[:, :, 1:] - w[:, :, :-1]).abs().sum(-1).mean() / 2))
            rec["out_move"].append(float((att - att2).norm(dim=-1).mean() / att.norm(dim=-1).mean()))
            lg = logits[0] - logits[0].mean(-1, keepdim=True)  # [H, Nt, Nc]
            c = (cos - cos.mean(-1, keepdim=True)).expand_as(lg)
            corr = (lg * c).sum(-1) / (lg.norm(dim=-1) * c.norm(dim=-1)).clamp_min(1e-12)
            rec["cos_corr"].append(float(corr.mean()))
    return [{k: sum(v) / len(v) for k, v in rec.items()} for rec in per_layer]


def measure(trainer, diag, train_diag, heldout_diag, probe) -> dict:
    diag.model.load_state_dict({k: v.detach().clone() for k, v in trainer.global_state.items()})
    return {"spec": specificity_block(diag, train_diag, heldout_diag), "grad": gradient_block(diag.model, probe),
            "attention": attention_block(diag.model, diag)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="model and episode seed (default 0)")
    p.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)),
                   help="epochs at which to measure (default 0,10,30,100,200,300)")
    p.add_argument("--out", default=None, help="write every number as JSON here (default: print only)")
    p.add_argument("extra", nargs="*", help="trainer flags after --, override the protocol's")
    a = p.parse_args(argv)
    checkpoints = sorted(int(c) for c in a.checkpoints.split(","))
    run, data = run_and_data([*PROTOCOL, "--seed", str(a.seed), *a.extra], "centralized")
    trainer = make_trainer(replace(run, client=replace(run.client, metric="jsd")), data, "cpu")
    diag, cfg = trainer.diagnostics, trainer.cfg
    train_diag = Diagnostics(diag.model, diag.train_clients, diag.train_clients, diag.metric, cfg.eval_num_qs,
                             cfg.eval_seed)
    # The training groups again, scored on their held-out questions (no group trains on them),
    # with contexts from their local ones: does what they learned of a training group carry to new questions?
    held = torch.cat([c.heldout.qkeys for c in trainer.clients.values()]).unique()
    heldout_clients = {n: eval_split(data.train[n], trainer.cfg, "eval", held) for n in trainer.clients}
    heldout_diag = Diagnostics(diag.model, heldout_clients, diag.train_clients, diag.metric, cfg.eval_num_qs,
                               cfg.eval_seed)
    probe = sample_batch([c.local for c in trainer.clients.values()], trainer.cfg.sizes,
                         generator(a.seed, "group_use_probe"), shared_sizes=False)
    print(f"train groups {sorted(trainer.clients)}, eval groups {sorted(trainer.eval_clients)}, "
          f"flags {' '.join(PROTOCOL + a.extra)} --seed {a.seed}")
    rows, loss, start = [], None, time.time()
    for epoch in range(checkpoints[-1] + 1):
        if epoch > 0:
            loss = trainer.train_round(epoch)["train_loss"]
        if epoch in checkpoints:
            m = measure(trainer, diag, train_diag, heldout_diag, probe)
            m.update(epoch=epoch, train_loss=loss)
            rows.append(m)
            s, g, at = m["spec"], m["grad"], m["attention"]
            print(f"epoch {epoch:4d}  loss {loss if loss is not None else float('nan'):8.3f}  "
                  f"spec {s['specificity']:+.4f}±{s['specificity_se']:.4f}  train-spec {s['train_specificity']:+.4f} "
                  f"(held-out q {s['train_heldout_specificity']:+.4f})  "
                  f"own {s['own']:.4f} partner {s['partner']:.4f} consensus {s['consensus']:.4f}  "
                  f"predTV {s['prediction_tv']:.2e}  ({time.time() - start:.0f}s)")
            print(f"   grad  |dL/dy| {g['dL_dy']:.2e}  ‖dL/dx‖/√D {g['dL_dx_per_dim']:.2e}  "
                  f"|y·dL/dy| {g['gxi_y']:.2e}  |x·dL/dx| {g['gxi_x']:.2e}  ‖dL/dx_tgt‖ {g['dL_dx_target']:.2e}  "
                  f"‖g w_y‖ {g['grad_w_y']:.2e}  ‖g W_x‖/√D {g['grad_w_x_per_col']:.2e}  answer share {g['answer_share']:.3f}")
            for i, lay in enumerate(at):
                print(f"   attn L{i}  mass {lay['ctx_mass']:.3f}  entropy {lay['entropy']:.3f}  "
                      f"TV(own,partner) {lay['tv_partner']:.2e}  TV(target,next) {lay['tv_targets']:.2e}  "
                      f"out move {lay['out_move']:.2e}  corr(logit,cos) {lay['cos_corr']:+.3f}")
    result = {"protocol": PROTOCOL + a.extra, "seed": a.seed, "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # a small model: one thread is as fast and leaves the machine's other cores alone
    main()
