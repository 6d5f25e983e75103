"""Compute (or check) the option embeddings of a dataset ahead of training.

    python -m data_loaders.embed --dataset globalqa --emb_model minilm [--data_path P]

It fills the cache the training entry points read: vectors are stored by the text they
embed, so a later run whose questions are among them embeds nothing. The data and
embedding flags have main_fl.py's names (--emb_device, --emb_batch_size, --emb_dtype,
--emb_load_in_8bit, --emb_pickle, --encoding, --train_groups, ...), so a run's own flags
can be pasted here; the old --device, --batch_size, --dtype, --load_in_8bit and
--pickle_path still work (hidden, with a note). It then says what was loaded and dropped,
the embedding size, where the vectors came from and how long it took. Bad input exits
with status 2 and the error's message.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import numpy as np

from data_loaders.datasets import choose_groups, default_pool, group_names, load_raw_dataset
from data_loaders.embeddings import DTYPES, get_embeddings
from data_loaders.schema import RawDataset
from utils.errors import exit_on_error


class _OldName(argparse.Action):
    """A pre-rename flag (--device, ...): still works, hidden from --help, and says its new name."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        self.new_name = new_name
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.renamed.append(f"{option_string} is now {self.new_name}")


# Old flag -> (main_fl.py's name, what the old flag took).
OLD_NAMES = {"--device": ("--emb_device", {}), "--batch_size": ("--emb_batch_size", {"type": int}),
             "--dtype": ("--emb_dtype", {"choices": list(DTYPES)}),
             "--load_in_8bit": ("--emb_load_in_8bit", {"nargs": 0, "const": True}),
             "--pickle_path": ("--emb_pickle", {})}


def build_parser() -> argparse.ArgumentParser:
    """The data and embedding flags under main_fl.py's names, so one command line serves both."""
    p = argparse.ArgumentParser(prog="python -m data_loaders.embed", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=["globalqa", "opinionqa"], help="dataset to embed")
    p.add_argument("--emb_model", default="auto",
                   help="auto | alpaca | llama | minilm | <HF model id or local path> (default: auto)")
    p.add_argument("--data_path", default=None, help="dataset file/folder (default: the loader's own)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the globalqa CSV (default: utf-8)")
    p.add_argument("--strict", action="store_true", help="fail on malformed rows instead of dropping them")
    p.add_argument("--train_groups", type=group_names, default=None,
                   help="as main_fl.py: the run's training groups (with --eval_groups/--group_split "
                        "they decide which questions are kept)")
    p.add_argument("--eval_groups", type=group_names, default=None, help="as main_fl.py")
    p.add_argument("--group_split", type=float, default=None, help="as main_fl.py")
    p.add_argument("--groups", nargs="+", default=None,
                   help="groups to load, one argument each, instead of the three flags above "
                        "(default: the groups main_fl.py would use with the same flags)")
    p.add_argument("--cache_dir", default=None,
                   help="embedding cache folder "
                        "(default: $PLURALLLM_CACHE_DIR or ~/.cache/plurallm/embeddings)")
    p.add_argument("--emb_device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--emb_batch_size", type=int, default=16, help="texts per forward pass (default: 16)")
    p.add_argument("--emb_dtype", default="fp32", choices=list(DTYPES), help="model weights dtype (default: fp32)")
    p.add_argument("--emb_load_in_8bit", action="store_true", help="8-bit weights via bitsandbytes (CUDA only)")
    p.add_argument("--emb_pickle", default=None,
                   help="the authors' embeddings_alpaca_<dataset>.pkl "
                        "(unpickling runs code: trusted files only; default: none)")
    for old, (new, kwargs) in OLD_NAMES.items():
        p.add_argument(old, dest=new.lstrip("-"), action=_OldName, new_name=new, default=argparse.SUPPRESS,
                       **kwargs)
    p.set_defaults(renamed=[])
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for note in args.renamed:
        print(f"note: {note} (the old name still works, for now)", file=sys.stderr)
    return args


def considered_groups(args: argparse.Namespace) -> list[str]:
    """--groups, else the groups main_fl.py would parse with these group flags.

    The union of its train and eval groups does not depend on the seed, so none is asked for.
    """
    if args.groups:
        return list(args.groups)
    if not (args.train_groups or args.eval_groups or args.group_split is not None):
        return default_groups(args.dataset)
    train, evals = choose_groups(args.dataset, args.train_groups, args.eval_groups, args.group_split, seed=0)
    return train + evals


def default_groups(dataset: str) -> list[str]:
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
