"""The project's user-error type.

Every error a user can fix (a bad flag, file, row, run folder, checkpoint or output folder)
is a UserError: its message names the input and ends with a hint. The subclasses say where it
arose and keep the built-in base that older `except ValueError` / `except OSError` code expects.
A command line catches UserError alone and turns it into a single "error: ..." line and exit
code 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, row or flag, and ends with a hint."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(f"{what}\n  hint: {hint}" if hint else what)
        self.hint = hint


class DataError(UserError, ValueError):
    """Bad data or flags."""

