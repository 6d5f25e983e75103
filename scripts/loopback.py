"""Start a SuperLink and one SuperNode per group on 127.0.0.1 (insecure: loopback only) until Ctrl+C or SIGTERM.

    python scripts/loopback.py --groups g00,g01,g02      # then, in another shell, the printed `flwr run`

The federation is flower_app/loopback.py's. Stops on SIGINT and SIGTERM (exit 130 / 143) and makes itself
the subreaper, so an orphaned ClientApp is reaped too.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flower_app.loopback import LoopbackFederation, become_subreaper, reap_orphans  # noqa: E402
from utils.interrupts import exit_code, signals_raise  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="g00,g01,g02", help="comma-separated groups, one SuperNode each")
    p.add_argument("--dataset", default="synthetic", help="dataset every SuperNode holds")
    p.add_argument("--data_path", default=None, help="data path given to every SuperNode (real datasets)")
    p.add_argument("--root", default="runs/loopback", help="folder for logs, the Flower configuration and runs")
    p.add_argument("--port", type=int, default=0, help="SuperLink port (0: a free one)")
    args = p.parse_args(argv)
    with signals_raise():
        return serve(args)


def serve(args) -> int:
    become_subreaper()
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    fed = None
    try:
        fed = LoopbackFederation(Path(args.root).resolve(), args.port or None)
        fed.start_superlink()
        for group in groups:
            fed.start_supernode(group, args.dataset, args.data_path)
        # the ServerApp runs in the SuperLink's folder: the printed line names its --out_dir absolutely
        out_dir = fed.root / "runs" / time.strftime("%Y%m%d-%H%M%S_fedavg")
        print(f"SuperLink on 127.0.0.1:{fed.port}; logs in {fed.root}. In another shell:\n"
              f"  {fed.run_command(out_dir)}\n"
              f"That run writes {out_dir} (give each further run another --out_dir); a run without "
              f"--out_dir lands in {fed.root / 'runs'} (the SuperLink's folder). Ctrl+C stops every process.",
              flush=True)
        while all(proc.poll() is None for proc in fed.procs.values()):
            time.sleep(1)
        print("a process exited; stopping the federation:\n" + fed.logs(), file=sys.stderr)
        return 1
    except KeyboardInterrupt as sig:
        print(f"interrupted ({sig}): stopping the SuperLink and {len(groups)} SuperNode(s) with their processes; "
              "rerun the same command to start the federation again", file=sys.stderr, flush=True)
        return exit_code(sig)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        left = (fed.close() if fed is not None else []) + reap_orphans()
        if left:
            print(f"processes still running: {left}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
