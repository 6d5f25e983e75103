"""Is there a group to read in the context? Non-learned probes of OpinionQA's group signal (issue 26).

    PYTHONPATH=. python scripts/group_signal.py --out benchmarks/results/group_use/signal_split0.2_s0.json \
        -- --dataset opinionqa --emb_model minilm --question_split 0.2 --seed 0
    python scripts/group_signal.py --table benchmarks/results/group_use/signal_*.json   # the report's table

On a run's split, targets and metric, each rule (nearest groups, fold-in, linear tilt; each function
says how, docs/results/group_specificity.md §2 what it found) predicts a group's targets from its context
answers, own or its partner's (the run's seeded derangement): specificity = own − partner. Evaluation
groups use the training groups' consensus, training groups that of the others, outside the held-out set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.experiment import run_and_data  # noqa: E402
from training.diagnostics import partners  # noqa: E402
from utils.distances import score_questions  # noqa: E402
from utils.seeding import generator  # noqa: E402

BETAS = (0.0, 10.0, 30.0, 100.0, 300.0)
FOLDS = (0.01, 0.1, 1.0)
RIDGES = (0.001, 0.01, 0.1, 1.0)


class Group:
    """One group's questions as padded [Q, K] arrays keyed by question key."""

    def __init__(self, g, heldout: set[int]):
        off = g.offsets.tolist()
        self.name, self.keys = g.name, [int(k) for k in g.qkeys.tolist()]
        k_max = max(b - a for a, b in zip(off[:-1], off[1:]))
        q, d = len(self.keys), g.x.shape[1]
        self.p = np.zeros((q, k_max))
        self.z = np.zeros((q, k_max, d))
        self.mask = np.zeros((q, k_max), bool)
        x, y = g.x.double().numpy(), g.y.double().numpy()
        for i, (a, b) in enumerate(zip(off[:-1], off[1:])):
            self.p[i, :b - a], self.mask[i, :b - a] = y[a:b], True
            self.z[i, :b - a] = x[a:b] - x[a:b].mean(0)
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.trainable = np.array([k not in heldout for k in self.keys])
        self.g = g


def score(group: Group, rows: np.ndarray, pred: np.ndarray, metric: str) -> float:
    """Mean alignment (1 − distance) of `pred` [len(rows), K] on the group's questions `rows`."""
    sub = group.g.subset(torch.as_tensor(rows))
    dist = score_questions(torch.as_tensor(pred[group.mask[rows]]), sub.y.double(), sub.offsets, metric=metric,
                           ordinals=sub.ordinals)
    return float(1 - dist.mean())


def consensus(groups: list[Group], keys: list[int], k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean answers of `groups` per key [len(keys), K] and whether any of them trains on it."""
    out, seen = np.zeros((len(keys), k_max)), np.zeros(len(keys), bool)
    for j, k in enumerate(keys):
        rows = [(g.p[g.row[k]]) for g in groups if k in g.row and g.trainable[g.row[k]]]
        if rows:
            out[j, :rows[0].shape[0]] = np.mean(rows, 0)
            seen[j] = True
    return out, seen


def tilt_fit(base: np.ndarray, z: np.ndarray, mask: np.ndarray, p: np.ndarray, ridge: float) -> np.ndarray:
    """w of the linear tilt p ∝ base · exp(z · w) (z the centred option embedding): maximising
    Σ p·log softmax(log base + z·w) − ridge/2 ‖w‖² over the given questions."""
    lb = torch.as_tensor(np.log(np.clip(base, 1e-9, None)))
    zt, pt, mt = torch.as_tensor(z), torch.as_tensor(p), torch.as_tensor(mask)
    w = torch.zeros(z.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (lb + zt @ w).masked_fill(~mt, -torch.inf)
        loss = -(pt * torch.log_softmax(logits, -1).masked_fill(~mt, 0)).sum() + ridge / 2 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy()


def tilted(base: np.ndarray, z: np.ndarray, mask: np.ndarray, w: np.ndarray) -> np.ndarray:
    logit = np.where(mask, np.log(np.clip(base, 1e-9, None)) + z @ w, -np.inf)
    e = np.exp(logit - logit.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def nearest(ctx_p: np.ndarray, ctx_mask: np.ndarray, others: list[np.ndarray], other_tgt: list[np.ndarray],
            beta: float) -> np.ndarray:
    """Training groups' target answers weighted by softmax(−β · mean TV to the context answers); β = 0 is
    the consensus. Seen questions only."""
    d = np.array([0.5 * np.abs(np.where(ctx_mask, ctx_p - o, 0)).sum(-1).mean() for o in others])
    w = np.exp(-beta * (d - d.min()))
    w /= w.sum()
    return np.tensordot(w, np.stack(other_tgt), 1)


def fold_in(ctx_p: np.ndarray, ctx_mask: np.ndarray, ctx_cons: np.ndarray, others: list[np.ndarray],
            other_tgt: list[np.ndarray], tgt_cons: np.ndarray, tgt_mask: np.ndarray, ridge: float) -> np.ndarray:
    """Consensus plus a ridge-fitted combination of the training groups' deviations from it: the group as
    a point in the span of the training groups (collaborative filtering's fold-in). Seen questions only."""
    dev_ctx = np.stack([(o - ctx_cons)[ctx_mask] for o in others], 1)        # [points, T]
    a = np.linalg.solve(dev_ctx.T @ dev_ctx + ridge * np.eye(dev_ctx.shape[1]),
                        dev_ctx.T @ (ctx_p - ctx_cons)[ctx_mask])
    pred = tgt_cons + np.tensordot(a, np.stack([o - tgt_cons for o in other_tgt]), 1)
    pred = np.where(tgt_mask, np.clip(pred, 1e-6, None), 0)
    return pred / pred.sum(-1, keepdims=True)


def probe(group: Group, partner: Group, pool: list[Group], metric: str, n_ctx: int, rng: np.random.Generator,
          draws: int) -> dict:
    """Scores of every rule on `draws` random context/target splits of `group`'s questions."""
    rows = np.flatnonzero(group.trainable) if group.trainable.any() else np.arange(len(group.keys))
    shared = [r for r in rows if group.keys[r] in partner.row]
    out: dict[str, list[float]] = {}

    def add(key: str, rows: np.ndarray, pred: np.ndarray) -> None:
        out.setdefault(key, []).append(score(group, rows, pred, metric))
    cons, seen = consensus(pool, group.keys, group.p.shape[1])  # the same for every draw
    for _ in range(draws):
        ctx = rng.choice(shared, n_ctx, replace=False)
        tgt = np.setdiff1d(np.arange(len(group.keys)), ctx)
        tgt_seen = tgt[seen[tgt]]
        ctx_keys = [group.keys[r] for r in ctx]
        ctx_mask, tgt_mask = group.mask[ctx], group.mask[tgt_seen]
        answers = {"own": group.p[ctx], "partner": np.stack([partner.p[partner.row[k]] for k in ctx_keys])}
        add("uniform_seen", tgt_seen, np.where(tgt_mask, 1, 0) / tgt_mask.sum(-1, keepdims=True))
        add("consensus_seen", tgt_seen, cons[tgt_seen])
        usable = [o for o in pool if all(k in o.row for k in ctx_keys + [group.keys[r] for r in tgt_seen])]
        ctx_others = [o.p[[o.row[k] for k in ctx_keys]] for o in usable]
        tgt_others = [o.p[[o.row[group.keys[r]] for r in tgt_seen]] for o in usable]
        for who, ans in answers.items():
            for beta in BETAS[1:]:
                add(f"nearest_b{beta:g}_{who}", tgt_seen, nearest(ans, ctx_mask, ctx_others, tgt_others, beta))
            for ridge in FOLDS:
                add(f"foldin_r{ridge:g}_{who}", tgt_seen, fold_in(ans, ctx_mask, cons[ctx], ctx_others, tgt_others,
                                                                  cons[tgt_seen], tgt_mask, ridge))
            for ridge in RIDGES:
                w = tilt_fit(cons[ctx], group.z[ctx], ctx_mask, ans, ridge)
                add(f"tilt_r{ridge:g}_{who}", tgt_seen, tilted(cons[tgt_seen], group.z[tgt_seen], tgt_mask, w))
    # how much one direction of the embedding space explains, given 80% of the group's questions
    perm = rng.permutation(np.flatnonzero(seen))
    fit, test = perm[: int(0.8 * len(perm))], perm[int(0.8 * len(perm)):]
    for ridge in RIDGES:
        w = tilt_fit(cons[fit], group.z[fit], group.mask[fit], group.p[fit], ridge)
        add(f"oracle_tilt_r{ridge:g}", test, tilted(cons[test], group.z[test], group.mask[test], w))
    add("oracle_consensus", test, cons[test])
    return {k: float(np.mean(v)) for k, v in out.items()}


TABLE = (("consensus", "consensus_seen"), ("nearest own", "nearest_b100_own"),
         ("nearest partner", "nearest_b100_partner"), ("fold-in own", "foldin_r0.1_own"),
         ("fold-in partner", "foldin_r0.1_partner"), ("tilt own", "tilt_r0.01_own"),
         ("tilt partner", "tilt_r0.01_partner"), ("oracle tilt", "oracle_tilt_r0.01"),
         ("oracle consensus", "oracle_consensus"))


def table(paths: list[str]) -> str:
    """One markdown row per file and role, each rule at one setting (β 100, fold-in ridge 0.1, tilt
    ridge 0.01), read off seed 0 of the leakage-free split and then fixed for every file."""
    head = "| file | groups | " + " | ".join(n for n, _ in TABLE) + " | nearest spec | fold-in spec |"
    rows = [head, "|" + "---|" * (len(TABLE) + 4)]
    for path in paths:
        d = json.loads(Path(path).read_text())
        for role in ("eval", "train"):
            m = d[f"mean_{role}"]
            vals = " | ".join(f"{m[k]:.4f}" if k in m else "–" for _, k in TABLE)
            spec = lambda rule: (f"{m[rule + '_own'] - m[rule + '_partner']:+.4f}"  # noqa: E731
                                 if rule + "_own" in m else "–")
            rows.append(f"| {Path(path).stem} | {role} | {vals} | {spec('nearest_b100')} | {spec('foldin_r0.1')} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n_ctx", type=int, default=20)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("run_flags", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    flags = a.run_flags[1:] if a.run_flags[:1] == ["--"] else a.run_flags
    run, data = run_and_data(flags)
    metric, seed = run.client.metric, run.client.seed
    held = set() if data.heldout_qkeys is None else {int(k) for k in data.heldout_qkeys.tolist()}
    train = {n: Group(g, held) for n, g in data.train.items()}
    evals = {n: Group(g, held) for n, g in data.eval.items()}
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator(seed, "group_signal"))))
    result = {"flags": flags, "metric": metric, "n_ctx": a.n_ctx, "draws": a.draws, "groups": {}}
    for role, groups in (("eval", evals), ("train", train)):
        pairs = partners(list(groups), seed)
        for name, grp in sorted(groups.items()):
            pool = list(train.values()) if role == "eval" else [g for n, g in train.items() if n != name]
            result["groups"][f"{role}:{name}"] = probe(grp, groups[pairs[name]], pool, metric, a.n_ctx, rng, a.draws)
            print(role, name, {k: round(v, 4) for k, v in result["groups"][f"{role}:{name}"].items()}, flush=True)
    for role in ("eval", "train"):
        rows = [v for k, v in result["groups"].items() if k.startswith(role + ":")]
        result[f"mean_{role}"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(role, json.dumps({k: round(v, 4) for k, v in result[f"mean_{role}"].items()}))
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
