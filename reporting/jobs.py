"""Several runs at once (--jobs N), each in its own Python process with its own torch thread count; 2 by
default from the measurement in benchmarks/README.md. Stopping the parent stops the children, each leaving
a resumable folder."""
from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_loaders.schema import DataError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Task:
    label: str                  # prefixed to each line of the child's output
    target: str                 # "module:function", called in the child with *args; returns an exit code
    args: tuple                 # JSON values (sent to the child as JSON: nothing is unpickled)
    threads: int
    errors: list[str] = field(default_factory=list)  # the child's "error: ..." lines, for the parent's message


def usable_cores() -> int:
    """Cores this process may run on (a job scheduler's CPU set, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_jobs(jobs: int | None, threads: int, cores: int) -> tuple[int, int]:
    """(runs at once, torch threads per run; 0 = torch's default, only for a single in-process run)."""
    jobs = (2 if cores >= 2 else 1) if jobs is None else jobs
    if jobs < 1:
        raise DataError(f"--jobs {jobs} must be >= 1", "--jobs 1 trains one run at a time, in this process")
    if threads < 0:
        raise DataError(f"--threads {threads} must be >= 0", "0 = torch's default (one run) or cores // --jobs")
    if jobs == 1:
        return 1, threads
    threads = threads or max(1, cores // jobs)
    if jobs * threads > cores:
        raise DataError(f"--jobs {jobs} x --threads {threads} = {jobs * threads} threads on {cores} cores",
                        f"runs at once share the cores: use --threads {max(1, cores // jobs)} or fewer --jobs")
    return jobs, threads


def _start(task: Task) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(task.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this code
    proc = subprocess.Popen([sys.executable, "-m", "reporting.jobs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True, errors="replace")
    proc.stdin.write(json.dumps([task.target, list(task.args), task.threads]))
    proc.stdin.close()
    return proc


def _relay(task: Task, proc: subprocess.Popen, log, ended: queue.Queue) -> None:
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("error:") or (task.errors and line.startswith("  hint:")):
            task.errors.append(line)
        log(f"[{task.label}] {line}")
    ended.put((task, proc.wait()))


def run_tasks(tasks: list[Task], jobs: int, on_done, log=print) -> None:
    """Run the tasks, at most `jobs` at once; on_done(task, exit code) in this thread as each ends.
    If on_done raises (or this process is interrupted), the running children are stopped with
    SIGTERM and waited for before the exception goes on."""
    pending, running, ended = list(tasks), {}, queue.Queue()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                running[id(task)] = proc = _start(task)
                log(f"[{task.label}] started (process {proc.pid}, {task.threads} torch thread(s))")
                threading.Thread(target=_relay, args=(task, proc, log, ended), daemon=True).start()
            task, code = ended.get()
            del running[id(task)]
            on_done(task, code)
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.wait()


def _child() -> int:
    target, args, threads = json.load(sys.stdin)
    torch.set_num_threads(threads)
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


if __name__ == "__main__":
    sys.exit(_child())
