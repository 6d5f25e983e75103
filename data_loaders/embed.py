"""Compute (or check) the option embeddings of a dataset ahead of training.

    python -m data_loaders.embed --dataset globalqa --emb_model minilm [--data_path P]

It fills the same cache the training entry points read (same key: the groups default to
the dataset's default pool, as in training), then says what was loaded and dropped, the
embedding size, where the vectors came from and how long it took. Bad input exits with
status 2 and the error's message.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import numpy as np

from data_loaders.embeddings import DTYPES, get_embeddings
from data_loaders.schema import DataError, RawDataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_loaders.embed", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=["globalqa", "opinionqa"], help="dataset to embed")
    p.add_argument("--emb_model", default="auto",
                   help="auto | alpaca | llama | minilm | <HF model id or local path> (default: auto)")
    p.add_argument("--data_path", default=None, help="dataset file/folder (default: the loader's own)")
    p.add_argument("--groups", nargs="+", default=None,
                   help="groups to load (default: the dataset's default pool, as training uses)")
    p.add_argument("--cache_dir", default=None,
                   help="embedding cache folder "
                        "(default: $PLURALLLM_CACHE_DIR or ~/.cache/plurallm/embeddings)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--batch_size", type=int, default=16, help="texts per forward pass (default: 16)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="model weights dtype (default: fp32)")
    p.add_argument("--load_in_8bit", action="store_true", help="8-bit weights via bitsandbytes (CUDA only)")
    p.add_argument("--pickle_path", default=None,
                   help="the authors' embeddings_alpaca_<dataset>.pkl "
                        "(unpickling runs code: trusted files only; default: none)")
    p.add_argument("--strict", action="store_true", help="fail on malformed rows instead of dropping them")
    return p.parse_args(argv)


def default_groups(dataset: str) -> list[str]:
    from data_loaders.datasets import default_pool
    return list(default_pool(dataset)[0])


def describe(raw: RawDataset, log: Callable[[str], None]) -> None:
    """Groups, questions per group, options per question, and what the loader dropped."""
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
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        from data_loaders.datasets import load_raw_dataset
        groups = args.groups or default_groups(args.dataset)
        raw = load_raw_dataset(args.dataset, args.data_path, strict=args.strict, groups=groups, log=log)
        describe(raw, log)
        emb, info = get_embeddings(raw, args.emb_model, dataset_options={"groups": sorted(groups)},
                                   cache_dir=args.cache_dir, device=args.device, batch_size=args.batch_size,
                                   dtype=args.dtype, load_in_8bit=args.load_in_8bit,
                                   pickle_path=args.pickle_path, log=log)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"embedding: {info['emb_model']} ({info['model_id']}), dim {info['dim']}, "
        f"{emb.shape[0]} points, source {info['source']}, {info['seconds']:.1f} s")
    log(f"cache file: {info['cache_file']}")
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
