"""SIGINT and SIGTERM as one exception, so `finally` blocks close logs and locks and the run exits
130/143 saying where it stopped (SIGTERM would otherwise end the process without unwinding)."""
from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; exit_code follows the shell's 128 + signal number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.round: int | None = None  # set by the run loop: the round that was in progress


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise():
    """Inside the block, SIGINT and SIGTERM raise Interrupted (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def exit_code(err: KeyboardInterrupt) -> int:
    return getattr(err, "exit_code", 128 + signal.SIGINT)
