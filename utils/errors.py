"""The project's user-error type, and every command line's error exit.

A UserError is an error the user can fix: its message names the input and ends with a hint.
The kinds keep the built-in base (ValueError, OSError) that `except` clauses expect.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, TextIO

from .interrupts import exit_code, signals_raise


class UserError(Exception):
    """Bad input: the message names the file, row or flag, and ends with a hint."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(f"{what}\n  hint: {hint}" if hint else what)
        self.hint = hint


class DataError(UserError, ValueError):
    """Bad data or flags."""


class RunFolderError(DataError):
    """A run folder or run record that cannot be used as asked (damaged, or not a run)."""


OUT_DIR_HINT = "choose another --out_dir, or fix the folder's permissions"


class OutputDirError(UserError, OSError):
    """An output file or folder cannot be written."""

    def __init__(self, what: str, hint: str | None = OUT_DIR_HINT, err: int | None = None):
        super().__init__(what, hint)
        self.errno = err


def exit_on_error(body: Callable[[], int | None], *, interrupts: bool = False, resume_hint: str = "",
                  stream: TextIO | None = None) -> int:
    """Run `body` and return its exit code: a UserError becomes one "error: ..." line and exit 2. With
    `interrupts`, SIGINT and SIGTERM raise inside the body (its `finally` blocks run) and end as one
    "interrupted at round N; <resume_hint>" line, exit 130 / 143. Anything else keeps its traceback."""
    stream = sys.stderr if stream is None else stream
    try:
        with signals_raise() if interrupts else contextlib.nullcontext():
            code = body()
    except UserError as err:
        print(f"error: {err}", file=stream)
        return 2
    except KeyboardInterrupt as err:
        if not interrupts:
            raise
        where = f" at round {err.round}" if getattr(err, "round", None) else ""
        print(f"interrupted{where}" + (f"; {resume_hint}" if resume_hint else ""), file=stream)
        return exit_code(err)
    return 0 if code is None else code
