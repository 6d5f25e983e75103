"""Share a trained run's predictor as a Hugging Face-style folder:

    python -m inference.export --run RUN_DIR --out DIR [--checkpoint final] [--push_to_hub user/name]
"""
from __future__ import annotations

import argparse
import sys

from utils.errors import exit_on_error

from .predictor import GroupPredictor
from .pretrained import WEIGHTS, push_to_hub, save_pretrained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder to export")
    p.add_argument("--out", required=True, help="folder to write (created); refused if it holds a run or a "
                   "different export, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace a different export in --out (default off)")
    p.add_argument("--checkpoint", default="final", help="checkpoint tag (default final)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also upload to this hub repo (private)")
    args = p.parse_args(argv)
    return exit_on_error(lambda: _export(args))


def _export(args: argparse.Namespace) -> None:
    pred = GroupPredictor.from_run(args.run, args.checkpoint, use_run_data=False, log=print)
    out = save_pretrained(pred, args.out, args.overwrite)
    print(f"wrote {out}: {WEIGHTS}, config.json, README.md")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub)}")


if __name__ == "__main__":
    sys.exit(main())
