"""Predict how a group answers new questions, from a run folder and a few of the group's answers.

    python -m inference.predict --run RUN_DIR --context answers.jsonl --questions new.jsonl --out predictions.jsonl
    python -m inference.predict --run RUN_DIR --group Democrat --out predictions.jsonl

`--group NAME` takes the context the run's evaluation gave a group of its dataset; without
`--questions` it predicts the questions the run scored for it, adding the truth and the distance,
whose mean reproduces the group's score in the run's metrics.jsonl. Formats: docs/inference.md.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_loaders.schema import DataError, GroupData
from utils.distances import needed_ordinals
from utils.errors import exit_on_error

from .items import Answer, Question, read_context_file, read_questions_file
from .predictor import GroupPredictor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (what main_fl.py / main_centralized.py wrote)")
    p.add_argument("--checkpoint", default="final", help="checkpoint tag under checkpoints/ (default final)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--context", help="the group's answers, JSONL: question, options, distribution per line")
    src.add_argument("--group", help="take the context from this group of the run's dataset")
    p.add_argument("--questions", help="questions to predict, JSONL: question, options per line "
                                       "(required with --context; default with --group: the run's scored questions)")
    p.add_argument("--out", default="-", help="predictions, JSONL (default - : standard output)")
    p.add_argument("--data_path", default=None, help="the run's dataset, if not where its config says")
    p.add_argument("--cache_dir", default=None, help="embedding cache (default as for training)")
    p.add_argument("--emb_model", default=None, help="override the run's embedding model (must be the same model)")
    p.add_argument("--device", default="cpu", help="device for the predictor (cpu, cuda, cuda:N)")
    p.add_argument("--batch_size", type=int, default=2048,
                   help="target questions per forward pass (0 = all at once; results agree to float rounding)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


@dataclass
class Job:
    who: str
    ctx_x: list
    ctx_y: list
    questions: list[Question]
    tgt_x: list
    truth: list  # per target: the group's distribution or None


def context_job(pred: GroupPredictor, args) -> Job:
    if not args.questions:
        raise DataError("--context needs --questions (the questions to predict)", "add --questions new.jsonl")
    ctx, qs = read_context_file(args.context), read_questions_file(args.questions)
    ctx_x, ctx_y = pred.embed_context(ctx)
    return Job(f"the group in {args.context}", ctx_x, ctx_y, qs, pred.embedder.embed(qs), [None] * len(qs))


def group_split(pred: GroupPredictor, name: str):
    """(client, context questions, target group, target questions) of a group of the run's dataset, as
    the run's evaluation chose them at the checkpoint's round."""
    data = pred.run_data
    if pred.info.get("source") == "pretrained":
        raise DataError(f"--group needs a run folder; {pred.info.get('path')} is an exported predictor without its "
                        "data", "pass the run folder it was exported from, or give the context with --context")
    if data is None:
        raise DataError("--group needs the run's dataset, which was not found",
                        "pass it with --data_path (see the run's config.json for what it was trained on)")
    config = pred.info["config"]
    roles = {g: "eval" for g in config.get("eval_groups", [])} | {g: "train" for g in config.get("train_groups", [])}
    if name not in roles:
        close = difflib.get_close_matches(name, roles, n=1)
        raise DataError(f"--group {name!r} is not a group of run {pred.info.get('run_dir')}"
                        + (f"; did you mean {close[0]!r}?" if close else ""), f"available: {', '.join(sorted(roles))}")
    client = data.client(name, roles[name])
    return (client, *client.eval_questions(int(pred.info.get("round") or 0)))


def group_context(pred: GroupPredictor, name: str) -> list[Answer]:
    """The group's evaluation context as answers, for the API or GroupReward."""
    return group_evaluation(pred, name)[0]


def group_evaluation(pred: GroupPredictor, name: str) -> tuple[list[Answer], list[Question]]:
    """The group's evaluation context as answers, and the questions the run scored for it."""
    client, ctx_q, tgt, tgt_q = group_split(pred, name)
    bank = pred.run_data.raw.bank
    return ([Answer(q, y.double().numpy()) for q, _, y in _items(bank, client.local, ctx_q)],
            [q for q, _, _ in _items(bank, tgt, tgt_q)])


def group_job(pred: GroupPredictor, args, log) -> Job:
    client, ctx_q, tgt, tgt_q = group_split(pred, args.group)
    bank, who = pred.run_data.raw.bank, f"group {args.group!r}"
    ctx = _items(bank, client.local, ctx_q)
    ctx_x, ctx_y = [x for _, x, _ in ctx], [y for _, _, y in ctx]
    if args.questions:
        qs = read_questions_file(args.questions)
        answered: dict = {}  # a question's first answer wins, the target group's before the local
        for q, _, y in _items(bank, tgt) + _items(bank, client.local):
            answered.setdefault(q.key, y.double().numpy())
        return Job(who, ctx_x, ctx_y, qs, pred.embedder.embed(qs), [answered.get(q.key) for q in qs])
    targets = _items(bank, tgt, tgt_q)
    log(f"group {args.group!r} ({client.role} group): {len(ctx_q)} context questions, "
        f"{len(targets)} scored questions, as in the run's evaluation")
    return Job(who, ctx_x, ctx_y, [q for q, _, _ in targets], [x for _, x, _ in targets],
               [y.double().numpy() for _, _, y in targets])


def _items(bank, group: GroupData, q_idx: torch.Tensor | None = None) -> list[tuple]:
    """(question, option vectors, distribution) of questions `q_idx` (default all) of a group, in that order."""
    sub = group if q_idx is None else group.subset(q_idx)
    sizes = sub.sizes.tolist()
    return list(zip([_bank_question(bank, k) for k in sub.qkeys.tolist()], sub.x.split(sizes), sub.y.split(sizes)))


def _bank_question(bank, qkey: int) -> Question:
    row = bank.row(qkey)
    ords = tuple(bank.ordinals[row]) if bank.ordinals is not None else None
    return Question(bank.questions[row], tuple(bank.options[row]), ords, qkey)


def run(args, log) -> dict:
    pred = GroupPredictor.load(args.run, args.checkpoint, data_path=args.data_path, cache_dir=args.cache_dir,
                               emb_model=args.emb_model, device=args.device,
                               use_run_data=True if args.group else "auto", log=log)
    job = group_job(pred, args, log) if args.group else context_job(pred, args)
    preds = pred.predict_embedded(job.ctx_x, job.ctx_y, job.tgt_x, batch_size=args.batch_size,
                                  progress=None if not args.quiet else False)
    known = [i for i, t in enumerate(job.truth) if t is not None]
    dist = pred.score([preds[i] for i in known], [job.truth[i] for i in known], [job.questions[i] for i in known])
    rows = [({} if q.id is None else {"id": q.id}) | {"question": q.text, "options": list(q.options),
                                                     "prediction": p.tolist()} for q, p in zip(job.questions, preds)]
    mark_training_questions(pred, job.questions, rows, log)
    for i, d in zip(known, dist.tolist()):
        rows[i].update(truth=job.truth[i].tolist(), distance=d)
        ords = needed_ordinals(pred.metric, lambda: list(pred.embedder.ordinals(job.questions[i])))
        if ords is not None:  # the ordinals the distance used
            rows[i]["ordinals"] = ords
    _write(args.out, rows)
    log(f"predicted {len(rows)} question(s) for {job.who} from {len(job.ctx_x)} context answer(s)"
        + ("" if args.out == "-" else f" -> {args.out}"))
    summary = {"questions": len(rows), "context": len(job.ctx_x)}
    if known:
        summary["alignment"] = 1.0 - float(np.mean(dist))
        log(f"alignment (1 - mean {pred.metric} distance) over the {len(known)} question(s) the group answered: "
            f"{summary['alignment']:.4f}")
    return summary


def mark_training_questions(pred: GroupPredictor, questions: list[Question], rows: list[dict], log) -> None:
    """`in_training`: whether some training group trained on the question's text (a prediction may then
    be recall, not in-context inference); null without the run's data."""
    texts = None if pred.run_data is None else pred.run_data.training_texts(pred.info["config"])
    for q, row in zip(questions, rows):
        row["in_training"] = None if texts is None else q.text in texts
    log("in_training: unknown (the run's data is not loaded), written as null" if texts is None else
        f"{sum(1 for r in rows if r['in_training'])} of {len(rows)} question(s) were training questions of some "
        "training group (in_training)")


def _write(out: str, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out == "-":
        sys.stdout.write(text)
        return
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write --out {out}: {exc.strerror}", "choose another --out") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # progress and notes go to stderr when predictions go to stdout
    log = (lambda *a: None) if args.quiet else ((lambda m: print(m, file=sys.stderr)) if args.out == "-" else print)
    t0 = time.perf_counter()

    def predict() -> None:
        run(args, log)
        log(f"done in {time.perf_counter() - t0:.1f} s")
    return exit_on_error(predict)


if __name__ == "__main__":
    sys.exit(main())
