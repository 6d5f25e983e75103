"""Repair a run folder's logs that two processes appended to at once.

    python -m utils.repair_logs runs/<run>        # then rerun the run's command with --resume

Keeps the first record of each round in metrics.jsonl and losses.jsonl (the numbers of a
round are the same whichever process logged it: runs are deterministic in their flags).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.run_io import repair_log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the run folder holding metrics.jsonl and losses.jsonl")
    args = p.parse_args(argv)
    folder = Path(args.run_dir)
    logs = [folder / n for n in ("metrics.jsonl", "losses.jsonl") if (folder / n).is_file()]
    if not logs:
        print(f"error: {folder} holds no metrics.jsonl or losses.jsonl", file=sys.stderr)
        return 2
    for path in logs:
        kept, dropped = repair_log(path)
        print(f"{path}: kept {kept} records, dropped {dropped} repeated or out-of-order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
