"""The project's user-error type, at the bottom of the layers so that every package can raise it."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input: the message names the file, row or flag, and ends with a hint."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(f"{what}\n  hint: {hint}" if hint else what)
        self.hint = hint
