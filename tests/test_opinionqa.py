"""OpinionQA loader: real shared data (hand-checked numbers) and tiny synthetic layouts."""
from __future__ import annotations

import csv
import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from data_loaders.opinionqa import OPINIONQA_GROUPS, load_opinionqa
from data_loaders.schema import DataError, RawDataset


def _quiet(*_: object) -> None:
    pass


@lru_cache(maxsize=None)
def _real(folder: str) -> RawDataset:
    return load_opinionqa(folder, log=_quiet)


def _real_raw(shared_data_dir: Path) -> RawDataset:
    folder = shared_data_dir / "opinionqa"
    if not folder.is_dir():
        pytest.skip(f"OpinionQA data {folder} not found")
    return _real(str(folder))


def _prefs(raw: RawDataset, group: str, name: str) -> np.ndarray:
    prefs = raw.groups[group]
    (i,) = np.flatnonzero(prefs.qkeys == raw.key_names.index(name))
    return prefs.probs[i]


# ---------------------------------------------------------------- real data

def test_real_distribution_matches_raw_counts(shared_data_dir):
    raw = _real_raw(shared_data_dir)
    path = shared_data_dir / "opinionqa/human_resp/American_Trends_Panel_W26/SEX_data.json"
    entry = json.loads(path.read_text())["SAFECRIME_W26"]
    options = [o for o in entry["MC_options"] if o != "Refused"]
    counts = np.array([entry["Female"].get(o, 0.0) for o in options], dtype=np.float64)
    expected = counts / counts.sum()

    got = _prefs(raw, "Female", "W26/SAFECRIME_W26")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)
    row = raw.bank.row(raw.key_names.index("W26/SAFECRIME_W26"))
    assert raw.bank.options[row] == options
    assert raw.bank.questions[row] == entry["question_text"]


def test_real_default_groups_and_shapes(shared_data_dir):
    raw = _real_raw(shared_data_dir)
    assert len(OPINIONQA_GROUPS) == 17
    assert list(raw.groups) == list(OPINIONQA_GROUPS)
    assert raw.report.kept_questions == len(raw.bank) > 600
    dropped = raw.report.dropped
    assert dropped["refusal option 'Refused' removed (questions)"] > 0
    assert dropped["refusal answers removed (respondents, selected groups)"] > 0
    assert dropped["non-group 'Refused' ((question, group) entries)"] > 0
    assert dropped["non-group 'nan' ((question, group) entries)"] > 0
    sizes = raw.bank.offsets[1:] - raw.bank.offsets[:-1]
    for prefs in raw.groups.values():
        assert np.all(np.diff(prefs.qkeys) > 0)
        rows = [raw.bank.row(k) for k in prefs.qkeys]
        assert [len(p) for p in prefs.probs] == sizes[rows].tolist()
        np.testing.assert_allclose([p.sum() for p in prefs.probs], 1.0, atol=1e-12)


def test_real_ordinals_and_repaired_options(shared_data_dir):
    raw = _real_raw(shared_data_dir)
    bank = raw.bank

    def row(name: str) -> int:
        return bank.row(raw.key_names.index(name))

    assert bank.options[row("W26/WORLDDANGER_W26")] == [
        "We live in a safer world", "We live in a more dangerous world",
        "The world we live in is neither safer nor more dangerous"]
    assert bank.ordinals[row("W26/WORLDDANGER_W26")] == [1.0, 2.0, 1.5]
    # 'Not sure' is a no-answer option: removed with 'Refused'.
    assert bank.options[row("W34/G1_W34")] == ["Yes", "No"]
    assert bank.ordinals[row("W34/G1_W34")] == [1.0, 2.0]
    # MC_options split this one at its commas; info.csv references keep whole texts.
    assert bank.options[row("W26/GUN_W26")] == ["Yes, I own a gun", "No, I don't own any guns"]


def test_real_root_may_be_human_resp(shared_data_dir):
    raw = _real_raw(shared_data_dir)
    inner = load_opinionqa(shared_data_dir / "opinionqa" / "human_resp", groups=["Female"],
                           log=_quiet)
    assert inner.source_hash == raw.source_hash
    assert len(inner.source_hash) == 64
    np.testing.assert_array_equal(inner.bank.qkeys, raw.bank.qkeys)  # bank ignores `groups`
    np.testing.assert_array_equal(inner.groups["Female"].qkeys, raw.groups["Female"].qkeys)


# ---------------------------------------------------------------- synthetic layouts

Q1 = {"MC_options": ["Yes", "No", "Refused"], "question_text": "Q1?"}
Q2 = {"MC_options": ["A", "B", "Not sure", "Refused"], "question_text": "Q2?"}
Q3 = {"MC_options": ["X", "Y"], "question_text": "Q3?"}


def _write(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _layout(tmp_path: Path) -> Path:
    """Two waves; every count below is used by the exact expectations in the tests."""
    w1 = tmp_path / "opinionqa" / "human_resp" / "American_Trends_Panel_W1"
    w2 = w1.parent / "American_Trends_Panel_W2"
    _write(w1 / "SEX_data.json", {
        "Q1_W1": {**Q1, "Female": {"No": 1, "Refused": 2, "Yes": 3}, "Male": {"Refused": 5}},
        "Q2_W1": {**Q2, "Female": {"A": 1, "B": 1, "Not sure": 2},
                  "Male": {"A": 2, "B": 6, "Refused": 1}}})
    _write(w1 / "RACE_data.json", {
        "Q1_W1": {**Q1, "White": {"Yes": 1, "No": 1}, "Other": {"Yes": 2}, "Refused": {"Yes": 4}},
        "Q2_W1": {**Q2, "White": {"A": 1}, "Other": {"B": 1}, "Refused": {"A": 1}}})
    polparty = {"Q1_W1": {**Q1, "Democrat": {"Yes": 1}, "Other": {"No": 1}, "Refused": {}},
                "Q2_W1": {**Q2, "Democrat": {"A": 1}}}
    _write(w1 / "POLPARTY_data.json", polparty)
    _write(w1 / "NONE_data.json", polparty)
    _write(w1 / "POLPARTY_SEX_data.json", {"Q1_W1": {**Q1, "Democrat": {"Female": {"Yes": 1}}}})
    _write(w1 / "AGE_data.json", {"Q1_W1": {**Q1, "18-29": {"Yes": 1}, "nan": {}}})
    with open(w1 / "info.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "key", "question", "references", "option_ordinal"])
        writer.writerow([0, "Q1_W1", "Q1?", "['Yes', 'No', 'Refused']", "[1.0, 3.0]"])
    _write(w2 / "SEX_data.json", {"Q3_W2": {**Q3, "Female": {"X": 1, "Y": 3},
                                            "Male": {"X": 0, "Y": 0}}})
    return tmp_path / "opinionqa"


def test_synthetic_exact_counts_and_distributions(tmp_path):
    raw = load_opinionqa(_layout(tmp_path), log=_quiet)
    assert raw.report.dropped == {
        "intersection or NONE attribute file not read (files)": 2,
        "non-group 'Refused' ((question, group) entries)": 3,
        "non-group 'nan' ((question, group) entries)": 1,
        "refusal option 'Refused' removed (questions)": 2,
        "refusal option 'Not sure' removed (questions)": 1,
        "group not selected ((question, group) entries)": 4,
        "zero count after removing refusals ((question, group) entries)": 2,
        "refusal answers removed (respondents, selected groups)": 10,
    }
    assert raw.report.kept_questions == 3
    assert raw.key_names == ["W1/Q1_W1", "W1/Q2_W1", "W2/Q3_W2"]
    assert raw.bank.qkeys.tolist() == [0, 1, 2]
    assert raw.bank.options == [["Yes", "No"], ["A", "B"], ["X", "Y"]]
    assert raw.bank.ordinals == [[1.0, 3.0], [1.0, 2.0], [1.0, 2.0]]
    assert ("ordinals from info.csv option_ordinal for 1 questions, by position 1..k (fallback) "
            "for 2") in raw.report.notes
    assert list(raw.groups) == ["Female", "Male", "Democrat", "White"]  # OPINIONQA_GROUPS order
    expected = {"Female": {0: [0.75, 0.25], 1: [0.5, 0.5], 2: [0.25, 0.75]},
                "Male": {1: [0.25, 0.75]},
                "White": {0: [0.5, 0.5], 1: [1.0, 0.0]},
                "Democrat": {0: [1.0, 0.0], 1: [1.0, 0.0]}}
    for group, by_key in expected.items():
        prefs = raw.groups[group]
        assert prefs.qkeys.tolist() == list(by_key)
        for p, want in zip(prefs.probs, by_key.values()):
            assert p.dtype == np.float64
            np.testing.assert_array_equal(p, want)


def test_synthetic_shared_values_are_qualified_and_selectable(tmp_path):
    raw = load_opinionqa(_layout(tmp_path), groups=["Other (RACE)", "Other (POLPARTY)", "18-29"],
                         log=_quiet)
    assert raw.groups["Other (RACE)"].qkeys.tolist() == [0, 1]
    np.testing.assert_array_equal(raw.groups["Other (RACE)"].probs[0], [1.0, 0.0])
    np.testing.assert_array_equal(raw.groups["Other (POLPARTY)"].probs[0], [0.0, 1.0])
    assert raw.groups["18-29"].qkeys.tolist() == [0]
    assert "Other" not in raw.groups


def test_strict_accepts_clean_layout_and_hash_tracks_content(tmp_path):
    root = _layout(tmp_path)
    lines: list[str] = []
    raw = load_opinionqa(root, strict=True, log=lines.append)
    assert lines == [] and raw.report.lines()[0].endswith("kept 3 questions")  # the caller prints it
    assert raw.source_hash == load_opinionqa(root, groups=["Male"], log=_quiet).source_hash
    sex = root / "human_resp" / "American_Trends_Panel_W2" / "SEX_data.json"
    sex.write_text(sex.read_text().replace('"Y": 3', '"Y": 4'))
    changed = load_opinionqa(root, log=_quiet)
    assert changed.source_hash != raw.source_hash
    np.testing.assert_array_equal(_prefs(changed, "Female", "W2/Q3_W2"), [0.2, 0.8])


def test_missing_root_and_folder_without_waves(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        load_opinionqa(tmp_path / "nope", log=_quiet)
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty" / "human_resp").mkdir(parents=True)
    with pytest.raises(DataError, match="American_Trends_Panel_W") as err:
        load_opinionqa(tmp_path / "empty", log=_quiet)
    assert "human_resp" in err.value.hint


def test_a_file_as_the_folder_says_a_folder_is_expected(tmp_path):
    sex = _layout(tmp_path) / "human_resp" / "American_Trends_Panel_W1" / "SEX_data.json"
    with pytest.raises(DataError, match="is a file; a folder is expected") as err:
        load_opinionqa(sex, log=_quiet)
    assert str(sex) in str(err.value) and "human_resp" in err.value.hint


def test_prepare_experiment_prints_the_parse_summary_once(tmp_path, monkeypatch):
    """main_fl.py --dataset opinionqa printed it twice (the loader, then prepare_experiment)."""
    import torch

    import data_loaders.embeddings as emb_mod
    from data_loaders.datasets import prepare_experiment
    from orchestration.cli import build_parser
    from orchestration.config import run_config

    def fixed_table(raw, emb_model, **kw):  # the summary is the subject here, not the vectors
        return torch.zeros(raw.bank.num_points, 4), {"emb_model": "fixed", "dim": 4}
    monkeypatch.setattr(emb_mod, "get_embeddings", fixed_table)
    root = _layout(tmp_path)
    args = build_parser("fedavg").parse_args(["--dataset", "opinionqa", "--data_path", str(root),
                                              "--train_groups", "Female,Male", "--eval_groups", "White"])
    lines: list[str] = []
    prepare_experiment(run_config(args).data, log=lines.append)
    summary = [s for s in lines if s.endswith("kept 3 questions")]
    assert summary == [f"{root / 'human_resp'}: kept 3 questions"]
    assert sum("refusal answers removed" in s for s in lines) == 1


def test_unparsable_json_skipped_and_counted_or_strict_error(tmp_path):
    root = _layout(tmp_path)
    bad = root / "human_resp" / "American_Trends_Panel_W2" / "RACE_data.json"
    bad.write_text('{"Q3_W2": {"MC_options": [')
    with pytest.warns(UserWarning, match=r"RACE_data.json.*skipped and counted \(--strict stops instead\)"):
        raw = load_opinionqa(root, log=_quiet)
    assert raw.report.dropped["unparsable or malformed JSON file (files)"] == 1
    assert raw.report.kept_questions == 3
    with pytest.raises(DataError, match="RACE_data.json"):
        load_opinionqa(root, strict=True, log=_quiet)


def test_unknown_group_lists_available(tmp_path):
    with pytest.raises(DataError) as err:
        load_opinionqa(_layout(tmp_path), groups=["Female", "female"], log=_quiet)
    message = str(err.value)
    assert "'female'" in message and "'Other (RACE)'" in message
    assert "did you mean 'Female'" in err.value.hint


def test_option_not_in_mc_options(tmp_path):
    root = _layout(tmp_path)
    _write(root / "human_resp" / "American_Trends_Panel_W2" / "SEX_data.json",
           {"Q3_W2": {**Q3, "Female": {"X": 1, "Z": 3}, "Male": {"X": 2, "Y": 2}}})
    raw = load_opinionqa(root, log=_quiet)
    reason = "option not in the question's options ((question, group) entries)"
    assert raw.report.dropped[reason] == 1
    assert raw.groups["Female"].qkeys.tolist() == [0, 1]
    np.testing.assert_array_equal(_prefs(raw, "Male", "W2/Q3_W2"), [0.5, 0.5])
    with pytest.raises(DataError, match=r"SEX_data\.json.*'Q3_W2'.*'Z'"):
        load_opinionqa(root, strict=True, log=_quiet)


def test_copy_is_independent_of_location(tmp_path):
    root = _layout(tmp_path / "a")
    moved = tmp_path / "b"
    shutil.copytree(root, moved)
    assert (load_opinionqa(root, log=_quiet).source_hash
            == load_opinionqa(moved / "human_resp", log=_quiet).source_hash)
