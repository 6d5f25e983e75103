"""GlobalOpinionQA parsing and the paper's filter, on the real sample and on tiny CSVs."""
import csv
from collections import defaultdict

import numpy as np
import pytest
import torch

from data_loaders.globalqa import COUNTRIES, EVAL_GROUPS, TRAIN_GROUPS, load_globalqa, resolve_csv
from data_loaders.schema import DataError, build_group_data

QUIET = lambda *a: None  # noqa: E731


def independent_counts(path) -> dict[str, int]:
    """Kept questions per country, re-derived without the project's parser."""
    counts = {c: 0 for c in COUNTRIES}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            sel = eval(row["selections"].replace("<class 'list'>", "list"), {"defaultdict": defaultdict})
            opts = eval(row["options"])
            if not row["question"] or not opts:
                continue
            present = [c for c in COUNTRIES if c in sel]
            if all(sel[c] and sum(sel[c]) != 0 and len(sel[c]) == len(opts) for c in present):
                for c in present:
                    counts[c] += 1
    return counts


def test_filter_on_real_sample_matches_independent_count(globalqa_csv):
    raw = load_globalqa(str(globalqa_csv), log=QUIET)
    got = {g: len(p.qkeys) for g, p in raw.groups.items()}
    assert got == independent_counts(globalqa_csv)
    assert got["United States"] == 40 and got["China"] == 10  # pinned: the sample's known counts


def test_group_tensors_from_real_sample(globalqa_csv):
    raw = load_globalqa(str(globalqa_csv), log=QUIET)
    emb = torch.arange(raw.bank.num_points, dtype=torch.float32)[:, None].repeat(1, 3)
    g = build_group_data(raw, "China", emb)
    assert g.num_questions == 10 and torch.all(g.qkeys[1:] > g.qkeys[:-1])  # ordered by qkey
    sums = torch.zeros(g.num_questions).index_add(0, torch.repeat_interleave(torch.arange(10), g.sizes), g.y)
    assert torch.allclose(sums, torch.ones(10), atol=1e-6)
    # every point's embedding row is its (question, option) row of the bank
    first = raw.bank.offsets[raw.bank.row(int(g.qkeys[0]))]
    assert g.x[0, 0].item() == float(first)


def write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(["question", "selections", "options", "source"])
        w.writerows(rows)
    return str(path)


def sel(d):
    return f"defaultdict(<class 'list'>, {d!r})"


def tiny(tmp_path, extra=()):
    rows = [
        ["Q0 fine", sel({"Japan": [0.25, 0.75], "China": [0.5, 0.5], "Mars": [1, 0]}), "['Yes', 'No']", "GAS"],
        ["Q1 numeric options", sel({"Japan": [0.2, 0.3, 0.5]}), "[1, 2.5, 'Other']", "WVS"],
        ["Q2 zero vector", sel({"Japan": [0.0, 0.0], "China": [0.4, 0.6]}), "['A', 'B']", "GAS"],
        ["Q3 mismatch", sel({"China": [0.1, 0.2, 0.7]}), "['A', 'B']", "GAS"],
        ["", sel({"China": [1.0]}), "['A']", "GAS"],
        ["Q5 only others", sel({"Mars": [0.5, 0.5]}), "['A', 'B']", "GAS"],
        ["Q6 unnormalised", sel({"China": [2.0, 6.0]}), "['A', 'B']", "GAS"],
        *extra,
    ]
    return write_csv(tmp_path / "g.csv", rows)


def test_tiny_csv_exact(tmp_path):
    raw = load_globalqa(tiny(tmp_path), groups=["Japan", "China"], log=QUIET)
    assert raw.bank.qkeys.tolist() == [0, 1, 6]
    assert raw.bank.options[1] == ["1", "2.5", "Other"]  # non-string options converted with str()
    assert raw.report.dropped == {
        "question with a considered group's all-zero probability vector": 1,
        "question with a considered group's options/selections length mismatch": 1,
        "empty question or options": 1,
        "question answered by none of the considered groups": 1,
    }
    assert raw.groups["Japan"].qkeys.tolist() == [0, 1]
    np.testing.assert_allclose(raw.groups["China"].probs[1], [0.25, 0.75])  # 2:6 renormalised
    assert any("renormalised" in n for n in raw.report.notes)


def test_unparsable_row_is_counted_and_strict_fails(tmp_path):
    path = tiny(tmp_path, extra=[["Q7 broken", "defaultdict(<class 'list'>, {'Japan': [0.5,", "['A']", "GAS"]])
    with pytest.warns(UserWarning, match="row 7"):
        raw = load_globalqa(path, groups=["Japan", "China"], log=QUIET)
    assert raw.report.dropped["unparsable row"] == 1
    broken = write_csv(tmp_path / "b.csv", [["Q0", sel({"Japan": [1.0]}), "['A']", "GAS"],
                                            ["Q1 broken", "{'Japan': [0.5,", "['A']", "GAS"]])
    with pytest.raises(DataError, match=r"row 1 \(ending on line 3\): unparsable"):
        load_globalqa(broken, groups=["Japan"], strict=True, log=QUIET)


def test_options_not_a_list_and_selections_not_a_dict(tmp_path):
    path = tiny(tmp_path, extra=[["Q7", sel({"Japan": [1.0]}), "'Yes'", "GAS"],
                                 ["Q8", "defaultdict(<class 'list'>, {1, 2})", "['A']", "GAS"]])
    with pytest.warns(UserWarning):
        raw = load_globalqa(path, groups=["Japan", "China"], log=QUIET)
    assert raw.report.dropped["unparsable row"] == 2


def test_length_mismatch_strict_names_row_and_group(tmp_path):
    with pytest.raises(DataError, match=r"row 3 .*'China' has 3 probabilities for 2 options"):
        load_globalqa(tiny(tmp_path), groups=["Japan", "China"], strict=True, log=QUIET)


def test_unknown_group_gets_suggestion(tmp_path):
    with pytest.raises(DataError, match="did you mean 'Japan'"):
        load_globalqa(tiny(tmp_path), groups=["Japn"], log=QUIET)


def test_missing_file_names_flag(tmp_path):
    with pytest.raises(DataError, match="--data_path"):
        resolve_csv(str(tmp_path / "nope.csv"))


def test_env_var_and_offline_download(tmp_path, monkeypatch):
    path = tiny(tmp_path)
    monkeypatch.setenv("PLURALLLM_GLOBALQA_CSV", path)
    assert str(resolve_csv(None)) == path
    monkeypatch.delenv("PLURALLLM_GLOBALQA_CSV")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty hub cache: offline must fail fast
    with pytest.raises(DataError, match="--data_path"):
        resolve_csv(None, log=QUIET)


def test_no_network_is_found_with_one_quick_connection_not_the_hubs_retries(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, huggingface_hub retried five times (about 25 s) before failing."""
    import socket
    import time

    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.delenv("PLURALLLM_GLOBALQA_CSV", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    downloads, connections = [], []

    def download(*a, local_files_only=False, **kw):
        if not local_files_only:
            downloads.append(a)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    def connect(address, timeout=None):
        connections.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "create_connection", connect)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub at https://huggingface.co "
                                        r"\(gaierror.*\n.*--data_path"):
        resolve_csv(None, log=QUIET)
    assert connections == [("huggingface.co", 443)] and downloads == [] and time.perf_counter() - t0 < 2


def test_default_split_is_the_papers():
    assert len(TRAIN_GROUPS) == 8 and len(EVAL_GROUPS) == 6 and not set(TRAIN_GROUPS) & set(EVAL_GROUPS)


def test_latin1_file_names_encoding_and_loads_with_it(tmp_path):
    rows = [["Q0 fine", sel({"Japan": [0.5, 0.5]}), "['Yes', 'No']", "GAS"],
            ["¿Qué opina?", sel({"Japan": [0.25, 0.75]}), "['Sí', 'No']", "GAS"]]
    path = write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    offset = (tmp_path / "latin.csv").read_bytes().index(b"\xbf")
    with pytest.raises(DataError) as err:
        load_globalqa(path, groups=["Japan"], log=QUIET)
    assert str(err.value).startswith(f"{path}: not utf-8 text: byte 0xbf at offset {offset} (line 3)")
    assert "--encoding latin-1" in err.value.hint
    raw = load_globalqa(path, groups=["Japan"], log=QUIET, encoding="latin-1")
    assert raw.bank.questions == ["Q0 fine", "¿Qué opina?"] and raw.bank.options[1] == ["Sí", "No"]
    with pytest.raises(DataError, match="unknown --encoding 'latin-9000'"):
        load_globalqa(path, groups=["Japan"], log=QUIET, encoding="latin-9000")


def test_encoding_flag_reaches_the_csv_reader(tmp_path, monkeypatch):
    import data_loaders.embeddings as emb_mod
    from data_loaders.datasets import load_embedded
    from orchestration.cli import build_parser
    from orchestration.config import run_config
    path = write_csv(tmp_path / "latin.csv", [["Année?", sel({"Japan": [1.0, 0.0]}), "['A', 'B']", "GAS"]],
                     encoding="latin-1")
    monkeypatch.setattr(emb_mod, "get_embeddings", lambda raw, *a, **k: (torch.zeros(2, 4), {"dim": 4}))
    args = build_parser("fedavg").parse_args(["--data_path", path, "--encoding", "latin-1"])
    raw, _, _ = load_embedded(run_config(args).data, ["Japan"], log=QUIET)
    assert raw.bank.questions == ["Année?"]
    with pytest.raises(DataError, match="--encoding latin-1"):
        load_embedded(run_config(build_parser("fedavg").parse_args(["--data_path", path])).data, ["Japan"], log=QUIET)


def test_header_only_and_empty_files_say_so(tmp_path):
    with pytest.raises(DataError, match="has a header but no data rows"):
        load_globalqa(write_csv(tmp_path / "h.csv", []), groups=["Japan"], log=QUIET)
    (tmp_path / "e.csv").write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty"):
        load_globalqa(str(tmp_path / "e.csv"), groups=["Japan"], log=QUIET)


def test_a_folder_as_data_path_says_a_csv_file_is_expected(tmp_path):
    with pytest.raises(DataError, match="is a folder; GlobalOpinionQA needs a CSV file") as err:
        resolve_csv(str(tmp_path))
    assert "not its folder" in err.value.hint
    tiny(tmp_path)
    with pytest.raises(DataError) as err:
        resolve_csv(str(tmp_path))
    assert err.value.hint == f"pass the CSV file itself, e.g. --data_path {tmp_path / 'g.csv'}"
