"""GlobalOpinionQA (Anthropic/llm_global_opinions) from its hub CSV (method.md §1): one question per row,
`selections` holding every surveyed country's answer distribution; the paper's filter (README, "Datasets")."""
from __future__ import annotations

import ast
import csv
import hashlib
import os
import socket
import sys
import urllib.parse
from pathlib import Path

import numpy as np

from .schema import DataError, GroupPrefs, LoadReport, QuestionBank, RawDataset, close_names, given_path

HUB_REPO = "Anthropic/llm_global_opinions"
HUB_FILE = "data/global_opinions.csv"
ENV_VAR = "PLURALLLM_GLOBALQA_CSV"

# The paper's 14 countries and the released code's fixed split (method.md §1).
TRAIN_GROUPS = ["Nigeria", "Egypt", "India (Current national sample)", "Germany",
                "United States", "Canada", "Argentina", "Australia"]
EVAL_GROUPS = ["China", "Japan", "France", "Spain", "Brazil", "New Zealand"]
COUNTRIES = TRAIN_GROUPS + EVAL_GROUPS
# Vectors the paper's filter drops as a matter of course (never an error, even with --strict).
PAPER_FILTER = ("empty or non-list probability vector", "all-zero probability vector")


def resolve_csv(data_path: str | None, log=print) -> Path:
    """--data_path, else $PLURALLLM_GLOBALQA_CSV, else download from the hub."""
    given = given_path(data_path, ENV_VAR)
    if given is None:
        return _download_csv(log)
    origin, path = given
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        raise DataError(f"{path} (from {origin}) is a folder; GlobalOpinionQA needs a CSV file",
                        f"pass the CSV file itself, e.g. --data_path {csvs[0]}" if csvs else
                        "pass the path of the CSV file (the hub's data/global_opinions.csv), not its folder")
    if not path.is_file():
        raise DataError(f"GlobalOpinionQA CSV not found: {path} (from {origin})",
                        "pass the path of global_opinions.csv with --data_path")
    return path


def decode_csv(path: Path, data: bytes, encoding: str) -> str:
    """The file's text; a wrong --encoding names the first bad byte and its line."""
    try:
        text = data.decode(encoding)
    except LookupError as err:
        raise DataError(f"unknown --encoding {encoding!r} ({err})",
                        "use a Python codec name such as utf-8, latin-1 or cp1252") from err
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: not {encoding} text: byte 0x{data[err.start]:02x} at offset "
                        f"{err.start} (line {line}) cannot be decoded",
                        "a CSV saved by a spreadsheet is often latin-1 or cp1252: pass "
                        "--encoding latin-1 (or the file's encoding)") from err
    return text.removeprefix("\ufeff")  # a byte-order mark would otherwise rename 'question'


_OFFLINE_HINT = f"on a machine without internet pass the CSV with --data_path or set ${ENV_VAR}"


def _download_csv(log) -> Path:
    from huggingface_hub import constants as hub
    from huggingface_hub import hf_hub_download
    try:  # a copy in the hub cache needs no network
        return Path(hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", local_files_only=True))
    except Exception:  # not cached (or a broken cache): download it
        pass
    if hub.HF_HUB_OFFLINE:
        raise DataError(f"{HUB_FILE} of {HUB_REPO} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                        _OFFLINE_HINT)
    why = hub_unreachable(hub.ENDPOINT)
    if why:
        raise DataError(f"cannot reach the Hugging Face hub at {hub.ENDPOINT} ({why}), so {HUB_FILE} of "
                        f"{HUB_REPO} cannot be downloaded", _OFFLINE_HINT)
    log(f"downloading {HUB_FILE} of the dataset {HUB_REPO} from the Hugging Face hub")
    try:
        return Path(hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", etag_timeout=10))
    except Exception as err:  # DNS failure mid-way, gated repo, ...: one clear message
        raise DataError(f"could not download {HUB_FILE} of {HUB_REPO}: {type(err).__name__}: {err}",
                        _OFFLINE_HINT) from err


def hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why one TCP connection to the hub fails, or None. Asked once: huggingface_hub retries a
    failed request five times with backoff (about 25 s offline). Behind a proxy it is not asked."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def parse_selections(text: str) -> tuple[dict, list]:
    """`defaultdict(<class 'list'>, {...})` -> the dict between the first `{` and its `}`, and the
    keys its literal names more than once: a dict literal keeps the last of them silently, so
    they are only visible in the syntax tree."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no {...} dict literal")
    node = ast.parse(text[start:end + 1], mode="eval").body
    value = ast.literal_eval(node)
    if not isinstance(value, dict):
        raise ValueError(f"selections is a {type(value).__name__}, not a dict")
    keys = [ast.literal_eval(k) for k in node.keys if k is not None]
    return value, [k for i, k in enumerate(keys) if k in keys[:i]]


def parse_options(text: str) -> list[str]:
    value = ast.literal_eval(text)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"options is a {type(value).__name__}, not a list")
    return [str(o) for o in value]  # the hub file has numeric options: keep their text


def _check_vector(vec, n_options: int) -> str | None:
    """Why a group's vector cannot be used (None if it can)."""
    if not isinstance(vec, (list, tuple)) or len(vec) == 0:
        return "empty or non-list probability vector"
    try:
        arr = np.asarray(vec, dtype=np.float64)
    except (TypeError, ValueError):
        return "non-numeric probability vector"
    if not np.all(np.isfinite(arr)):
        return "NaN or infinite probability"
    if np.any(arr < 0):
        return "negative probability"
    if arr.sum() == 0:
        return "all-zero probability vector"
    if len(arr) != n_options:
        return "options/selections length mismatch"
    return None


def load_globalqa(data_path: str | None = None, *, groups: list[str] | None = None,
                  strict: bool = False, log=print, encoding: str = "utf-8") -> RawDataset:
    """Parse the hub CSV into a RawDataset restricted to `groups` (default: the paper's 14)."""
    path = resolve_csv(data_path, log)
    groups = list(groups or COUNTRIES)
    report = LoadReport(source=str(path))
    raw_bytes = path.read_bytes()
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(decode_csv(path, raw_bytes, encoding).splitlines(keepends=True))
    if reader.fieldnames is None:
        raise DataError(f"{path}: the file is empty", "the file must be the hub's "
                        "data/global_opinions.csv format: a header row, then one question per row")
    missing = {"question", "selections", "options"} - set(reader.fieldnames)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}",
                        "the file must be the hub's data/global_opinions.csv format")

    probs: dict[str, tuple[list[int], list[np.ndarray]]] = {g: ([], []) for g in groups}
    seen_groups: set[str] = set()
    kept: dict[tuple, int] = {}  # (question, *options) -> the row of each kept question
    unnormalised = 0
    for qkey, row in enumerate(reader):
        where = f"{path}: row {qkey} (ending on line {reader.line_num})"
        question = (row.get("question") or "").strip()
        if not question or not (row.get("options") or "").strip():
            report.drop("empty question or options")
            continue
        try:
            opts = parse_options(row["options"])
            sel, repeats = parse_selections(row.get("selections") or "")
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            report.skip(strict, "unparsable row", f"{where}: unparsable row ({err})",
                        "selections must hold a {...} dict literal and options a [...] list literal", warn=True)
            continue
        if not opts:
            report.drop("empty question or options")
            continue
        if _repeated_row(report, strict, where, [g for g in repeats if g in groups], kept.get((question, *opts))):
            continue
        seen_groups.update(sel)
        present = [g for g in groups if g in sel]
        bad = {g: why for g in present if (why := _check_vector(sel[g], len(opts)))}
        for g, why in bad.items():
            if strict and why not in PAPER_FILTER:
                detail = (f"has {len(sel[g])} probabilities for {len(opts)} options"
                          if why == "options/selections length mismatch" else f"has a {why}: {sel[g]!r}")
                raise DataError(f"{where}: group {g!r} {detail}",
                                "fix the row or drop --strict to skip such questions")
        if bad:
            # The paper's filter drops the whole question when any considered group is bad;
            # counted once, under the first bad group's reason, so the counts add up to the rows.
            report.drop(f"question with a considered group's {next(iter(bad.values()))}")
            continue
        if not present:
            report.drop("question answered by none of the considered groups")
            continue
        kept[(question, *opts)] = qkey
        for g in present:
            vec = np.asarray(sel[g], dtype=np.float64)
            unnormalised += abs(vec.sum() - 1.0) > 1e-3
            probs[g][0].append(qkey)
            probs[g][1].append(vec / vec.sum())

    if not kept and sum(report.dropped.values()) == 0:  # every row is kept or counted once
        raise DataError(f"{path}: the file has a header but no data rows",
                        "the file must hold one question per row after the header (the hub's data/global_opinions.csv)")
    unknown = [g for g in groups if g not in seen_groups]
    if unknown:
        raise DataError(f"{path}: group(s) {unknown} appear in no row's selections",
                        close_names(unknown, seen_groups)
                        or "check --train_groups / --eval_groups against the CSV's country names")
    report.kept_questions = len(kept)
    if unnormalised:
        report.notes.append(f"{unnormalised} (question, group) vectors did not sum to 1 "
                            "(|sum-1| > 1e-3) and were renormalised")
    bank = QuestionBank(list(kept.values()), [k[0] for k in kept], [list(k[1:]) for k in kept])
    group_prefs = {g: GroupPrefs(g, np.array(k, dtype=np.int64), p) for g, (k, p) in probs.items()}
    return RawDataset("globalqa", bank, group_prefs, report, source_hash=hashlib.sha256(raw_bytes).hexdigest())


def _repeated_row(report: LoadReport, strict: bool, where: str, repeats: list, first: int | None) -> bool:
    """Skip (or, strict, refuse) a row whose selections name a considered group twice (which
    value is meant?) or that repeats a kept row's question and options (the same question could
    then be a group's context and target, or land in training and held out)."""
    if repeats:
        report.skip(strict, "selections naming a group twice", f"{where}: selections name {repeats[0]!r} twice (a "
                    "dict literal keeps the last value without a word)", "keep one entry per country in that row", True)
    elif first is not None:
        report.skip(strict, "repeated question row", f"{where}: repeats row {first} (same question and options)",
                    "delete one of the two rows", True)
    return bool(repeats) or first is not None
