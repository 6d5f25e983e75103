"""Repair a run folder's logs that two processes appended to at once, keeping each round's first record.

    python scripts/repair_logs.py runs/<run>        # then rerun the run's command with --resume
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import UserError, exit_on_error  # noqa: E402
from utils.jsonl_log import repair_log  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the run folder holding metrics.jsonl and losses.jsonl")
    args = p.parse_args(argv)
    return exit_on_error(lambda: repair(Path(args.run_dir)))


def repair(folder: Path) -> None:
    logs = [folder / n for n in ("metrics.jsonl", "losses.jsonl") if (folder / n).is_file()]
    if not logs:
        raise UserError(f"{folder} holds no metrics.jsonl or losses.jsonl", "name a run folder under runs/")
    for path in logs:
        kept, dropped = repair_log(path)
        print(f"{path}: kept {kept} records, dropped {dropped} repeated or out-of-order")


if __name__ == "__main__":
    sys.exit(main())
