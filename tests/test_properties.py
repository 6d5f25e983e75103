"""Property-based tests of the survey parser and the fairness metrics (hypothesis)."""
import csv
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_loaders.globalqa import load_globalqa, parse_options, parse_selections
from data_loaders.schema import DataError
from utils.metrics import cov, fairness_index

COUNTRIES = ["Japan", "China", "Nigeria"]
finite = st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
option = st.one_of(st.text(min_size=1, max_size=8), st.integers(-5, 100), finite)


def hub_selections(d: dict) -> str:
    return f"defaultdict(<class 'list'>, {d!r})"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.lists(finite, max_size=6), max_size=5))
def test_selections_round_trip(d):
    assert parse_selections(hub_selections(d))[0] == d


@settings(max_examples=200, deadline=None)
@given(st.lists(option, max_size=8))
def test_options_round_trip_as_text(opts):
    assert parse_options(repr(opts)) == [str(o) for o in opts]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_raises_what_the_loader_counts(text):
    """Garbage never escapes as an unexpected exception type (the loader counts these)."""
    for parse in (parse_selections, parse_options):
        try:
            parse(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass


@st.composite
def rows(draw):
    """CSV rows: well-formed ones, and ones damaged in the ways survey files are."""
    out = []
    for i in range(draw(st.integers(1, 8))):
        n = draw(st.integers(1, 4))
        opts = [f"o{j}" for j in range(n)]
        sel = {}
        for c in draw(st.lists(st.sampled_from(COUNTRIES), unique=True, max_size=3)):
            length = draw(st.sampled_from([n, n, n, n + 1]))
            sel[c] = draw(st.lists(st.floats(-0.5, 1.0, allow_nan=False), min_size=length, max_size=length))
        text = hub_selections(sel)
        damage = draw(st.sampled_from(["none", "none", "none", "cut", "set", "options"]))
        if damage == "cut":
            text = text[: len(text) // 2]
        elif damage == "set":
            text = "defaultdict(<class 'list'>, {1, 2})"
        option_text = "'one'" if damage == "options" else repr(opts)
        out.append([f"Q{i}" if draw(st.booleans()) or i else "", text, option_text, "GAS"])
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows())
def test_loader_accounts_for_every_row_and_keeps_only_distributions(tmp_path, data):
    path = tmp_path / "g.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "selections", "options", "source"])
        w.writerows(data)
    present = {c for r in data for c in COUNTRIES if f"'{c}'" in r[1]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = load_globalqa(str(path), groups=sorted(present) or ["Japan"], log=lambda *a: None)
    except DataError as e:
        assert "appear in no row's selections" in str(e)  # the only whole-file refusal here
        return
    assert raw.report.kept_questions + sum(raw.report.dropped.values()) == len(data)
    for g in raw.groups.values():
        for p in g.probs:
            assert np.all(p >= 0) and p.sum() == pytest.approx(1.0)


scores = st.lists(st.floats(0.01, 1.0, allow_nan=False), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(scores)
def test_fairness_index_is_one_exactly_when_all_groups_score_the_same(s):
    fi = fairness_index(s)
    assert 0 < fi <= 1
    if max(s) - min(s) > 1e-9:
        assert fi < 1 and cov(s) > 0
    assert fairness_index([s[0]] * len(s)) == 1.0


@settings(max_examples=100, deadline=None)
@given(scores, st.floats(0.1, 10.0))
def test_fairness_index_ignores_the_scale_of_the_scores(s, k):
    assert fairness_index([k * x for x in s]) == pytest.approx(fairness_index(s), rel=1e-9)
