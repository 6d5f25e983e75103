"""A whole Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per group, `flwr` pointed at it.

The same processes docs/federation.md starts by hand, minus TLS (`--insecure` is only for
loopback), for the deployment tests, the overhead benchmark, and trying a deployment on
one machine:

    python -m flower_app.loopback --groups g00,g01,g02      # then, in another shell, the printed `flwr run`

Every process runs in its own session; `close()` stops the SuperNodes (SIGTERM: they
deregister) and the SuperLink (SIGINT, which it handles), kills whatever is left of
them and their descendants (SuperExec, ServerApp and ClientApp processes), and returns
the pids that survived (none, normally). Waits are polls with deadlines.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
        proc = self.procs[name]
        family = descendants(proc.pid)
        self.seen |= family
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in family:  # SuperExec leaves with its parent; anything still running is killed
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self, timeout: float = 15) -> list[int]:
        for name in [n for n in self.procs if n != "superlink"]:
            self.stop(name)
        if "superlink" in self.procs:
            self.stop("superlink", signal.SIGINT)
        try:
            poll(lambda: not any(alive(p) for p in self.seen), timeout, "every process to exit")
        except TimeoutError:
            pass
        return sorted(p for p in self.seen if alive(p))

    # --- the flwr CLI --------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 60) -> dict:
        res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def run(self, flags: list[str], app: Path = REPO) -> str:
        """`flwr run` with main_fl.py flags; returns the run id (the run goes on in the background)."""
        text = " ".join(flags)
        return str(self.flwr("run", str(app), CONNECTION, "--run-config", f'flags="{text}"')["run-id"])

    def status(self, run_id: str) -> str:
        return self.flwr("ls", CONNECTION, "--run-id", run_id)["runs"][0]["status"]

    def wait_done(self, out_dir: Path, timeout: float) -> None:
        """The ServerApp writes federation.json last, also when the run fails."""
        poll(lambda: (Path(out_dir) / "federation.json").exists(), timeout, f"the run in {out_dir}", every=0.5)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} (tail)\n" + p.read_text(errors="replace")[-tail:]
                         for p in sorted(self.root.glob("*.log")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Start a SuperLink and one SuperNode per group on 127.0.0.1 "
                                            "(insecure: loopback only) until Ctrl+C.")
    p.add_argument("--groups", default="g00,g01,g02", help="comma-separated groups, one SuperNode each")
    p.add_argument("--dataset", default="synthetic", help="dataset every SuperNode holds")
    p.add_argument("--data_path", default=None, help="data path given to every SuperNode (real datasets)")
    p.add_argument("--root", default="runs/loopback", help="folder for logs and the Flower configuration")
    p.add_argument("--port", type=int, default=0, help="SuperLink port (0: a free one)")
    args = p.parse_args(argv)
    fed = LoopbackFederation(Path(args.root).resolve(), args.port or None)
    try:
        fed.start_superlink()
        for group in args.groups.split(","):
            fed.start_supernode(group.strip(), args.dataset, args.data_path)
        quiet = " ".join(f"{k}={v}" for k, v in QUIET_ENV.items())
        print(f"SuperLink on 127.0.0.1:{fed.port}; logs in {fed.root}. In another shell:\n"
              f"  {quiet} FLWR_HOME={fed.root / 'flwr_home'} flwr run {REPO} {CONNECTION} --stream\n"
              "Ctrl+C stops every process.", flush=True)
        while all(proc.poll() is None for proc in fed.procs.values()):
            time.sleep(1)
        print("a process exited; stopping the federation:\n" + fed.logs(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        left = fed.close()
        if left:
            print(f"processes still running: {left}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
