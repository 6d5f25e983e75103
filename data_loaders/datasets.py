"""From a DataConfig to tensors: parse a dataset, pick train/eval groups, embed, build GroupData.

This is the only place that knows every dataset; the training code sees `ExperimentData`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from data_loaders import embeddings  # embeddings.get_embeddings, looked up per call (tests swap it)
from data_loaders.embeddings import PICKLE_PRECISION, probe_record
from data_loaders.globalqa import COUNTRIES, EVAL_GROUPS, TRAIN_GROUPS, load_globalqa
from data_loaders.opinionqa import OPINIONQA_GROUPS, load_opinionqa, resolve_root
from utils.seeding import generator

from .question_ids import with_question_ids
from .schema import DataError, GroupData, RawDataset, build_group_data
from .synthetic import SyntheticSpec, group_names, make_synthetic

DATASETS = ("globalqa", "opinionqa", "synthetic")
# Default share of groups used for training when groups are split at random (paper: 60/40).
DEFAULT_GROUP_SPLIT = 0.6


@dataclass(frozen=True)
class EmbeddingConfig:
    """How option texts become vectors (the --emb_* flags and --cache_dir): get_embeddings' arguments."""

    emb_model: str = "auto"
    pickle_path: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    batch_size: int = 16
    dtype: str = "fp32"
    load_in_8bit: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Which data a run loads, and what its groups must hold (checked before any embedding)."""

    dataset: str = "globalqa"
    data_path: str | None = None
    strict: bool = False
    encoding: str = "utf-8"
    train_groups: tuple[str, ...] | None = None
    eval_groups: tuple[str, ...] | None = None
    group_split: float | None = None
    split_seed: int = 0
    question_split: float = 0.0
    embedding: EmbeddingConfig = EmbeddingConfig()
    synthetic: SyntheticSpec = SyntheticSpec()
    eval_num_qs: int = 1        # context questions an evaluation group must spare
    min_episode_qs: int = 2     # questions a training episode needs at least
    question_ids: bool = False  # one-hot question columns after the embeddings (data_loaders/question_ids.py)
    quiet: bool = False         # no per-group load lines

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """The inverse of dataclasses.asdict (JSON turns tuples into lists)."""
        groups = {k: None if d[k] is None else tuple(d[k]) for k in ("train_groups", "eval_groups")}
        return cls(**{**d, **groups, "embedding": EmbeddingConfig(**d["embedding"]),
                      "synthetic": SyntheticSpec(**d["synthetic"])})


@dataclass
class ExperimentData:
    dataset: str
    train: dict[str, GroupData]
    eval: dict[str, GroupData]
    dim_x: int
    has_ordinals: bool
    info: dict = field(default_factory=dict)
    heldout_qkeys: torch.Tensor | None = None  # --question_split: keys no group trains on (sorted)
    question_ids: int = 0  # --question_ids: how many of dim_x's columns (the last) are question identities


def load_raw_dataset(dataset: str, data_path: str | None = None, *, strict: bool = False,
                     groups: list[str] | None = None, log=print, encoding: str = "utf-8") -> RawDataset:
    """Parse a real dataset's files without embedding them; the caller prints raw.report. `encoding` is
    the globalqa CSV's (--encoding): OpinionQA's JSON files are UTF-8 by definition."""
    if dataset == "globalqa":
        return load_globalqa(data_path, groups=groups, strict=strict, log=log, encoding=encoding)
    if dataset == "opinionqa":
        return load_opinionqa(resolve_root(data_path), groups=groups, strict=strict, log=log)
    raise DataError(f"--dataset {dataset!r} has no files to parse", f"choose one of {', '.join(DATASETS)}")


def default_pool(dataset: str) -> tuple[list[str], list[str] | None, list[str] | None]:
    """(all default groups, default train list, default eval list) for a dataset."""
    if dataset == "globalqa":
        return COUNTRIES, TRAIN_GROUPS, EVAL_GROUPS
    if dataset == "opinionqa":
        return list(OPINIONQA_GROUPS), None, None
    raise ValueError(dataset)


def _both_sides(fraction: float, n: int) -> int:
    """round(fraction · n), with at least one of the n items on each side of the split."""
    return min(max(1, round(fraction * n)), n - 1)


def split_groups(pool: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if not 0 < fraction < 1:
        raise DataError(f"--group_split {fraction} must be in (0, 1)",
                        "it is the share of groups used for training, e.g. 0.6")
    if len(pool) < 2:
        raise DataError(f"cannot split {len(pool)} group(s) into train and eval", "name at least two groups")
    perm = torch.randperm(len(pool), generator=generator(seed, "group_split")).tolist()
    n_train = _both_sides(fraction, len(pool))
    shuffled = [pool[i] for i in perm]
    return sorted(shuffled[:n_train]), sorted(shuffled[n_train:])


def choose_groups(dataset: str, train_groups, eval_groups, group_split, seed: int,
                  all_groups: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Resolve --train_groups / --eval_groups / --group_split into two disjoint lists."""
    pool, fixed_train, fixed_eval = (list(all_groups), None, None) if dataset == "synthetic" \
        else default_pool(dataset)
    if train_groups and eval_groups and group_split is None:
        train, evals = list(train_groups), list(eval_groups)
    elif train_groups or eval_groups:
        if group_split is not None:
            pool = list(train_groups or []) + list(eval_groups or [])
            train, evals = split_groups(pool, group_split, seed)
        else:
            named = list(train_groups or eval_groups)
            rest = [g for g in pool if g not in named]
            train, evals = (named, rest) if train_groups else (rest, named)
    elif group_split is not None or fixed_train is None:
        train, evals = split_groups(pool, group_split or DEFAULT_GROUP_SPLIT, seed)
    else:
        train, evals = list(fixed_train), list(fixed_eval)
    overlap = sorted(set(train) & set(evals))
    if overlap:
        raise DataError(f"groups {overlap} are in both --train_groups and --eval_groups",
                        "a group is either a training client or a held-out evaluation group")
    for flag, names in (("--train_groups", train), ("--eval_groups", evals)):
        if not names:
            raise DataError(f"{flag} resolved to no groups", "name at least one group for each role")
        if len(set(names)) != len(names):
            raise DataError(f"{flag} names a group twice: {names}", "list each group once")
    return train, evals


def chosen_groups(cfg: DataConfig) -> tuple[list[str], list[str]]:
    pool = None
    if cfg.dataset == "synthetic":
        cfg.synthetic.validate()  # a bad spec is named before a split of too few groups fails
        pool = group_names(cfg.synthetic.num_groups)
    return choose_groups(cfg.dataset, cfg.train_groups, cfg.eval_groups, cfg.group_split, cfg.split_seed, pool)


def prepare_experiment(cfg: DataConfig, log=print, check=None) -> ExperimentData:
    """Everything a run needs from its data: groups as tensors, plus provenance. `check(question_counts,
    train, evals)` runs before embedding, so a configuration that cannot run fails in seconds."""
    t0 = time.perf_counter()
    train, evals = chosen_groups(cfg)

    def checked(raw: RawDataset) -> None:
        _check_known(raw, train + evals, cfg.dataset)
        if check is not None:
            check({g: len(raw.groups[g].qkeys) for g in train + evals}, train, evals)
        check_holdout(raw, question_holdout(raw.bank.qkeys, cfg.question_split, cfg.split_seed), train, evals,
                      cfg.eval_num_qs, cfg.min_episode_qs)

    raw, emb, emb_info = load_embedded(cfg, train + evals, log, check=checked)
    held = question_holdout(raw.bank.qkeys, cfg.question_split, cfg.split_seed)
    ids = 0
    if cfg.question_ids:
        emb, ids = with_question_ids(raw.bank, emb, held)
        log(f"question ids: {ids} one-hot question columns after the {emb.shape[1] - ids}-dim embeddings "
            f"(--question_ids){'; held-out questions get none' if held is not None else ''}")
    build = lambda names: {g: build_group_data(raw, g, emb) for g in names}  # noqa: E731
    data = ExperimentData(cfg.dataset, build(train), build(evals), int(emb.shape[1]),
                          raw.bank.ordinals is not None, heldout_qkeys=held, question_ids=ids)
    data.info = data_info(raw, emb_info, time.perf_counter() - t0)
    if ids:
        data.info["question_ids"] = ids
    if held is not None:
        data.info["question_split"] = {"fraction": cfg.question_split, "pool_questions": len(raw.bank.qkeys),
                                       "heldout_questions": len(held), "seed": cfg.split_seed}
        log(f"question split: {len(held)} of {len(raw.bank.qkeys)} questions held out from all training "
            f"(--question_split {cfg.question_split:g}, split seed {cfg.split_seed})")
    log_groups(data, log, per_group=not cfg.quiet)
    return data


def load_embedded(cfg: DataConfig, groups: list[str] | None, log=print, check=None):
    """(raw dataset, option embeddings, embedding provenance). Real datasets are parsed with every
    considered group (`groups`: the filter asks each of them); `check(raw)` runs before embedding."""
    if cfg.dataset == "synthetic":
        raw, emb = make_synthetic(cfg.synthetic)
    else:
        raw = load_raw_dataset(cfg.dataset, cfg.data_path, strict=cfg.strict, groups=groups, log=log,
                               encoding=cfg.encoding)
    for line in raw.report.lines():
        log(line)
    if check is not None:
        check(raw)
    if cfg.dataset == "synthetic":
        return raw, emb, {"emb_model": "synthetic", "dim": int(emb.shape[1]), "source": "generated"}
    emb, emb_info = embeddings.get_embeddings(raw, **vars(cfg.embedding), log=log)
    if emb_info.get("source") != "pickle" and emb_info.get("precision") != PICKLE_PRECISION:
        emb_info["probe"] = probe_record(raw, emb)  # no model behind the authors' vectors to compare with
    return raw, emb, emb_info


def data_info(raw: RawDataset, emb_info: dict, seconds: float) -> dict:
    """The data provenance a run folder records (config.json's "data")."""
    return {"source_hash": raw.source_hash, "source": raw.report.source, "kept_questions": raw.report.kept_questions,
            "dropped": dict(raw.report.dropped), "load_seconds": round(seconds, 3),
            "embedding": {k: v for k, v in emb_info.items() if k != "seconds"}}


def _check_known(raw: RawDataset, names: list[str], dataset: str) -> None:
    unknown = [g for g in names if g not in raw.groups]
    if unknown:
        raise DataError(f"group(s) {unknown} not found in the {dataset} data",
                        f"available: {', '.join(sorted(raw.groups))}")


def question_holdout(qkeys, fraction: float, seed: int) -> torch.Tensor | None:
    """The leakage-free protocol's held-out questions: round(fraction · pool) keys drawn from the
    whole question pool by (split seed, 'question_split'), the same for every group; None at 0."""
    if not fraction:
        return None
    keys = torch.as_tensor(np.asarray(qkeys), dtype=torch.long)
    k = _both_sides(fraction, len(keys))
    order = torch.randperm(len(keys), generator=generator(seed, "question_split"))
    return keys[order[:k]].sort().values


def check_holdout(raw: RawDataset, held: torch.Tensor | None, train: list[str], evals: list[str],
                  eval_num_qs: int, need_local: int) -> None:
    """Under --question_split every evaluation group needs held-out questions to score and enough
    others for its context; a training group needs some questions left to train on."""
    if held is None:
        return
    for name in (*train, *evals):
        keys = torch.as_tensor(np.asarray(raw.groups[name].qkeys), dtype=torch.long)
        n_held = int(torch.isin(keys, held).sum())
        n_rest = len(keys) - n_held
        if name in evals and (n_held == 0 or n_rest < eval_num_qs):
            raise DataError(f"evaluation group {name!r} has {n_held} held-out question(s) to score and {n_rest} "
                            f"other(s) for its context under --question_split; --eval_num_qs {eval_num_qs} "
                            "needs at least that many others and one held-out question",
                            "raise or lower --question_split, lower --eval_num_qs, or leave the group out")
        if name in train and n_rest < need_local:
            raise DataError(f"training group {name!r} has {n_rest} question(s) outside the held-out set, fewer "
                            f"than --min_ctx_num_qs + --min_tar_num_qs = {need_local}",
                            "lower --question_split, or leave the group out with --train_groups")


def log_groups(data: ExperimentData, log=print, per_group: bool = True) -> None:
    for role, groups in (("train", data.train), ("eval", data.eval)) if per_group else ():
        for name, g in groups.items():
            log(f"  {role:5s} {name}: {g.num_questions} questions, {g.num_points} options")
    log(f"loaded {data.dataset}: {len(data.train)} train + {len(data.eval)} eval groups, "
        f"dim {data.dim_x}, in {data.info['load_seconds']:.2f} s")
