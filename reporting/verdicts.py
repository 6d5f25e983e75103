"""Which of the paper's claims hold (statuses: templates/reproduce_sections.md), under which definition."""
from __future__ import annotations

from .convergence import DEFINITIONS
from .prose import snippets
from .runs import METHOD_LABELS, RunSet
from .tables import (
    PAIR_TEXT,
    PAIRS,
    Headline,
    Stat,
    compare,
    md_table,
    method_stats,
    no_variance,
    pct_fewer,
    seed_values,
    significance,
    stat_cell,
)

# (headline key, the claim as the paper makes it)
CLAIMS = (
    ("rounds_fewer_pct", "FedAvg converges in fewer rounds than centralized training (paper: round 634 vs 1,180)"),
    ("alignment_gain_pct", "FedAvg reaches a higher final mean evaluation alignment (paper: about +4%)"),
    ("fi_diff", "Both methods are fair across groups, FI ≈ 1 (paper)"),
)


def status(key: str, measured: float | None, paired: Stat, fi: tuple[float | None, float | None] = (None, None)) -> str:
    if measured is None:
        return "not measured"
    if key == "fi_diff":
        f, c = fi
        ok = f is not None and c is not None and min(f, c) >= 0.99 and abs(measured) < 0.01
        return "holds" if ok else "does not hold"
    sig = significance(paired)
    if measured > 0 and sig == "degenerate":
        return f"same direction, {no_variance(paired.n)}"
    if measured > 0:
        return "holds" if sig == "excludes" else "same direction, not significant"
    return "reversed" if sig == "excludes" and measured < 0 else "does not hold"


def claims_lines(items: list[Headline], fi_means: dict[str, float | None]) -> list[str]:
    """A Markdown table of the claims' status per baseline, and what the matched baseline changes."""
    st: dict[str, dict[str, str]] = {}  # {claim key: {other method: status}} for each pair present
    for h in (h for h in items if h.key in dict(CLAIMS)):
        st.setdefault(h.key, {})[h.b] = status(h.key, h.measured, h.paired, (fi_means.get(h.a), fi_means.get(h.b)))
    others = [b for _, b in PAIRS if any(b in v for v in st.values())]
    if not others:
        return ["No claim could be checked: FedAvg and a centralized baseline must both have finished runs."]
    lines = md_table(["The paper's claim", *(f"against {PAIR_TEXT[b]}" for b in others)],
                     ([text, *(f"**{st.get(key, {}).get(b, 'not measured')}**" for b in others)] for key, text in CLAIMS))
    return [*lines, "", snippets()["claim_status"], "", matched_change(st)]


def matched_change(st: dict[str, dict[str, str]]) -> str:
    """One sentence: which claims change status when the baseline takes FedAvg's gradient steps."""
    t = snippets("verdicts.md")
    pairs = [(claim, v["centralized"], v["centralized_matched"]) for key, claim in CLAIMS
             if (v := st.get(key, {})) and "centralized" in v and "centralized_matched" in v]
    if not pairs:
        return t["matched_not_run"]
    pairs = [(c, a, b) for c, a, b in pairs if "not measured" not in (a, b)]
    changed = [(c, a, b) for c, a, b in pairs if a != b]
    if not pairs or not changed:
        return t["matched_unmeasured" if not pairs else "matched_same"]
    parts = "; ".join(f"“{c.split(' (paper')[0]}”: {a} → {b}" for c, a, b in changed)
    return t["matched_changed"].format(n=len(changed), of=len(pairs), parts=parts,
                                       verb="changes" if len(changed) == 1 else "change")


# ----------------------------------------------------------------------------------------
# convergence definitions (issue 13 item 5)


def definition_rows(runset: RunSet) -> list[dict]:
    """Per definition: the rounds per method and, per pair, the % fewer rounds and its status."""
    vals = seed_values(runset)
    st = method_stats(runset, vals)
    rows = []
    for d in DEFINITIONS:
        row = {"definition": d, "methods": {m: st[d.key][m] for m in runset.methods}, "pairs": {}}
        for a, b in PAIRS:
            if a in runset.methods and b in runset.methods:
                measured, paired = compare(vals, st, d.key, pct_fewer, a, b, runset.paired_seeds(a, b))
                row["pairs"][b] = (measured, paired, status("rounds_fewer_pct", measured, paired))
        rows.append(row)
    return rows


def definitions_lines(runset: RunSet) -> list[str]:
    rows = definition_rows(runset)
    others = [b for _, b in PAIRS if rows and b in rows[0]["pairs"]]
    head = (["Definition"] + [f"{METHOD_LABELS[m]} (round)" for m in runset.methods]
            + [f"FedAvg % fewer rounds than {PAIR_TEXT[b]} (paired) → claim" for b in others])
    def pair(measured: float | None, paired: Stat, s: str) -> str:
        return f"{'–' if measured is None else f'{measured:+.1f}%'} ({stat_cell(paired, '{:+.1f}')}) → **{s}**"
    return [*md_table(head, ([r["definition"].label, *(stat_cell(r["methods"][m], "{:.1f}") for m in runset.methods),
                              *(pair(*r["pairs"][b]) for b in others)] for r in rows)),
            "", flip_sentence(rows, others)]


def flip_sentence(rows: list[dict], others: list[str]) -> str:
    """Whether the 'fewer rounds' claim's status differs between the definitions, per baseline."""
    if not others:
        return "No pair of methods to compare."
    parts, flips = [], 0
    for b in others:
        by_status: dict[str, list[str]] = {}
        for r in rows:
            by_status.setdefault(r["pairs"][b][2], []).append(r["definition"].label)
        missing = by_status.pop("not measured", [])
        gap = f" (not measured under {', '.join(missing)})" if missing else ""
        if not by_status:
            parts.append(f"- against {PAIR_TEXT[b]}: not measured under any definition.")
        elif len(by_status) == 1:
            s, labels = next(iter(by_status.items()))
            under = "the one definition" if len(labels) == 1 else f"all {len(labels)} definitions"
            parts.append(f"- against {PAIR_TEXT[b]}: **{s}** under {under} measured{gap}.")
        else:
            flips += 1
            parts.append(f"- against {PAIR_TEXT[b]}: **flips**: " + "; ".join(
                f"{s} under {', '.join(labels)}" for s, labels in by_status.items()) + f"{gap}.")
    lead = ("**No verdict flips between the definitions.**" if flips == 0 else
            f"**The verdict depends on the definition of convergence** ({flips} of {len(others)} comparisons flip).")
    return "\n".join([f"{lead} The claim that FedAvg converges in fewer rounds:", *parts])
