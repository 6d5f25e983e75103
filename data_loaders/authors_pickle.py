"""The authors' precomputed Alpaca embeddings (`embeddings_alpaca_globalqa.pkl`): a pickled DataFrame,
one row per (question, option) in CSV order, with `qkey` (the CSV row index), `prompt_answer` (the
embedded text) and `embedding`; rows match the bank by qkey, a qkey's rows being its options in order.
Unpickling runs whatever code the file carries: only a path the user gave or dropped in is opened, with
a warning, and the embeddings module converts it once into its safe cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data_loaders.prompts import answer_text
from data_loaders.schema import DataError, QuestionBank


def _read_frame(path: Path, log: Callable[[str], None]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The unpickled DataFrame, its [rows, D] float32 embeddings and its qkeys; errors name the file."""
    log(f"WARNING: loading a pickle executes any code stored in it; only load files you trust (here: {path})")
    if not path.is_file():
        raise DataError(f"authors' embedding pickle not found: {path}",
                        hint="check --emb_pickle, or drop the file into data_loaders/llm_embedding/")
    try:
        frame = pd.read_pickle(path)
    except Exception as exc:  # unpickling can fail in many ways; all mean "not usable"
        raise DataError(f"cannot read the pickle {path}: {type(exc).__name__}: {exc}",
                        hint="it should be the authors' embeddings_alpaca_<dataset>.pkl "
                             "(a pandas DataFrame); re-download it or pass --emb_model minilm") from exc
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path} holds a {type(frame).__name__}, not a pandas DataFrame",
                        hint="expected the authors' embeddings_alpaca_<dataset>.pkl")
    missing = [c for c in ("qkey", "embedding") if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}",
                        hint="expected one row per (question, option) with 'qkey' and 'embedding'")
    lengths = frame["embedding"].map(len).to_numpy()
    if len(lengths) == 0:
        raise DataError(f"{path} has no rows", hint="the file is empty or truncated")
    bad = np.flatnonzero(lengths != lengths[0])
    if len(bad):
        raise DataError(f"{path}: embedding dimension is inconsistent: row 0 has {lengths[0]} "
                        f"values, row {bad[0]} has {lengths[bad[0]]} ({len(bad)} rows differ from row 0)",
                        hint="the file is damaged or mixes models; re-create or re-download it")
    matrix = np.asarray(np.stack(frame["embedding"].map(np.asarray).to_list()), dtype=np.float32)
    try:
        qkeys = frame["qkey"].to_numpy().astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: column 'qkey' is not integer ({exc})",
                        hint="only the GlobalOpinionQA layout (qkey = CSV row index) is supported") from exc
    return frame, matrix, qkeys


def bank_row_indices(frame_qkeys: np.ndarray, bank: QuestionBank, path: Path) -> np.ndarray:
    """For each bank point, the frame row holding it (a qkey's rows in file order)."""
    rows_of: dict[int, list[int]] = {}
    for row, qkey in enumerate(frame_qkeys.tolist()):
        rows_of.setdefault(qkey, []).append(row)
    missing = np.array([q for q in bank.qkeys.tolist() if q not in rows_of], dtype=np.int64)
    if len(missing):
        raise DataError(f"{path} has no rows for {len(missing)} bank question(s), qkeys "
                        f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}",
                        hint="the pickle was made from another version or filtering of the "
                             "dataset; pass --emb_model minilm (or alpaca with a GPU) to embed it here")
    rows = [rows_of[q] for q in bank.qkeys.tolist()]
    wrong = [i for i, (r, opts) in enumerate(zip(rows, bank.options)) if len(r) != len(opts)]
    if wrong:
        q = wrong[0]
        raise DataError(f"{path}: option counts differ for {len(wrong)} question(s); e.g. qkey {bank.qkeys[q]} has "
                        f"{len(rows[q])} rows in the pickle but {len(bank.options[q])} options in the dataset",
                        hint="the pickle and the dataset disagree; use --emb_model minilm or alpaca")
    return np.array([r for q_rows in rows for r in q_rows], dtype=np.int64)


def check_answers(frame: pd.DataFrame, rows: np.ndarray, bank: QuestionBank,
                  log: Callable[[str], None]) -> None:
    """Warn (not fail) when `prompt_answer` does not end with the bank's option text."""
    if "prompt_answer" not in frame.columns:
        return
    texts = frame["prompt_answer"].to_numpy()[rows]
    expected = [answer_text(i, opt) for opts in bank.options for i, opt in enumerate(opts)]
    bad = [i for i, (t, e) in enumerate(zip(texts, expected)) if not str(t).endswith(e)]
    if bad:
        log(f"WARNING: {len(bad)} of {bank.num_points} pickle rows do not end with the option "
            f"text the dataset has (e.g. point {bad[0]}: expected ...{expected[bad[0]]!r}); "
            "option texts were parsed differently, the embeddings are used as they are")


def load_authors_pickle(path: str | Path, bank: QuestionBank,
                        log: Callable[[str], None] = print) -> np.ndarray:
    """[bank.num_points, D] float32 embeddings in bank order from the authors' pickle."""
    path = Path(path)
    frame, matrix, qkeys = _read_frame(path, log)
    rows = bank_row_indices(qkeys, bank, path)
    check_answers(frame, rows, bank, log)
    unused = len(frame) - len(np.unique(rows))
    log(f"authors' pickle {path.name}: {len(frame)} rows, dim {matrix.shape[1]}; "
        f"{bank.num_points} mapped to the dataset, {unused} rows for questions not in it left unused")
    return matrix[rows]
