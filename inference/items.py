"""What the predictor reads: questions with options, and answer distributions, checked once.

Items come from Python (tuples, dicts) or JSONL files; every problem is a DataError naming where it
is ("context item 3", "answers.jsonl line 7"). A distribution off 1 by more than SUM_TOLERANCE is
renormalised with a warning.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_loaders.prompts import option_letter
from data_loaders.schema import DataError

SUM_TOLERANCE = 1e-6  # within it a distribution is used as given (bit for bit), beyond it renormalised


@dataclass(frozen=True)
class Question:
    """A question and its options; `ordinals` place the options on a scale (Wasserstein metric)."""

    text: str
    options: tuple[str, ...]
    ordinals: tuple[float, ...] | None = None
    id: Any = None  # passed through to the output, never interpreted

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return self.text, self.options


@dataclass(frozen=True)
class Answer:
    """A question with a distribution over its options (a group's, or an LLM's)."""

    question: Question
    distribution: np.ndarray  # float64, one value per option


# ---------------------------------------------------------------------------- fields

def _question_fields(text: Any, options: Any, ordinals: Any, where: str, id_: Any = None) -> Question:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the question must be a non-empty string, got {text!r}",
                        'write it as "question": "Do you ...?"')
    if isinstance(options, str) or not isinstance(options, (list, tuple)):
        raise DataError(f"{where}: options must be a list of strings, got {type(options).__name__}",
                        'write them as "options": ["Yes", "No"]')
    if len(options) < 2:
        raise DataError(f"{where}: question {text[:60]!r} has {len(options)} option(s); a question needs at "
                        "least 2", "add the missing options, or leave the question out")
    bad = [o for o in options if not isinstance(o, str) or not o.strip()]
    if bad:
        raise DataError(f"{where}: every option must be a non-empty string, got {bad[0]!r}", "fix the options list")
    for what, value in [("the question", text), *((f"option {i}", o) for i, o in enumerate(options))]:
        _check_text(value, what, where)
    return Question(text, tuple(options), _ordinals(ordinals, len(options), where), id_)


def _check_text(text: str, what: str, where: str) -> None:
    """JSON's \\uXXXX escapes can spell half of a UTF-16 pair: a str, but not text any tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: {what} {text[:60]!r} holds a lone surrogate ({text[err.start]!r} at character "
                        f"{err.start}), which is not text", "a \\ud800-\\udfff escape must be one half of a pair "
                        "spelling one character; fix or drop it") from None


def _ordinals(values: Any, k: int, where: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"{where}: ordinals must be a list of numbers, got {values!r}",
                        "give one number per option, e.g. [1, 2, 3], or leave ordinals out") from None
    if len(out) != k or not all(math.isfinite(v) for v in out):
        raise DataError(f"{where}: ordinals {list(values)!r} must be {k} finite numbers, one per option",
                        "give one number per option, or leave ordinals out (default 1..k)")
    return out


def check_distribution(values: Any, k: int, where: str) -> np.ndarray:
    """A float64 distribution over k options. Renormalised (with a warning) when off by > 1e-6."""
    try:
        p = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: the distribution must be a list of numbers, got {values!r}",
                        "give one probability (or count) per option") from None
    if p.ndim != 1 or len(p) != k:
        raise DataError(f"{where}: the distribution has {p.size} value(s) for {k} options",
                        "give one probability per option, in option order")
    if not np.isfinite(p).all():
        raise DataError(f"{where}: the distribution {values!r} holds NaN or inf", "give finite probabilities")
    if (p < 0).any():
        raise DataError(f"{where}: the distribution {values!r} has a negative value",
                        "probabilities (or counts) must be >= 0")
    total = float(p.sum())
    if total == 0:
        raise DataError(f"{where}: the distribution is all zero", "a group's answer needs some mass on an option")
    if abs(total - 1.0) > SUM_TOLERANCE:
        warnings.warn(f"{where}: the distribution sums to {total:.6g}, not 1; renormalised", stacklevel=3)
        p = p / total
    return p


# ---------------------------------------------------------------------------- Python items

def _unpack(item: Any, where: str, value_names: tuple[str, ...]) -> tuple[Question, Any]:
    """(question, the value after the options or None) from a tuple, dict or Question."""
    if isinstance(item, Question):
        return item, None
    if isinstance(item, Answer):
        return item.question, item.distribution
    if isinstance(item, dict):
        value = next((item[n] for n in value_names if n in item), None)
        return _question_fields(item.get("question"), item.get("options"), item.get("ordinals"), where,
                                item.get("id")), value
    if isinstance(item, (list, tuple)) and len(item) in (2, 3):
        value = item[2] if len(item) == 3 else None
        return _question_fields(item[0], item[1], None, where), value
    raise DataError(f"{where}: expected (question, options[, answer]) or a dict with 'question' and 'options', "
                    f"got {type(item).__name__}", "see docs/inference.md for the item formats")


def to_questions(items: Any, what: str = "question") -> list[Question]:
    return [_unpack(item, f"{what} {i}", ())[0] for i, item in enumerate(_as_list(items, what))]


def to_answers(items: Any, what: str = "context item") -> list[Answer]:
    return [_group_answer(item, f"{what} {i}") for i, item in enumerate(_as_list(items, what))]


def _group_answer(item: Any, where: str) -> Answer:
    q, value = _unpack(item, where, ("distribution",))
    if value is None:
        raise DataError(f'{where}: no "distribution"', "a context item is a question the group answered: "
                        "give its distribution over the options, [p_1, ..., p_k]")
    return Answer(q, check_distribution(value, len(q.options), where))


def to_llm_answers(items: Any, what: str = "item") -> list[Answer]:
    """(question, options, answer) where answer is a distribution, an option index, letter or text."""
    out = []
    for i, item in enumerate(_as_list(items, what)):
        q, value = _unpack(item, f"{what} {i}", ("answer", "distribution"))
        out.append(Answer(q, answer_distribution(value, q, f"{what} {i}")))
    return out


def answer_distribution(value: Any, q: Question, where: str) -> np.ndarray:
    """A chosen option (index, letter or option text) as a one-hot vector, or a checked distribution."""
    k = len(q.options)
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise DataError(f"{where}: answer {value!r} is neither a distribution nor an option",
                        "give a list of probabilities, an option index, its letter or its text")
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) < k:
            raise DataError(f"{where}: option index {value} is out of range for {k} options", "use 0..k-1")
        return np.eye(k)[int(value)]
    if isinstance(value, str):
        choice = parse_choice(value, q.options)
        if choice is None:
            raise DataError(f"{where}: answer {value[:80]!r} names none of the options {list(q.options)}",
                            "answer with an option's letter (A, B, ...) or its text")
        return np.eye(k)[choice]
    return check_distribution(value, k, where)


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise DataError(f"the {what}s must be a list of items, got {type(items).__name__}",
                        "pass a list, e.g. [(question, options, distribution), ...]")
    return list(items)


# ---------------------------------------------------------------------------- choices

_LETTER = re.compile(r"^\(?([A-Z]{1,3})(?:[.):\]]|\s*$)")
_ANSWER_IS = re.compile(r"^(?:the\s+)?answer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z]{1,3})\b", re.IGNORECASE)


def parse_choice(text: str, options: tuple[str, ...] | list[str]) -> int | None:
    """The option an LLM's reply picks, or None: the reply is an option's text; or it starts with a letter
    label ("B", "(B)", "B) ...", "Answer: B"); or it holds exactly one option's text as whole words,
    not counting one found only inside a longer matching option ("agree" in "Somewhat agree")."""
    reply = text.strip()
    norm = reply.strip(" \t\n.!\"'").casefold()
    folded = [o.strip().casefold() for o in options]
    if norm in folded:
        return folded.index(norm)
    letters = {option_letter(i): i for i in range(len(options))}
    for pattern in (_LETTER, _ANSWER_IS):
        m = pattern.match(reply)
        if m and m.group(1).upper() in letters and (pattern is _LETTER or m.group(1).isupper()):
            return letters[m.group(1).upper()]
    return _contained_option(reply.casefold(), folded)


def _contained_option(reply: str, folded: list[str]) -> int | None:
    spans = {i: [m.span() for m in re.finditer(rf"(?<!\w){re.escape(o)}(?!\w)", reply)] for i, o in enumerate(folded)}
    spans = {i: s for i, s in spans.items() if s}

    def inside_longer(i: int) -> bool:
        return all(any(a <= s and e <= b and len(folded[j]) > len(folded[i]) for j in spans for a, b in spans[j])
                   for s, e in spans[i])

    chosen = {folded[i] for i in spans if not inside_longer(i)}
    if len(chosen) != 1:
        return None
    return folded.index(chosen.pop())


# ---------------------------------------------------------------------------- JSONL

def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, object) per non-blank line; malformed lines are errors naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} not found", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc})",
                        "it must be a UTF-8 text file, one JSON object a line") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})", "one JSON object per line, e.g. "
                            '{"question": "...", "options": ["Yes", "No"]}') from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}",
                            'one object per line, with "question" and "options"')
        yield where, obj


def read_context_file(path: str | Path) -> list[Answer]:
    """A group's answers: {"question", "options", "distribution", optional "ordinals"} per line."""
    out = [_group_answer(obj, where) for where, obj in read_jsonl(path)]
    if not out:
        raise DataError(f"{path} holds no context answers", "give at least one answered question")
    return out


def read_questions_file(path: str | Path) -> list[Question]:
    """Questions to predict: {"question", "options", optional "ordinals", optional "id"} per line."""
    out = [_unpack(obj, where, ())[0] for where, obj in read_jsonl(path)]
    if not out:
        raise DataError(f"{path} holds no questions", "give at least one question to predict")
    return out
