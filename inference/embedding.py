"""Option vectors for new questions, made exactly as the run made its own.

An option's text is the run's prompt of its question followed by the option. Texts the run embedded
take the run's own vectors (embedded again, in another batch, they differ in the last bits); others
go through `get_embeddings` and its cache.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import numpy as np
import torch

from data_loaders.embeddings import PROBE_TOLERANCE, get_embeddings, probe_distance
from data_loaders.prompts import option_texts
from data_loaders.schema import DataError, LoadReport, QuestionBank, RawDataset

from .items import Question

Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def bank_of(questions: Sequence[Question]) -> QuestionBank:
    return QuestionBank(np.arange(len(questions)), [q.text for q in questions], [list(q.options) for q in questions])


class TextEmbedder:
    """Vectors for questions' options with the run's embedding model (an --emb_model value, or
    "synthetic": no texts) and prompt style; `options` go to get_embeddings (cache_dir, device, dtype...)."""

    def __init__(self, emb_model: str, style: str, dim: int, *, probe: dict | None = None, log: Log | None = print,
                 **options):
        self.emb_model, self.style, self.dim, self.options = emb_model, style, dim, options
        self.probe = probe  # the run's vector of one of its texts (config.json data.embedding.probe)
        self.log = log or quiet
        self.known: dict[str, torch.Tensor] = {}            # option text -> vector
        self.known_ordinals: dict[tuple, tuple[float, ...]] = {}  # (question, options) -> ordinals

    def remember(self, bank: QuestionBank, emb: torch.Tensor) -> None:
        """Adopt the vectors of a dataset the run was trained on (first occurrence of a text wins)."""
        if emb.shape[1] != self.dim:
            raise DataError(f"the run's data gives {emb.shape[1]}-dim vectors but its model takes {self.dim}",
                            "the data or cache is not the run's; pass the run's --data_path / --cache_dir")
        for text, row in zip(option_texts(bank, self.style), emb):
            self.known.setdefault(text, row)
        self._check_probe(compute=False)  # the run's data may have been embedded by an override model
        if bank.ordinals is not None:
            for text, options, ords in zip(bank.questions, bank.options, bank.ordinals):
                self.known_ordinals.setdefault((text, tuple(options)), tuple(float(o) for o in ords))

    def texts(self, q: Question) -> list[str]:
        return option_texts(bank_of([q]), self.style)

    def embed(self, questions: Sequence[Question]) -> list[torch.Tensor]:
        """One [k, dim] tensor per question, in order."""
        texts = [self.texts(q) for q in questions]
        missing = {q.key: q for q, ts in zip(questions, texts) if any(t not in self.known for t in ts)}
        if missing:
            self._check_probe(compute=True)
            self._compute(list(missing.values()))
        return [torch.stack([self.known[t] for t in ts]) for ts in texts]

    def _compute(self, questions: list[Question]) -> None:
        if self.emb_model == "synthetic":
            raise DataError(f"question {questions[0].text[:60]!r} is not in the run's synthetic data, and a run "
                            "trained on synthetic vectors cannot embed text",
                            "use the synthetic bank's questions ('synthetic question N'), or a run on real data")
        bank = bank_of(questions)
        digest = hashlib.sha256(json.dumps([bank.questions, bank.options, self.style]).encode()).hexdigest()
        raw = RawDataset("inference", bank, {}, LoadReport("new questions", len(questions)), digest)
        self.log(f"embedding {bank.num_points} option texts of {len(questions)} new question(s)")
        emb, info = get_embeddings(raw, self.emb_model, **self.options, log=self.log)
        if emb.shape[1] != self.dim:
            raise DataError(f"embedding model {info.get('model_id', self.emb_model)} gives {emb.shape[1]}-dim "
                            f"vectors, but the run's model takes {self.dim}",
                            "use the embedding model the run was trained with (its config.json, data.embedding)")
        self.known.update(zip(option_texts(bank, self.style), emb))

    def _check_probe(self, compute: bool) -> None:
        """Refuse, once, a model that does not embed the run's probe text as the run did (a name cannot
        tell: a hub id and a folder may be the same model)."""
        if self.probe is None:
            return
        q = Question(self.probe["question"], tuple(self.probe["options"]))
        text = self.texts(q)[0]
        if text not in self.known:
            if not compute:
                return
            self._compute([q])
        distance = probe_distance(self.probe, self.known[text])
        if distance > PROBE_TOLERANCE:
            raise DataError(f"embedding model {self.emb_model!r} does not embed like the run's model: its vector "
                            f"of the run's probe text ({q.text[:40]!r}...) is {distance:.3g} away (relative), "
                            f"over {PROBE_TOLERANCE:g}; predictions would be made on other vectors",
                            "drop --emb_model, or pass the model the run was trained with "
                            "(config.json data.embedding.model_id)")
        self.probe = None  # checked: this model is the run's

    def ordinals(self, q: Question) -> tuple[float, ...]:
        """The question's own ordinals, else the run's data's, else 1..k in option order."""
        if q.ordinals is not None:
            return q.ordinals
        return self.known_ordinals.get(q.key) or tuple(float(i) for i in range(1, len(q.options) + 1))
