"""The report's first question: does a method beat the consensus lookup, and does it use the group?"""
from __future__ import annotations

from .prose import snippets
from .runs import METHOD_LABELS, RunSet
from .tables import Stat, describe, fmt, md_table, significance, vs_consensus

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
    sig, side = significance(m), "above" if m.mean > 0 else "below" if m.mean < 0 else "level"
    # the same margin on every seed: a zero-width CI tests nothing
    case = "degenerate" if sig == "degenerate" else "level" if sig == "includes" else side
    return snippets()[f"beats_{case}"].format(method=METHOD_LABELS.get(method, method), cell=_cell(m), n=m.n,
                                              side=side.replace("level", "level with"))


def specificity_line(runset: RunSet, method: str) -> str | None:
    runs = runset.finished(method)
    s = describe([r.value("final_eval_group_specificity") for r in runs.values()])
    if s.mean is None:
        return None
    ses = [r.value("final_eval_group_specificity_se") for r in runs.values()]
    noise = s.ci_high is not None and s.ci_low <= 0 <= s.ci_high
    if s.n == 1 and ses[0] is not None:
        noise = abs(s.mean) < 2 * ses[0]
    case = ("noise" if noise else "negligible" if abs(s.mean) < NEGLIGIBLE_SPECIFICITY
            else "above" if s.mean > 0 else "below")
    return snippets()[f"specificity_{case}"].format(method=METHOD_LABELS.get(method, method),
                                                    cell=_cell(s, "{:+.5f}"), negligible=NEGLIGIBLE_SPECIFICITY)


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
    text = snippets()
    if not any("baselines" in (r.summary or {}) for r in runset.all_finished()):
        return [text["no_diagnostics"], ""]
    runs = runset.all_finished()
    cons = describe([r.baseline("consensus") for r in runs])
    uni = describe([r.baseline("uniform") for r in runs])
    seen_n = describe([r.value("final_eval_questions_seen") for r in runs]).mean or 0
    unseen_n = describe([r.value("final_eval_questions_unseen") for r in runs]).mean or 0
    share = seen_n / (seen_n + unseen_n) if seen_n + unseen_n else 0.0
    out = [text["lookup"].format(cons=fmt(cons.mean), uni=fmt(uni.mean), share=100 * share), ""]
    out += [line for m in runset.methods if (line := beats_line(runset, m))]
    out += ["", *unseen_lines(runset), text["specificity"], ""]
    out += [line for m in runset.methods if (line := specificity_line(runset, m))]
    shared = [n for r in runs for _, n in (r.value("eval_specificity_context") or {}).values()]
    if shared:
        out += ["", text["shared_context"].format(low=min(shared), high=max(shared))]
    for key, table in (("controls", controls_table(runset)), ("curve", curve_table(runset))):
        if table:
            out += ["", text[key], "", *table]
    return out + [""]


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
        out.append(snippets()["unseen"].format(method=METHOD_LABELS.get(m, m), final=fmt(final.mean),
                                                       seen=fmt(seen.mean), uni=fmt(uni.mean), gap=_cell(gap)))
    return out + ([""] if out else [])
