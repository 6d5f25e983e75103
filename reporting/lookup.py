"""The report's first question, from the diagnostics every run logs (training/diagnostics.py):
does a method beat the consensus lookup, and does it use the group?"""
from __future__ import annotations

from .runs import METHOD_LABELS, RunSet
from .tables import Stat, describe, fmt, md_table, no_variance, significance, vs_consensus

# A specificity below this is too small to matter for any use of the prediction, whatever its CI:
# one thousandth of alignment is a tenth of the smallest difference the paper reports.
NEGLIGIBLE_SPECIFICITY = 1e-3


def _cell(s: Stat, spec: str = "{:+.4f}") -> str:
    if s.mean is None:
        return "—"
    ci = "" if s.ci_low is None else f" [{spec.format(s.ci_low)}, {spec.format(s.ci_high)}]"
    return f"{spec.format(s.mean)}{ci} (n={s.n})"


def beats_line(runset: RunSet, method: str) -> str | None:
    runs = runset.finished(method)
    m = describe([vs_consensus(r) for r in runs.values()])
    if m.mean is None:
        return None
    label = METHOD_LABELS.get(method, method)
    sig = significance(m)
    if sig == "degenerate":  # the same margin on every seed: a zero-width CI tests nothing
        side = "above" if m.mean > 0 else "below" if m.mean < 0 else "level with"
        verdict = f"scores {side} the consensus lookup by the same margin on every seed ({no_variance(m.n)})"
    elif m.mean > 0 and sig != "includes":
        verdict = "**beats** the consensus lookup"
    elif m.mean < 0 and sig != "includes":
        verdict = "**does not beat** the consensus lookup (it scores below it)"
    else:
        verdict = "is **level with** the consensus lookup (the paired 95% CI includes 0)"
    return f"- {label} {verdict}: final alignment − consensus = {_cell(m)}, paired by seed."


def specificity_line(runset: RunSet, method: str) -> str | None:
    runs = runset.finished(method)
    s = describe([r.value("final_eval_group_specificity") for r in runs.values()])
    if s.mean is None:
        return None
    label = METHOD_LABELS.get(method, method)
    ses = [r.value("final_eval_group_specificity_se") for r in runs.values()]
    noise = s.ci_high is not None and s.ci_low <= 0 <= s.ci_high
    if s.n == 1 and ses[0] is not None:
        noise = abs(s.mean) < 2 * ses[0]
    if noise or abs(s.mean) < NEGLIGIBLE_SPECIFICITY:
        why = "within noise of 0" if noise else f"below {NEGLIGIBLE_SPECIFICITY:g} though outside noise"
        words = (f"{why}: **the model ignores the group**; its predictions depend on the question, not on "
                 "whose answers the context holds")
    elif s.mean > 0:
        words = "clearly above 0: the model **uses the group's own context answers**"
    else:
        words = "clearly below 0: another group's answers serve it better than the group's own"
    return f"- {label}: group specificity {_cell(s, '{:+.5f}')}: {words}."


def controls_table(runset: RunSet) -> list[str]:
    rows = [("own", "own context answers"), ("partner", "another evaluation group's answers"),
            ("uniform", "uniform answers"), ("shuffled", "each answer's options shuffled")]
    methods = [m for m in runset.methods if runset.finished(m)]
    vals = {m: {k: describe([(r.value("context_controls") or {}).get(k)
                            for r in runset.finished(m).values()]) for k, _ in rows} for m in methods}
    if not any(vals[m]["own"].mean is not None for m in methods):
        return []
    return md_table(["Context of the same questions", *(METHOD_LABELS.get(m, m) for m in methods)],
                    ([text, *(fmt(vals[m][k].mean) for m in methods)] for k, text in rows))


def curve_table(runset: RunSet) -> list[str]:
    methods = [m for m in runset.methods if runset.finished(m)]
    curves = {m: [r.value("context_curve") for r in runset.finished(m).values()] for m in methods}
    ks = next((c["k"] for m in methods for c in curves[m] if c and c.get("k")), None)
    if not ks:
        return []
    def mean(m: str, part: str, i: int) -> str:
        return fmt(describe([c[part][i] for c in curves[m] if c and len(c.get(part, [])) > i]).mean)
    return md_table(["Context questions", *(f"{METHOD_LABELS.get(m, m)}: seen / unseen" for m in methods)],
                    ([str(k), *(f"{mean(m, 'seen', i)} / {mean(m, 'unseen', i)}" for m in methods)]
                     for i, k in enumerate(ks)))


def lookup_lines(runset: RunSet) -> list[str]:
    """The section's lines (markdown), or a one-line note for runs without diagnostics."""
    if not any("baselines" in (r.summary or {}) for r in runset.all_finished()):
        return ["These runs predate the evaluation diagnostics (consensus and uniform baselines, seen and unseen "
                "questions, group specificity): rerun them to see whether a method beats a table lookup.", ""]
    runs = runset.all_finished()
    cons = describe([r.baseline("consensus") for r in runs])
    uni = describe([r.baseline("uniform") for r in runs])
    seen_n = describe([r.value("final_eval_questions_seen") for r in runs]).mean or 0
    unseen_n = describe([r.value("final_eval_questions_unseen") for r in runs]).mean or 0
    share = seen_n / (seen_n + unseen_n) if seen_n + unseen_n else 0.0
    out = [f"Without any model, the **consensus** lookup (per question, the mean answer of the training groups over "
           f"the questions they train on; uniform where none does) scores {fmt(cons.mean)} mean evaluation "
           f"alignment and the **uniform** predictor {fmt(uni.mean)}, on exactly the targets the models are scored "
           f"on. {100 * share:.1f}% of those targets are *seen*: some training group trains on them.", ""]
    out += [line for m in runset.methods if (line := beats_line(runset, m))]
    out.append("")
    out += unseen_lines(runset)
    out += ["Does the model use the group? Each evaluation group is scored twice on the same targets: with its own "
            "answers to its context questions and with another evaluation group's answers to the same questions "
            "(a fixed, seeded pairing). Group specificity = own − other (mean over groups), at the last evaluation:",
            ""]
    out += [line for m in runset.methods if (line := specificity_line(runset, m))]
    shared = [n for r in runs for _, n in (r.value("eval_specificity_context") or {}).values()]
    if shared:
        out += ["", f"Each pair's context holds the questions both groups answered, up to `--eval_num_qs`: "
                f"{min(shared)}–{max(shared)} context questions per group here."]
    controls = controls_table(runset)
    if controls:
        out += ["", "Controls at the last evaluation (mean alignment of the paired groups on the same targets):", "",
                *controls]
    curve = curve_table(runset)
    if curve:
        out += ["", "Context curve at the last evaluation (GPO's claim: more context answers, better prediction; "
                "targets fixed across sizes; 1 is the smallest context the model accepts), seen / unseen targets:",
                "", *curve]
    out.append("")
    return out


def unseen_lines(runset: RunSet) -> list[str]:
    out = []
    for m in runset.methods:
        runs = runset.finished(m).values()
        finals = [r.value("final_eval_alignment_unseen") for r in runs]
        unis = [r.baseline("uniform", "eval_alignment_unseen") for r in runs]
        final, uni = describe(finals), describe(unis)
        seen = describe([r.value("final_eval_alignment_seen") for r in runs])
        if final.mean is None:
            continue
        gap = describe([None if u is None or f is None else f - u for f, u in zip(finals, unis)])
        out.append(f"- {METHOD_LABELS.get(m, m)} on unseen questions: {fmt(final.mean)} (seen: {fmt(seen.mean)}); "
                   f"uniform scores {fmt(uni.mean)} there, so the model adds {_cell(gap)} on questions no training "
                   "group trained on.")
    return out + ([""] if out else [])
