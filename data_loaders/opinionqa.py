"""OpinionQA (Pew American Trends Panel) per-group answer counts -> RawDataset (method.md §9).

Layout (../shared/data/opinionqa/SOURCE.md): `<root>/American_Trends_Panel_W<wave>/<ATTRIBUTE>_data.json`
plus one `info.csv` per wave; `root` is `human_resp` or its parent. Decisions, each drop counted:
- Only single-attribute files are read: the intersection files (POLPARTY_RACE, ...) nest a second level
  of groups and define no new group; NONE_data.json is byte-identical to POLPARTY_data.json.
- A group is an attribute value; NON_GROUPS are respondents who did not answer the demographic question.
  A value under several attributes ('Other' under POLPARTY and RACE) is named '<value> (<ATTRIBUTE>)'.
- Options come from info.csv `references` where it has the key: the JSON's MC_options split texts at
  commas ('Yes, likely' -> 'Yes', 'likely') for 126 of the 684 questions, while the counts use whole texts.
- REFUSAL_OPTIONS leave the options and the counts before normalising: 'Refused' is Pew's refusal code
  (99); 'Not sure' and "I don't know the answer" are no-answers that info.csv leaves off the ordinal
  scale wherever they occur. Hedges it places on the scale ("I'm not sure" at 1.5) are answers, kept.
- Ordinals: info.csv option_ordinal when it has one number per kept option, else positions 1..k.
- qkey = index of '<wave>/<key>' in the sorted keys of the files read (`raw.key_names[qkey]`); a key in
  two waves is two questions; within a wave the first attribute file defines text and options.
- A question is kept when any group, selected or not, has a usable distribution, so the bank depends
  only on the files, and `source_hash` (over every file's relative path and bytes) keys the embedding cache.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .schema import DataError, GroupPrefs, LoadReport, QuestionBank, RawDataset, close_names, given_path

# The 17 of GPO's 22 OpinionQA groups present in these files (the 5 religion groups are not).
OPINIONQA_GROUPS = (
    "Northeast", "South", "Female", "Male", "College graduate/some postgrad",
    "Less than high school", "Democrat", "Republican", "$100,000 or more", "Less than $30,000",
    "Conservative", "Liberal", "Moderate", "Asian", "Black", "Hispanic", "White",
)
REFUSAL_OPTIONS = ("Refused", "Not sure", "I don't know the answer")
NON_GROUPS = ("Refused", "nan")
META_FIELDS = ("MC_options", "question_text")
WAVE_DIR = re.compile(r"American_Trends_Panel_(W\d+)")
DATA_SUFFIX = "_data.json"

# Drop reasons (LoadReport.dropped keys) written in more than one place; the others are inline.
BAD_FILE = "unparsable or malformed JSON file (files)"
BAD_INFO = "info.csv unreadable (files; MC_options and positions used)"
BAD_COUNTS = "non-numeric, negative or non-finite counts ((question, group) entries)"


@dataclass
class _Entry:
    attribute: str
    value: str
    counts: object
    path: Path


@dataclass
class _Question:
    wave: str
    key: str
    text: str
    mc_options: list[str]
    entries: list[_Entry] = field(default_factory=list)


@dataclass
class _Files:
    """Everything read from disk: questions by '<wave>/<key>', info.csv rows, raw bytes."""

    data_dir: Path
    questions: dict[str, _Question] = field(default_factory=dict)
    info: dict[str, dict[str, tuple[str, str] | None]] = field(default_factory=dict)
    blobs: list[tuple[str, bytes]] = field(default_factory=list)

    def source_hash(self) -> str:
        h = hashlib.sha256()
        for rel, data in sorted(self.blobs):
            # Path and length framing: renaming or re-splitting files changes the hash.
            h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()


ENV_VAR = "PLURALLLM_OPINIONQA_DIR"


def resolve_root(data_path: str | None) -> Path:
    """--data_path, else $PLURALLLM_OPINIONQA_DIR (there is no hub copy of these counts)."""
    given = given_path(data_path, ENV_VAR)
    if given:
        return given[1]
    raise DataError("no OpinionQA folder given",
                    f"pass the folder holding human_resp/ with --data_path or set ${ENV_VAR}")


def _waves(folder: Path) -> list[tuple[str, Path]]:
    found = [(m.group(1), p) for p in folder.iterdir() if p.is_dir() and (m := WAVE_DIR.fullmatch(p.name))]
    return sorted(found, key=lambda w: int(w[0][1:]))


def _data_dir(root: str | Path) -> tuple[Path, list[tuple[str, Path]]]:
    root = Path(root).expanduser()
    hint = ("pass the OpinionQA folder (e.g. ../shared/data/opinionqa) or its human_resp "
            "subfolder, which holds American_Trends_Panel_W<wave>/ folders")
    if root.is_file():
        raise DataError(f"OpinionQA --data_path {root} is a file; a folder is expected", hint)
    if not root.is_dir():
        raise DataError(f"OpinionQA folder not found: {root}", hint)
    for folder in (root, root / "human_resp"):
        if folder.is_dir() and (waves := _waves(folder)):
            return folder, waves
    raise DataError(f"no American_Trends_Panel_W<wave> folders in {root} or {root / 'human_resp'}", hint)


def _read_bytes(files: _Files, path: Path) -> bytes:
    data = path.read_bytes()
    files.blobs.append((path.relative_to(files.data_dir).as_posix(), data))
    return data


def _read_info(files: _Files, wave: str, path: Path, report: LoadReport, strict: bool) -> None:
    """info.csv -> {key: (references text, option_ordinal text)}; None marks a conflict."""
    rows: dict[str, tuple[str, str] | None] = {}
    files.info[wave] = rows
    try:
        reader = csv.DictReader(io.StringIO(_read_bytes(files, path).decode("utf-8")))
        fields = set(reader.fieldnames or [])
        records = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        return report.skip(strict, BAD_INFO, f"{path}: unreadable CSV ({err})",
                           "restore info.csv from the OpinionQA release", warn=True)
    missing = {"key", "references", "option_ordinal"} - fields
    if missing:
        return report.skip(strict, BAD_INFO, f"{path}: missing column(s) {sorted(missing)}",
                           "info.csv needs key, references and option_ordinal columns", warn=True)
    for rec in records:
        key, value = rec["key"], (rec["references"], rec["option_ordinal"])
        if key in rows and rows[key] != value:
            if rows[key] is not None:
                report.drop("info.csv key repeated with different rows (keys; not used)")
            rows[key] = None
        elif key not in rows:
            rows[key] = value


def _add_question(files: _Files, wave: str, attribute: str, path: Path, key: str, entry: object,
                  report: LoadReport, strict: bool) -> None:
    if not (isinstance(entry, dict) and isinstance(entry.get("MC_options"), list)
            and isinstance(entry.get("question_text"), str)):
        return report.skip(strict, "malformed question entry (entries)",
                           f"{path}: question {key!r} lacks a MC_options list or a question_text string",
                           "restore the file from the OpinionQA release")
    name = f"{wave}/{key}"
    mc = [str(o) for o in entry["MC_options"]]
    q = files.questions.get(name)
    if q is None:
        q = files.questions[name] = _Question(wave, key, entry["question_text"], mc)
    elif (q.text, q.mc_options) != (entry["question_text"], mc):
        report.skip(strict, "question text/options differ from an earlier attribute file (entries; first kept)",
                    f"{path}: question {key!r} has a different text or MC_options than in an earlier "
                    "attribute file of the same wave",
                    "every attribute file of a wave must describe the same questions")
    for value, counts in entry.items():
        if value in NON_GROUPS:
            report.drop(f"non-group {value!r} ((question, group) entries)")
        elif value not in META_FIELDS:
            q.entries.append(_Entry(attribute, value, counts, path))


def _read_wave(files: _Files, wave: str, folder: Path, report: LoadReport, strict: bool) -> None:
    if (folder / "info.csv").is_file():
        _read_info(files, wave, folder / "info.csv", report, strict)
    for path in sorted(folder.glob(f"*{DATA_SUFFIX}")):
        attribute = path.name[: -len(DATA_SUFFIX)]
        if "_" in attribute or attribute == "NONE":
            report.drop("intersection or NONE attribute file not read (files)")
            continue
        try:
            content = json.loads(_read_bytes(files, path))
            problem = None if isinstance(content, dict) else \
                f"top level is a {type(content).__name__}, not an object of questions"
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"unparsable JSON ({err})"
        if problem:
            report.skip(strict, BAD_FILE, f"{path}: {problem}", "restore the file from the OpinionQA release",
                        warn=True)
            continue
        for key, entry in content.items():
            _add_question(files, wave, attribute, path, key, entry, report, strict)


def _group_names(files: _Files) -> dict[tuple[str, str], str]:
    """(attribute, value) -> group name; values shared by several attributes get qualified."""
    attrs: dict[str, set[str]] = {}
    for q in files.questions.values():
        for e in q.entries:
            attrs.setdefault(e.value, set()).add(e.attribute)
    return {(a, v): v if len(s) == 1 else f"{v} ({a})" for v, s in attrs.items() for a in s}


def _select(groups: list[str] | None, available: set[str], report: LoadReport) -> list[str]:
    if groups is None:
        absent = [g for g in OPINIONQA_GROUPS if g not in available]
        if absent:
            report.notes.append(f"default groups absent from the data: {absent}")
        return [g for g in OPINIONQA_GROUPS if g in available]
    groups = list(dict.fromkeys(groups))
    if not groups:
        raise DataError("groups is empty", "pass None for the default 17 groups or name some")
    unknown = [g for g in groups if g not in available]
    if unknown:
        raise DataError(f"unknown OpinionQA group(s) {unknown}; available: {sorted(available)}",
                        close_names(unknown, available) or "use names from the available list")
    return groups


def _info_row(files: _Files, q: _Question, report: LoadReport,
              strict: bool) -> tuple[list[str], list[float]] | None:
    """(references, option_ordinal) of the question's info.csv row, if usable."""
    raw = files.info.get(q.wave, {}).get(q.key)
    if raw is None:
        return None
    try:
        refs, ords = ast.literal_eval(raw[0]), ast.literal_eval(raw[1])
        if not (isinstance(refs, (list, tuple)) and isinstance(ords, (list, tuple))):
            raise ValueError("not list literals")
        return [str(o) for o in refs], [float(x) for x in ords]
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        report.skip(strict, "info.csv row with unparsable references/option_ordinal (rows; not used)",
                    f"{files.data_dir}/{q.wave}: info.csv row {q.key!r}: {err}",
                    "references and option_ordinal must be Python list literals")
        return None


def _options(files: _Files, q: _Question, report: LoadReport, strict: bool,
             tally: Counter) -> tuple[list[str], list[float]] | None:
    """All options (refusals included) and the kept options' ordinals; None drops the question."""
    info = _info_row(files, q, report, strict)
    options = info[0] if info else q.mc_options
    tally["from_refs"] += info is not None
    tally["repaired"] += info is not None and info[0] != q.mc_options
    tally["from_mc"] += info is None
    for option in dict.fromkeys(options):
        if option in REFUSAL_OPTIONS:
            report.drop(f"refusal option {option!r} removed (questions)")
    if len(set(options)) != len(options):
        report.drop("question with duplicate option texts (questions)")
        return None
    k = sum(o not in REFUSAL_OPTIONS for o in options)
    if k < 2:
        report.drop("question with fewer than 2 non-refusal options (questions)")
        return None
    from_info = info is not None and len(info[1]) == k
    tally["ord_info" if from_info else "ord_fallback"] += 1
    return options, info[1] if from_info else [float(i) for i in range(1, k + 1)]


def _counts_problem(counts: object, column: dict[str, int]) -> tuple[str, str, str] | None:
    """(drop reason, what is wrong, hint) when an entry's counts cannot be used."""
    if not isinstance(counts, dict):
        return BAD_COUNTS, f"counts are a {type(counts).__name__}", "counts must be an object {option: count}"
    for option, n in counts.items():
        if option not in column:
            return ("option not in the question's options ((question, group) entries)",
                    f"option {option!r} is not among the question's options {list(column)}",
                    "fix the option text in the file, or load with strict=False to drop this (question, group)")
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            return BAD_COUNTS, f"count {n!r} for option {option!r}", "counts must be finite non-negative numbers"
    return None


def _count_row(e: _Entry, q: _Question, column: dict[str, int], report: LoadReport,
               strict: bool, selected: bool) -> np.ndarray | None:
    """The entry's counts as a vector over the question's options; None if unusable."""
    problem = _counts_problem(e.counts, column)
    if problem is None:
        row = np.zeros(len(column))
        for option, n in e.counts.items():
            row[column[option]] = n
        return row
    if selected or strict:  # an unselected group's bad entry is only an error under --strict
        reason, what, hint = problem
        report.skip(strict, reason, f"{e.path}: question {q.key!r}, group {e.value!r}: {what}", hint)
    return None


def _question_probs(q: _Question, options: list[str], names: dict[tuple[str, str], str],
                    wanted: set[str], report: LoadReport, strict: bool
                    ) -> tuple[dict[str, np.ndarray], bool, float]:
    """Selected groups' distributions over kept options, whether any group (selected or not)
    is usable, and the selected groups' refusal answers."""
    column = {o: i for i, o in enumerate(options)}
    kept = np.array([o not in REFUSAL_OPTIONS for o in options])
    rows, who = [], []
    for e in q.entries:
        name = names[(e.attribute, e.value)]
        selected = name in wanted
        if not selected:
            report.drop("group not selected ((question, group) entries)")
        row = _count_row(e, q, column, report, strict, selected)
        if row is not None:
            rows.append(row)
            who.append(name if selected else None)
    if not rows:
        return {}, False, 0.0
    counts = np.stack(rows)
    totals = counts[:, kept].sum(axis=1)
    sel = np.array([w is not None for w in who])
    refused = float(counts[sel][:, ~kept].sum())
    report.drop("zero count after removing refusals ((question, group) entries)", int(np.sum(sel & (totals == 0))))
    probs = {w: counts[i, kept] / totals[i] for i, w in enumerate(who) if w is not None and totals[i] > 0}
    return probs, bool(np.any(totals > 0)), refused


def load_opinionqa(root: str | Path, *, groups: list[str] | None = None, strict: bool = False,
                   log: Callable[[str], object] = print) -> RawDataset:
    """Parse the per-wave OpinionQA counts into a RawDataset for `groups` (default: the 17). `log` is
    unused (nothing to download): the caller prints raw.report, as for load_globalqa."""
    data_dir, waves = _data_dir(root)
    report, files = LoadReport(str(data_dir)), _Files(data_dir)
    for wave, folder in waves:
        _read_wave(files, wave, folder, report, strict)
    names = _group_names(files)
    selected = _select(groups, set(names.values()), report)
    wanted = set(selected)
    key_names = sorted(files.questions)
    tally: Counter = Counter()  # where options and ordinals came from; refusal answers (report notes)
    flat: list[str] = []  # questions whose ordinals are all equal
    bank_rows: list[tuple[int, str, list[str], list[float]]] = []
    per_group: dict[str, tuple[list[int], list[np.ndarray]]] = {g: ([], []) for g in selected}
    for qkey, name in enumerate(key_names):
        q = files.questions[name]
        resolved = _options(files, q, report, strict, tally)
        if resolved is None:
            continue
        options, ordinals = resolved
        if min(ordinals) == max(ordinals):
            flat.append(name)
        probs, usable, refused = _question_probs(q, options, names, wanted, report, strict)
        tally["refused"] += refused
        if not usable:
            report.drop("question with no usable (question, group) pair (questions)")
            continue
        bank_rows.append((qkey, q.text, [o for o in options if o not in REFUSAL_OPTIONS], ordinals))
        for g, p in probs.items():
            per_group[g][0].append(qkey)
            per_group[g][1].append(p)
    raw = _assemble(files, bank_rows, per_group, report, tally, flat)
    raw.key_names = key_names  # plain attribute: qkey -> '<wave>/<key>'
    return raw


def _assemble(files: _Files, bank_rows: list[tuple[int, str, list[str], list[float]]],
              per_group: dict[str, tuple[list[int], list[np.ndarray]]], report: LoadReport,
              tally: Counter, flat: list[str]) -> RawDataset:
    bank = QuestionBank(*([r[i] for r in bank_rows] for i in range(4)))
    report.kept_questions = len(bank)
    report.drop("refusal answers removed (respondents, selected groups)", int(round(tally["refused"])))
    report.dropped = {k: n for k, n in report.dropped.items() if n}
    empty = [g for g, (k, _) in per_group.items() if not k]
    if empty:
        report.drop("selected group with no usable question (groups; left out)", len(empty))
        report.notes.append(f"selected groups with no usable question: {empty}")
    report.notes += [
        f"options from info.csv references for {tally['from_refs']} questions ({tally['repaired']} "
        f"differ from MC_options), from MC_options for {tally['from_mc']}",
        f"ordinals from info.csv option_ordinal for {tally['ord_info']} questions, "
        f"by position 1..k (fallback) for {tally['ord_fallback']}",
        f"refusal options removed: {list(REFUSAL_OPTIONS)}; non-groups: {list(NON_GROUPS)}",
        "qkey = index of '<wave>/<key>' in sorted question keys (raw.key_names)",
    ]
    if flat:
        report.notes.append(f"questions whose ordinals are all equal (no Wasserstein spread): {flat}")
    groups = {g: GroupPrefs(g, np.array(k, dtype=np.int64), p) for g, (k, p) in per_group.items() if k}
    return RawDataset("opinionqa", bank, groups, report, files.source_hash())
