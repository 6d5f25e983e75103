"""Compute (or check) the option embeddings of a dataset ahead of training.

    python -m orchestration.embed --dataset globalqa --emb_model minilm [--data_path P]

It fills the cache the training entry points read: vectors are stored by the text they embed,
so a later run whose questions are among them embeds nothing. Its data and embedding flags are
main_fl.py's own (orchestration/cli.py), so a run's flags can be pasted here. It says what was
loaded and dropped, the embedding size, where the vectors came from and how long it took.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import numpy as np

from data_loaders.datasets import choose_groups, default_pool, load_raw_dataset
from data_loaders.embeddings import get_embeddings
from data_loaders.schema import RawDataset
from orchestration.cli import DefaultsOnce, add_embedding_arguments, add_source_arguments
from utils.errors import exit_on_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestration.embed", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsOnce)
    add_source_arguments(p, datasets=("globalqa", "opinionqa"), required=True)
    p.add_argument("--groups", nargs="+", default=None,
                   help="groups to load, one argument each, instead of --train_groups/--eval_groups/--group_split "
                        "(default: the groups main_fl.py would use with the same flags)")
    add_embedding_arguments(p)
    return p


def considered_groups(args: argparse.Namespace) -> list[str]:
    """--groups, else the groups main_fl.py would parse with these group flags (their union
    does not depend on the seed, so none is asked for)."""
    if args.groups:
        return list(args.groups)
    if not (args.train_groups or args.eval_groups or args.group_split is not None):
        return list(default_pool(args.dataset)[0])
    train, evals = choose_groups(args.dataset, args.train_groups, args.eval_groups, args.group_split, seed=0)
    return train + evals


def describe(raw: RawDataset, log: Callable[[str], None]) -> None:
    for line in raw.report.lines():
        log(line)
    sizes = np.diff(raw.bank.offsets)
    log(f"groups: {len(raw.groups)}")
    for name, prefs in raw.groups.items():
        log(f"  {name}: {len(prefs.qkeys)} questions")
    if len(sizes):
        log(f"questions: {len(raw.bank)}; options: {raw.bank.num_points} points, per question "
            f"min {sizes.min()} / mean {sizes.mean():.2f} / max {sizes.max()}")
    else:
        log("questions: 0")


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    args = build_parser().parse_args(argv)
    return exit_on_error(lambda: _embed(args, log))


def _embed(args, log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    raw = load_raw_dataset(args.dataset, args.data_path, strict=args.strict, groups=considered_groups(args),
                           log=log, encoding=args.encoding)
    describe(raw, log)
    emb, info = get_embeddings(raw, args.emb_model, cache_dir=args.cache_dir, device=args.emb_device,
                               batch_size=args.emb_batch_size, dtype=args.emb_dtype,
                               load_in_8bit=args.emb_load_in_8bit, pickle_path=args.emb_pickle, log=log)
    log(f"embedding: {info['emb_model']} ({info['model_id']}), dim {info['dim']}, "
        f"{emb.shape[0]} points, source {info['source']}, {info['seconds']:.1f} s")
    log(f"cache file: {info['cache_file']}")
    log(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
