"""The reports' fixed prose (templates/*.md), their tables' rows (rows.json) and the presets (presets.json)."""
from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

TEMPLATES = Path(__file__).with_name("templates")


@cache
def template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


@cache
def presets(command: str) -> dict:
    """scripts/reproduce.py's or scripts/sweep.py's presets; each has a "why" for the reader."""
    return json.loads(Path(__file__).with_name("presets.json").read_text(encoding="utf-8"))[command]


@cache
def rows_data() -> dict:
    """The rows of the reports' tables (reporting/rows.json)."""
    return json.loads(Path(__file__).with_name("rows.json").read_text(encoding="utf-8"))


@cache
def snippets(name: str = "reproduce_sections.md") -> dict[str, str]:
    """The pieces of a template, each after its own `<!-- key -->` line, by key (ends stripped of newlines)."""
    parts = re.split(r"^<!-- (\w+) -->\n", template(name), flags=re.M)
    return {key: text.strip("\n") for key, text in zip(parts[1::2], parts[2::2])}


def fill(text: str, **values) -> list[str]:
    """The template's lines with str.format's fields filled; a line that is one `{field}` whose value is
    a list becomes that list's lines (none for an empty list)."""
    out = []
    for line in text.removesuffix("\n").split("\n"):
        value = values.get(line[1:-1]) if line.startswith("{") and line.endswith("}") else None
        out += value if isinstance(value, list) else [line.format(**values)]
    return out


class Fields(dict):
    """A dict whose missing keys read as None in a template's `{c[key]}`, as `dict.get` would."""

    def __missing__(self, key):
        return None
