"""GroupPredictor: a trained GPO that predicts how a group answers, from a few of its answers (docs/inference.md).

Prediction is the run's own evaluation: context and targets form one group scored in one forward pass (targets
attend only to the context), so a run's evaluation group, given its evaluation context, gets exactly the
per-question distances the run logged.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data_loaders.episodes import collate
from data_loaders.schema import DataError, GroupData
from models.gpo import GPO
from utils.distances import DEFAULT_METRIC, needed_ordinals, score_questions
from utils.run_folder import CONFIG, read_json, read_summary

from .embedding import Log, TextEmbedder, quiet
from .items import Answer, Question, to_answers, to_llm_answers, to_questions
from .loading import REEXPORT, RunData, build_model, embedding_of, gpo_config, load_run_data, read_run, text_embedder
from .pretrained import FORMAT, export_config, load_pretrained, push_to_hub, save_pretrained


class GroupPredictor:
    """A GPO plus the embedding model and metric of the run it came from."""

    def __init__(self, model: GPO, metric: str, embedder: TextEmbedder, info: dict | None = None,
                 run_data: RunData | None = None):
        self.model, self.metric, self.embedder = model.eval(), metric, embedder
        self.info = info or {}          # provenance: run folder, checkpoint, dataset, groups, summary
        self.run_data = run_data        # the run's dataset, when it was found on disk

    # ------------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "final", *, data_path: str | None = None,
                 cache_dir: str | None = None, emb_model: str | None = None, device: str = "cpu",
                 use_run_data: bool | str = "auto", log: Log | None = print) -> "GroupPredictor":
        """Load a run folder's config, the weights of `checkpoint` and its embedding model. use_run_data:
        "auto" adopts the run's data (its questions get the run's exact vectors) when it is on disk,
        True requires it, False skips it."""
        log = log or quiet
        run_dir = Path(run_dir)
        config, weights, meta = read_run(run_dir, checkpoint)
        where = f"run {run_dir}"
        model = build_model(gpo_config(config, where), weights, where, device)
        emb = embedding_of(config, model.config.dim_x, where)
        embedder = text_embedder(emb, config, model.config.dim_x, emb_model, where, cache_dir, log)
        summary = read_summary(run_dir, "run summary", REEXPORT)
        info = {"source": "run", "run_dir": str(run_dir), "checkpoint": checkpoint, "round": meta.get("round"),
                "config": config, "embedding": emb,
                "export": export_config(config, summary, checkpoint, meta.get("round"))}
        run_data = None
        if use_run_data:
            log(f"reading the run's {config.get('dataset')} data, to give its questions the run's own vectors")
            try:
                run_data = load_run_data(config, data_path=data_path, cache_dir=cache_dir,
                                         emb_model=embedder.emb_model, log=quiet)
            except DataError as exc:
                if use_run_data is True:
                    raise
                log(f"note: the run's data is not available ({str(exc).splitlines()[0]}); every text is embedded "
                    "anew (its questions then match the run's vectors to float rounding, not bit for bit)")
        if run_data is not None:
            embedder.remember(run_data.raw.bank, run_data.emb)
        log(f"loaded {run_dir} (checkpoint {checkpoint}, round {meta.get('round')}): metric {config.get('metric')}, "
            f"embeddings {embedder.emb_model} ({model.config.dim_x} dims)")
        return cls(model, config.get("metric", DEFAULT_METRIC), embedder, info, run_data)

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "final", **kwargs: Any) -> "GroupPredictor":
        """A run folder (from_run) or an exported folder (from_pretrained), whichever `path` is."""
        config = Path(path) / CONFIG
        if config.is_file() and read_json(config, "config", REEXPORT).get("format") == FORMAT:
            kwargs = {k: v for k, v in kwargs.items() if k in ("cache_dir", "emb_model", "device", "log")}
            return cls.from_pretrained(path, **kwargs)
        return cls.from_run(path, checkpoint, **kwargs)

    from_pretrained = classmethod(load_pretrained)  # the Hugging Face-style folder: inference/pretrained.py
    save_pretrained = save_pretrained

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """save_pretrained into a temporary folder and upload it (inference.pretrained.push_to_hub)."""
        with tempfile.TemporaryDirectory() as tmp:
            return push_to_hub(save_pretrained(self, tmp), repo_id, **kwargs)

    # ------------------------------------------------------------------------ prediction
    def predict(self, context: Sequence, questions: Sequence, *, batch_size: int = 0,
                progress: bool | None = False) -> list[np.ndarray]:
        """One predicted distribution per question, given the group's (question, options, distribution)
        answers in `context` (items may also be dicts: docs/inference.md)."""
        ctx, tgt = to_answers(context), to_questions(questions)
        return self.predict_embedded(*self.embed_context(ctx), self.embedder.embed(tgt),
                                     batch_size=batch_size, progress=progress)

    def distances(self, context: Sequence, answers: Sequence, what: str = "answer") -> np.ndarray:
        """Per-question distance (the run's metric) between each answer's distribution and the prediction."""
        ctx, ans = to_answers(context), to_llm_answers(answers, what)
        qs = [a.question for a in ans]
        pred = self.predict_embedded(*self.embed_context(ctx), self.embedder.embed(qs))
        return self.score(pred, [a.distribution for a in ans], qs)

    def reward(self, items: Sequence, context: Sequence) -> list[float]:
        """1 - distance between each item's answer (a distribution, or an option by index, letter
        or text) and the group's predicted distribution, with the run's metric."""
        return [1.0 - float(d) for d in self.distances(context, items, "item")]

    def score(self, pred: Sequence[np.ndarray], true: Sequence[np.ndarray], questions: Sequence[Question]
              ) -> np.ndarray:
        """Per-question distances with the run's metric (ordinals: see TextEmbedder.ordinals)."""
        if not questions:
            return np.zeros(0)
        offsets = _offsets([len(q.options) for q in questions])
        cat = lambda arrays: torch.from_numpy(np.concatenate([np.asarray(a, np.float64) for a in arrays]))  # noqa: E731
        ords = needed_ordinals(self.metric, lambda: torch.tensor(
            [o for q in questions for o in self.embedder.ordinals(q)], dtype=torch.float64))
        return score_questions(cat(pred), cat(true), offsets, metric=self.metric, ordinals=ords).numpy()

    def embed_context(self, ctx: list[Answer]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if not ctx:
            raise DataError("the context is empty", "give at least one (question, options, distribution) "
                            "the group answered")
        xs = self.embedder.embed([a.question for a in ctx])
        # float32 as the training data holds them: a float32 distribution passes through unchanged
        return xs, [torch.from_numpy(a.distribution).float() for a in ctx]

    @torch.no_grad()
    def predict_embedded(self, ctx_x: list[torch.Tensor], ctx_y: list[torch.Tensor], tgt_x: list[torch.Tensor],
                         *, batch_size: int = 0, progress: bool | None = False) -> list[np.ndarray]:
        """Predictions from option vectors: one [k_i, D] tensor per question, context with its y."""
        if not tgt_x:
            return []
        group = _as_group(ctx_x, ctx_y, tgt_x, next(self.model.parameters()).device)
        projected = replace(group, x=self.model.project(group.x))
        nc, nt = len(ctx_x), len(tgt_x)
        ctx_q = torch.arange(nc)
        step = batch_size if 0 < batch_size < nt else nt
        out: list[torch.Tensor] = []
        from tqdm.auto import tqdm
        # progress None: a bar on a terminal only (tqdm's rule), and only with several passes
        quiet = True if progress is False or nt <= step else (None if progress is None else False)
        for start in tqdm(range(0, nt, step), desc="predicting", unit="batch", disable=quiet):
            tgt_q = torch.arange(nc + start, nc + min(start + step, nt))
            ep = replace(collate([projected], [ctx_q], [tgt_q]), projected=True)
            out.append(self.model.predict(ep)[0][ep.tgt_mask[0]].float().cpu())
        sizes = [t.shape[0] for t in tgt_x]
        return [p.double().numpy() for p in torch.split(torch.cat(out), sizes)]


def _as_group(ctx_x, ctx_y, tgt_x, device) -> GroupData:
    """Context then targets as one GroupData (targets' y are zeros: the model never reads them)."""
    xs = list(ctx_x) + list(tgt_x)
    y = torch.cat(list(ctx_y) + [torch.zeros(x.shape[0]) for x in tgt_x])
    return GroupData("context", torch.cat(xs).float(), y.float(), _offsets([x.shape[0] for x in xs]),
                     torch.arange(len(xs))).to(device)


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)])
