"""The project's user-error type.

Every error a user can fix (a bad flag, file, row, run folder, checkpoint or output folder)
is a UserError: its message names the input and ends with a hint. The subclasses say where it
arose and keep the built-in base that older `except ValueError` / `except OSError` code expects.
Every command line ends through `exit_on_error`, which turns a UserError into a single
"error: ..." line and exit code 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

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
    """An output file or folder cannot be written; the message names it and gives a hint."""

    def __init__(self, what: str, hint: str | None = OUT_DIR_HINT, err: int | None = None):
        super().__init__(what, hint)
        self.errno = err


def exit_on_error(body: Callable[[], int | None], *, interrupts: bool = False, resume_hint: str = "",
                  stream: TextIO | None = None) -> int:
    """Every command line's exit: run `body` and return its exit code (0 when it returns None).

    A UserError becomes the single line "error: <message>" and exit code 2. With `interrupts`,
    SIGINT and SIGTERM raise inside the body (so its `finally` blocks close logs and locks) and
    end as one line, "interrupted at round N; <resume_hint>", with the shell's code 130 / 143.
    Any other exception is a bug and keeps its traceback.
    """
    stream = sys.stderr if stream is None else stream
    try:
        if not interrupts:
            code = body()
        else:
            with signals_raise():
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
