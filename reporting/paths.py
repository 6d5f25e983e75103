"""Paths as committed files show them: relative to the repository, never one machine's layout."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shown(path: str | Path | None) -> str | None:
    """A relative path unchanged; an absolute one relative to the repository root ('/' separators)."""
    if path is None:
        return None
    text = str(path)
    if not os.path.isabs(text):
        return text.replace(os.sep, "/")
    try:
        return os.path.relpath(text, REPO).replace(os.sep, "/")
    except ValueError:  # another drive on Windows: no relative form; the name is still informative
        return Path(text).name


def shown_command(argv: list[str]) -> str:
    """A command line as committed files show it (shown_argv), quoted for a shell."""
    return " ".join(shlex.quote(a) for a in shown_argv(argv))


def shown_argv(argv: list[str]) -> list[str]:
    """Command-line words with every absolute path shown relative to the repository: a bare path,
    the value of --flag=PATH or NAME=PATH, and each item of a comma-separated list of paths."""
    return [_shown_word(a) for a in argv]


def _shown_word(word: str) -> str:
    if os.path.isabs(word):
        return shown(word)
    prefix, sep, value = word.partition("=")
    if sep and value:
        parts = value.split(",")
        if any(os.path.isabs(x) for x in parts):
            return prefix + "=" + ",".join(shown(x) if os.path.isabs(x) else x for x in parts)
    return word


def default_data_path(dataset: str) -> str | None:
    """The data the presets read without --data_path: the dataset's environment variable, else
    ../shared/data/..., else None (the loader then says what to pass)."""
    env, rel = {"globalqa": ("PLURALLLM_GLOBALQA_CSV",
                             ("globalopinionqa_sample", "global_opinions_sample.csv")),
                "opinionqa": ("PLURALLLM_OPINIONQA_DIR", ("opinionqa",))}.get(dataset, (None, None))
    if env is None:
        return None
    if os.environ.get(env):
        return os.environ[env]
    p = REPO.parent.joinpath("shared", "data", *rel)
    if not p.exists():
        return None
    # relative when run from the repository root (the documented way), so it is stored as such
    return shown(p) if Path.cwd().resolve() == REPO else str(p)
