"""A whole Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per group, `flwr` pointed at it.

The processes docs/federation.md starts by hand, minus TLS (loopback only), for the deployment tests,
the overhead benchmark and trying a deployment on one machine (the command: scripts/loopback.py).
Each process runs in its own session.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomllib

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CONNECTION = "loopback"
# Telemetry, Ray usage stats and update checks off; no package installs at run time; the
# SuperExecs look for new work every 0.1 s instead of every second.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check, timeout: float, what: str, every: float = 0.2):
    """check()'s first truthy value; TimeoutError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def descendants(pid: int) -> set[int]:
    """Every descendant of `pid`, from /proc (SuperExec starts its own session, so no process group has them all)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has finished; its parent only has not collected it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class LoopbackFederation:
    def __init__(self, root: Path, port: int | None = None, env: dict | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[int] = set()
        home = self.root / "flwr_home"  # the Flower configuration and installed app bundles
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, **QUIET_ENV, **(env or {}), "FLWR_HOME": str(home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    # --- processes -----------------------------------------------------------------
    def _start(self, name: str, *cmd: str) -> None:
        with open(self.root / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=self.root, env=self.env,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen.add(self.procs[name].pid)

    def start_superlink(self, timeout: float = 30) -> None:
        self._start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                    "--disable-runtime-dependency-installation")

        def listening() -> bool:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited:\n{self.logs()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        poll(listening, timeout, "the SuperLink to listen")

    def start_supernode(self, group: str, dataset: str = "synthetic", data_path: str | None = None) -> None:
        config = f"group='{group}' dataset='{dataset}'" + (f" data-path='{data_path}'" if data_path else "")
        self._start(group, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        family = descendants(self.procs[name].pid)
        self._signal_all([name], sig, timeout)
        self._kill(family)  # SuperExec leaves with its parent; anything still running is killed

    def close(self, timeout: float = 15) -> list[int]:
        """Stop the SuperNodes (SIGTERM, all at once: they deregister), then the SuperLink (SIGINT); kill what
        is left of them and their descendants; return the pids that survived."""
        nodes = [n for n in self.procs if n != "superlink"]
        self._signal_all(nodes, signal.SIGTERM, timeout)
        self._signal_all([n for n in self.procs if n == "superlink"], signal.SIGINT, timeout)
        self._kill(self.seen)
        try:
            poll(lambda: not any(alive(p) for p in self.seen), timeout, "every process to exit", every=0.05)
        except TimeoutError:
            pass
        return sorted(p for p in self.seen if alive(p))

    def _signal_all(self, names: list[str], sig: int, timeout: float) -> None:
        for name in names:
            self.seen |= descendants(self.procs[name].pid)
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(sig)
        try:
            poll(lambda: all(self.procs[n].poll() is not None for n in names), timeout,
                 "the processes to stop", every=0.05)
        except TimeoutError:
            for name in names:
                if self.procs[name].poll() is None:
                    self.procs[name].kill()
                    self.procs[name].wait(10)

    def _kill(self, pids) -> None:
        """SIGKILL whatever of ours still runs (SuperExecs leave with their parent; a ClientApp may not).
        A pid is ours only while its environment holds this federation's FLWR_HOME: a recorded pid
        may have been reused by an unrelated process since."""
        for pid in pids:
            if alive(pid) and self.owns(pid):
                _sigkill(pid)

    def owns(self, pid: int) -> bool:
        try:
            return f"FLWR_HOME={self.env['FLWR_HOME']}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False

    # --- the flwr CLI --------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 60) -> dict:
        res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        out = json.loads(res.stdout) if res.returncode == 0 else {}
        if res.returncode != 0 or out.get("success") is False:  # a refused run exits 0 with success false
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
        return out

    def run(self, flags: list[str], app: Path = REPO) -> str:
        """`flwr run` with main_fl.py flags; returns the run id (the run goes on in the background)."""
        text = " ".join(flag_quote(f) for f in flags)
        return str(self.flwr("run", str(app), CONNECTION, "--run-config", run_config_value(text))["run-id"])

    def run_command(self, out_dir: Path, flags: str | None = None) -> str:
        """The shell line that starts a run of `flags` (default: pyproject's demo) writing into `out_dir`."""
        text = (default_flags() if flags is None else flags) + f" --out_dir {flag_quote(str(out_dir))}"
        quiet = " ".join(f"{k}={v}" for k, v in QUIET_ENV.items())
        return (f"{quiet} FLWR_HOME={shlex.quote(str(self.root / 'flwr_home'))} flwr run {shlex.quote(str(REPO))} "
                f"{CONNECTION} --stream --run-config {shlex.quote(run_config_value(text))}")

    def status(self, run_id: str) -> str:
        return self.flwr("ls", CONNECTION, "--run-id", run_id)["runs"][0]["status"]

    def wait_done(self, out_dir: Path, timeout: float) -> None:
        """The ServerApp writes federation.json last, also when the run fails."""
        poll(lambda: (Path(out_dir) / "federation.json").exists(), timeout, f"the run in {out_dir}", every=0.5)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} (tail)\n" + p.read_text(errors="replace")[-tail:]
                         for p in sorted(self.root.glob("*.log")))


def flag_quote(word: str) -> str:
    """One word of the flags string, backslash-escaped for shlex.split: never a double quote, which
    Flower's --run-config parser does not allow inside a value (shlex.quote makes '"'"' of a ')."""
    return re.sub(r"([^\w@%+=:,./-])", r"\\\1", word) if word else "''"


def run_config_value(flags: str) -> str:
    """`flags="..."` as `flwr run --run-config` parses it (a TOML string; Flower's parser allows no `"` in it)."""
    if '"' in flags:
        raise ValueError(f"flags for flwr run cannot hold a double quote: {flags}")
    return 'flags="' + flags.replace("\\", "\\\\") + '"'


def default_flags() -> str:
    """The run flags pyproject.toml gives a `flwr run` without --run-config."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]["flags"]


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of PID 1 (Linux prctl)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_orphans() -> list[int]:
    """Kill and collect the descendants of this process left after close(); returns those still running."""
    left = descendants(os.getpid())
    for pid in left:
        _sigkill(pid)
    for pid in left:
        try:
            os.waitpid(pid, 0)  # our children now (subreaper); waiting collects the zombie
        except ChildProcessError:
            pass
    return sorted(p for p in left if alive(p))


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
