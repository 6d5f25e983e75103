"""One process per output folder: two writing one folder would interleave their logs."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from utils.atomic_write import make_folder, write_all
from utils.errors import OutputDirError


class RunLock:
    """``flock`` on ``<folder>/.lock``: the kernel drops it however the process ends, so it never goes
    stale. The file names the holder (PID, start, command) for a refused process's message."""

    def __init__(self, folder: str | Path, what: str = "run folder", flag: str = "--out_dir"):
        self.folder, self.what, self.flag = Path(folder), what, flag  # flag: what chose the folder
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        make_folder(self.folder)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot create {self.path}: {e.strerror}", err=e.errno) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = self._in_use(fd)
            os.close(fd)
            raise err from None
        info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        write_all(fd, (json.dumps(info) + "\n").encode("utf-8"))
        self._fd = fd
        return self

    def check_free(self) -> None:
        """Refuse before slow work when a live process holds the lock; holds nothing (acquire() decides)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file yet (or none readable): acquire() reports what is wrong
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(fd) from None
        finally:
            os.close(fd)  # also drops the probe's own lock

    def _in_use(self, fd: int) -> OutputDirError:
        return OutputDirError(
            f"{self.what} {self.folder} is in use by {_holder(fd)}; two processes writing one folder would "
            "interleave their logs", f"wait for it to finish (or stop it), or use another {self.flag}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (harmless)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        cmd = " ".join(str(a) for a in info.get("argv", []))
        cmd = cmd if len(cmd) <= 120 else cmd[:119] + "…"  # the ellipsis says it was cut
        return f"process {info['pid']} (started {info.get('started', '?')}: {cmd})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its PID could not be read)"
