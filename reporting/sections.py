"""The report's text sections, each computed from the run folders (reporting/report.py assembles them)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .paths import shown
from .runs import METHOD_LABELS, RunSet
from .tables import PAIR_TEXT, PAIRS, PAPER, fmt

DATASET_TEXT = {
    "opinionqa": "OpinionQA (Pew American Trends Panel, US demographic groups; scored with 1 − normalised "
                 "Wasserstein distance over option ordinals, GPO's metric)",
    "globalqa": "GlobalOpinionQA (countries; scored with 1 − Jensen–Shannon distance)",
    "synthetic": "synthetic planted-structure data",
}


def _tally(values: list) -> str:
    """`a` when every run agrees, else `a` (3 runs), `b` (1 run): the runs of one report may come from
    several machines and commits (the queue spans jobs), and the report must not name only the first."""
    counts = Counter(str(v) for v in values)
    if len(counts) == 1:
        return f"`{next(iter(counts))}`"
    return ", ".join(f"`{v}` ({n} run{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


def machine_line(runs: list, manifest: dict | None) -> str:
    envs = [r.config.get("environment") or {} for r in runs]
    threads = (manifest or {}).get("threads")
    commits = [str(e.get("git_commit"))[:10] + (" (dirty tree)" if e.get("git_dirty") else "") for e in envs]
    return (f"- **Machine**: device {_tally([r.config.get('device_resolved') for r in runs])}, "
            f"CPU {_tally([e.get('cpu_model') for e in envs])}, "
            f"{_tally([e.get('cpu_count') for e in envs])} CPU cores"
            + (f", {threads} torch thread(s) per process" if threads else "")
            + f"; torch {_tally([e.get('torch') for e in envs])}; git commit {_tally(commits)}.")


def _steps_per_round(runset: RunSet, method: str) -> float | None:
    for r in runset.finished(method).values():
        if r.losses:
            rounds, steps = r.losses[-1]["round"], r.losses[-1].get("grad_steps")
            if rounds and steps is not None:
                return steps / rounds
    return None


def setup_lines(runset: RunSet, manifest: dict | None) -> list[str]:
    runs = runset.all_finished()
    if not runs:
        return ["No finished runs."]
    fed = next(iter(runset.finished("fedavg").values()), None)
    cen = next(iter(runset.finished("centralized").values()), None)
    mat = next(iter(runset.finished("centralized_matched").values()), None)
    first = fed or cen or mat
    c = first.config
    data = c.get("data") or {}
    emb = data.get("embedding") or {}
    tr, ev = c.get("train_groups") or [], c.get("eval_groups") or []
    same_split = len({json.dumps([r.config.get("train_groups"), r.config.get("eval_groups")]) for r in runs}) == 1
    split = (manifest or {}).get("split_rule") or "as recorded in each run's config.json"
    seeds = sorted({r.seed for r in runs})
    lines = [
        f"- **Data**: {DATASET_TEXT.get(c.get('dataset'), c.get('dataset'))}; source `{shown(data.get('source'))}`, "
        f"{data.get('kept_questions')} questions kept; content hash `{str(data.get('source_hash'))[:12]}`.",
        f"- **Groups**: {len(tr)} training clients / {len(ev)} unseen evaluation groups "
        f"({'the same split for every seed and method' if same_split else 'NOT the same split in every run'}; "
        f"{split}).",
        f"  - train: {', '.join(tr)}",
        f"  - eval: {', '.join(ev)}",
        f"- **Embeddings**: {emb.get('model_id', c.get('emb_model'))}, {c.get('dim_x')} dimensions "
        f"(paper: {PAPER['emb_model']}, {PAPER['emb_dim']}).",
        f"- **Model**: GPO, d_model {c.get('d_model')}, {c.get('num_layers')} layers, {c.get('nhead')} heads, "
        f"FFN {c.get('dim_feedforward')}, precision {c.get('precision')}.",
        f"- **Episodes**: context {c.get('min_ctx_num_qs')}–{c.get('max_ctx_num_qs')} and targets "
        f"{c.get('min_tar_num_qs')}–{c.get('max_tar_num_qs')} questions; local split {c.get('data_split')}; "
        f"evaluation context {c.get('eval_num_qs')} questions (fixed by eval_seed {c.get('eval_seed')}).",
        f"- **Seeds**: {', '.join(map(str, seeds))} ({len(seeds)}); a seed sets initial weights (shared by every "
        "method), episodes and client sampling.",
    ]
    if fed:
        f = fed.config
        lines.append(f"- **FedAvg**: {f.get('comm_round')} rounds, {f.get('epochs')} local steps per client, "
                     f"weighting {f.get('weighting')}, client fraction {f.get('client_fraction')}, "
                     f"engine `{f.get('client_engine_resolved') or f.get('client_engine')}`, evaluation every {f.get('federated_eval')} rounds; "
                     f"{fmt(_steps_per_round(runset, 'fedavg'), '{:.0f}')} gradient steps per round.")
    if cen:
        k = cen.config
        lines.append(f"- **Centralized**: {k.get('central_epochs')} epochs, mode `{k.get('central_mode')}`, "
                     f"evaluation every {k.get('eval_freq')} epochs; "
                     f"{fmt(_steps_per_round(runset, 'centralized'), '{:.0f}')} gradient steps per epoch.")
    if mat:
        k = mat.config
        lines.append(f"- **Centralized, compute-matched**: the centralized baseline with {k.get('central_steps')} "
                     f"steps per training group per epoch (`--central_steps`, = FedAvg's local steps), each on its "
                     f"own episode; {k.get('central_epochs')} epochs, mode `{k.get('central_mode')}`, evaluation "
                     f"every {k.get('eval_freq')} epochs; "
                     f"{fmt(_steps_per_round(runset, 'centralized_matched'), '{:.0f}')} gradient steps per epoch.")
    lines.append(machine_line(runs, manifest))
    variant = variant_line(runs)
    if variant:
        lines.append(variant)
    lines.append(f"- **Convergence round** (method.md §7): first round where the training loss, smoothed by a "
                 f"centred moving average of {(first.summary.get('convergence') or {}).get('window_rounds')} "
                 "rounds, has made 95% of its total progress (L₀ − L_t)/(L₀ − L_final).")
    return lines


def run_lines(runset: RunSet) -> list[str]:
    lines = ["| Method | Expected seeds | Finished | Interrupted (no summary.json) | Missing |", "|---|---|---|---|---|"]
    for m, c in runset.counts().items():
        lines.append(f"| {METHOD_LABELS[m]} | {c['expected']} | {c['finished']} | {c['interrupted']} | "
                     f"{c['missing']} |")
    lines.append("")
    lines += ["| Run folder | Method | Seed | Rounds | Wall time (s) | Convergence round |", "|---|---|---|---|---|---|"]
    for r in runset.all_finished():
        s = r.summary or {}
        lines.append(f"| `{r.path.name}` | {r.method} | {r.seed} | {s.get('rounds')} | "
                     f"{fmt(s.get('wall_time_s'), '{:.1f}')} | {s.get('convergence_round')} |")
    for r in runset.interrupted:
        lines.append(f"| `{r.path.name}` | {r.method} | {r.seed} | {r.last_round} of {r.planned_rounds} "
                     "(interrupted, not in the statistics) | – | – |")
    for m in runset.methods:
        for s in runset.missing(m):
            lines.append(f"| – | {m} | {s} | missing (not in the statistics) | – | – |")
    return lines


def reason_lines(runset: RunSet, manifest: dict | None) -> list[str]:
    runs = runset.all_finished()
    if not runs:
        return []
    c = runs[0].config
    fed_steps, cen_steps = _steps_per_round(runset, "fedavg"), _steps_per_round(runset, "centralized")
    rounds = max(r.summary.get("rounds", 0) for r in runs)
    lines = []
    if rounds < PAPER["rounds"]:
        lines.append(f"- **Fewer rounds than the paper**: {rounds} instead of {PAPER['rounds']:,} "
                     f"({100 * rounds / PAPER['rounds']:.0f}%). The convergence round is measured against each "
                     f"run's own final loss, so it is at most {rounds} and only its ratio between the methods "
                     "compares with the paper's 634 vs 1,180; a run that is still improving at its last round "
                     "converges 'late' by construction.")
    late = [r for r in runs if (r.summary or {}).get("convergence_round") is not None
            and r.summary["convergence_round"] >= 0.8 * r.summary.get("rounds", 0)]
    if late:
        names = ", ".join(f"{r.method} s{r.seed} ({r.summary['convergence_round']}/{r.summary['rounds']})"
                          for r in late)
        lines.append(f"- **Still improving at the end**: {len(late)} of {len(runs)} runs reached 95% of their loss "
                     f"progress only in the last 20% of their rounds ({names}): their loss was still falling late in "
                     "the run, and a longer run would likely move their convergence round later.")
    if fed_steps and cen_steps:
        mat_steps = _steps_per_round(runset, "centralized_matched")
        matched = (f" The compute-matched baseline takes {mat_steps:.0f} per epoch, as many as FedAvg per round, "
                   "and separates the two effects: more steps per round, and averaging over clients."
                   if mat_steps else "")
        lines.append(f"- **Rounds hide compute**: per round FedAvg takes {fed_steps:.0f} gradient steps "
                     f"(clients × local steps) and the centralized baseline {cen_steps:.0f} "
                     f"(one per training group), {fed_steps / cen_steps:.1f}× fewer. Counted in gradient steps "
                     "(the compute-normalised figures and the steps row of the table) the comparison can reverse."
                     + matched)
    dim = c.get("dim_x")
    if dim and dim != PAPER["emb_dim"]:
        lines.append(f"- **Embedding model**: {((c.get('data') or {}).get('embedding') or {}).get('model_id')} "
                     f"({dim} dimensions) instead of {PAPER['emb_model']} ({PAPER['emb_dim']}): a smaller "
                     "sentence encoder gives the model different (and fewer) features to learn from.")
    ds = c.get("dataset")
    if ds == "opinionqa":
        lines.append("- **Dataset and metric**: OpinionQA's US demographic groups, scored with 1 − normalised "
                     "Wasserstein distance, instead of GlobalOpinionQA's 14 countries scored with "
                     "1 − JS distance: other groups and another distance, so absolute alignment and FI values "
                     "do not compare with the paper's; the direction of the comparisons does.")
    elif ds == "globalqa":
        src = str((c.get("data") or {}).get("source") or "")
        lines.append(f"- **Dataset**: `{Path(src).name}` with {(c.get('data') or {}).get('kept_questions')} "
                     "questions kept; a country has tens of questions here instead of hundreds in the full "
                     "GlobalOpinionQA, so episodes are much smaller "
                     f"(context {c.get('min_ctx_num_qs')}–{c.get('max_ctx_num_qs')}, evaluation context "
                     f"{c.get('eval_num_qs')} questions) and each group's score rests on few questions.")
    n = min((len(runset.finished(m)) for m in runset.methods), default=0)
    if n < 4:
        lines.append(f"- **Seeds**: {n} per method (paper: 4); the confidence intervals are wide.")
    if c.get("central_mode") == "batched":
        lines.append("- **Centralized mode**: `batched` (the released code: one step per epoch), not the "
                     "paper's sequential one step per group.")
    return lines


# key -> (word when FedAvg's value is positive, word when negative, sentence, the paper's number)
_AGREEMENT = {
    "rounds_fewer_pct": ("fewer", "more", "FedAvg converged in {value:.1f}% {word} rounds than {other}",
                         f"paper: {PAPER['rounds_fewer_pct']:.0f}% fewer, round 634 vs 1,180"),
    "steps_fewer_pct": ("fewer", "more", "In gradient steps FedAvg needed {value:.1f}% {word} than {other} to converge",
                        f"paper, implied: {abs(PAPER['steps_fewer_pct']):.0f}% more"),
    "alignment_gain_pct": ("higher", "lower",
                           "FedAvg's final mean evaluation alignment is {value:.2f}% {word} than {other}",
                           "paper: about +4%"),
    "best_alignment_gain_pct": ("higher", "lower",
                                "Best-over-training mean evaluation alignment: FedAvg {value:.2f}% {word} than {other}",
                                None),
    "worst_alignment_diff": ("higher", "lower",
                             "FedAvg's worst evaluation group scores {value:.4f} {word} than {other}'s",
                             "paper: not reported"),
}
_AGAINST = {"centralized": "Against the paper's centralized baseline (one gradient step per training group per epoch):",
            "centralized_matched": "Against the compute-matched centralized baseline (as many gradient steps per "
                                   "epoch as FedAvg takes per round, so rounds and gradient steps compare alike):"}


def agreement_lines(items) -> list[str]:
    out = []
    for a, b in PAIRS:
        pair = [h for h in items if (h.a, h.b) == (a, b)]
        if not pair:
            continue
        out += ["", _AGAINST[b], ""] if out else [_AGAINST[b], ""]
        for h in pair:
            if h.measured is None:
                out.append(f"- {h.label}: not measured.")
            elif h.key in _AGREEMENT:
                up, down, sentence, paper = _AGREEMENT[h.key]
                word = up if h.measured > 0 else down
                note = f" ({paper})" if paper and b == "centralized" else ""
                out.append("- " + sentence.format(value=abs(h.measured), word=word, other=PAIR_TEXT[b]) + note
                           + f": **{h.verdict}**.")
            elif h.key == "fi_diff":
                out.append(f"- Fairness: FI difference {h.measured:+.5f} against {PAIR_TEXT[b]} (paper: FI ≈ 1 for "
                           f"both): **{h.verdict}**.")
    return out


def means_line(runset: RunSet, st: dict) -> str:
    """Convergence round and final alignment, mean over seeds, per method."""
    def part(key, spec):
        return ", ".join(f"{METHOD_LABELS[m]} {fmt(st[key][m].mean, spec)}" for m in runset.methods)
    return (f"Convergence round, mean over seeds: {part('convergence_round', '{:.1f}')} (paper: FedAvg 634, "
            f"centralized 1,180). Final mean evaluation alignment: {part('final_eval_alignment_score', '{:.4f}')}.")


# Flags where the released code differs from the paper (method.md §8), as (key, paper's value).
VARIANT_KEYS = (("loss_reduction", "sum"), ("layer_init", "independent"), ("episode_bounds", "flags"),
                ("grad_clip", 0.0), ("central_mode", "sequential"), ("weighting", "dataset_size"),
                ("eval_resample", False))


def variant_line(runs) -> str | None:
    """The flags that differ from the paper's protocol (the released-code variant), if any."""
    diffs = {}
    for r in runs:
        for key, paper in VARIANT_KEYS:
            v = r.config.get(key, paper)
            if v != paper:
                diffs.setdefault(key, (v, paper))
    if not diffs:
        return None
    text = ", ".join(f"`--{k} {v}` (paper: {p})" for k, (v, p) in diffs.items())
    return f"- **Variant**: {text}."
