"""A group reward for RL fine-tuning, callable as TRL's `reward_funcs` take it (docs/inference.md).

Mode "distribution" (default) scores the share of a prompt's completions choosing each option against the
group's predicted distribution; credit "leave_one_out" (default) gives each completion that score minus the
score without it, since GRPO and RLOO learn nothing from equal rewards within a prompt. Mode "option" scores
each completion's one-hot alone: its optimum is one answer for everyone, not the group's proportions.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from data_loaders.schema import DataError

from .items import Answer, Question, parse_choice, to_answers, to_questions
from .predictor import GroupPredictor

MODES = ("distribution", "option")  # the first is the default (issue 22: option mode undoes pluralism)
CREDITS = ("leave_one_out", "shared")


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a string, or for chat data a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise DataError(f"completion of type {type(completion).__name__} is neither text nor a list of messages",
                    "pass strings, or chat messages [{'role': 'assistant', 'content': ...}]")


class GroupReward:
    def __init__(self, predictor: GroupPredictor, context: Sequence, *, mode: str = "distribution",
                 credit: str = "leave_one_out", questions: Mapping[str, Any] | None = None,
                 question_key: str = "question", options_key: str = "options", unmatched_reward: float = 0.0,
                 name: str = "group_reward"):
        if mode not in MODES:
            raise DataError(f"mode {mode!r} is not one of {MODES}", "use 'distribution' (the default) or 'option'")
        if credit not in CREDITS:
            raise DataError(f"credit {credit!r} is not one of {CREDITS}", "use 'leave_one_out' or 'shared'")
        self.predictor, self.mode, self.credit = predictor, mode, credit
        self.context: list[Answer] = to_answers(context)
        self.questions = {str(k): to_questions([v], "prompt's question")[0] for k, v in (questions or {}).items()}
        self.question_key, self.options_key = question_key, options_key
        self.unmatched_reward = float(unmatched_reward)
        self.__name__ = name  # TRL logs each reward function under its __name__
        self._predicted: dict[tuple, np.ndarray] = {}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        qs = [self._question(i, p, kwargs) for i, p in enumerate(prompts)]
        if len(completions) != len(qs):
            raise DataError(f"{len(completions)} completions for {len(qs)} prompts", "pass one prompt per completion")
        choices = [parse_choice(completion_text(c), q.options) for c, q in zip(completions, qs)]
        self._predict_missing(qs)
        if self.mode == "option":
            return self._option_rewards(qs, choices)
        return self._distribution_rewards([_prompt_key(p) for p in prompts], qs, choices)

    # ------------------------------------------------------------------------ questions
    def _question(self, i: int, prompt: Any, columns: Mapping[str, Any]) -> Question:
        key = _prompt_key(prompt)
        if key in self.questions:
            return self.questions[key]
        if self.question_key in columns and self.options_key in columns:
            return to_questions([(columns[self.question_key][i], columns[self.options_key][i])],
                                f"row {i}'s question")[0]
        raise DataError(f"no question for prompt {i} ({key[:60]!r}): the dataset has no {self.question_key!r} "
                        f"and {self.options_key!r} columns and the prompt is not in `questions`",
                        f"add {self.question_key!r} and {self.options_key!r} columns to the training dataset, "
                        "or pass questions={prompt: (question, options)}")

    def _predict_missing(self, qs: list[Question]) -> None:
        """Predict each new question once, all in one pass; the context never changes."""
        new = list({q.key: q for q in qs if q.key not in self._predicted}.values())
        if new:
            self._predicted.update(zip((q.key for q in new), self.predictor.predict(self.context, new)))

    # ------------------------------------------------------------------------ scores
    def _scores(self, qs: list[Question], dists: list[np.ndarray]) -> np.ndarray:
        return 1.0 - self.predictor.score([self._predicted[q.key] for q in qs], dists, qs)

    def _option_rewards(self, qs: list[Question], choices: list[int | None]) -> list[float]:
        matched = [i for i, c in enumerate(choices) if c is not None]
        out = np.full(len(qs), self.unmatched_reward)
        if matched:
            onehots = [np.eye(len(qs[i].options))[choices[i]] for i in matched]
            out[matched] = self._scores([qs[i] for i in matched], onehots)
        return out.tolist()

    def _distribution_rewards(self, keys: list[str], qs: list[Question], choices: list[int | None]) -> list[float]:
        out = np.full(len(qs), self.unmatched_reward)
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(choices):
            if c is not None:
                by_prompt[keys[i]].append(i)
        for members in by_prompt.values():
            q = qs[members[0]]
            counts = np.bincount([choices[i] for i in members], minlength=len(q.options)).astype(np.float64)
            whole = float(self._scores([q], [counts / counts.sum()])[0])
            if self.credit == "shared":
                out[members] = whole
                continue
            for i in members:
                rest = counts.copy()
                rest[choices[i]] -= 1
                without = float(self._scores([q], [rest / rest.sum()])[0]) if rest.sum() else 0.0
                out[i] = whole - without
        return out.tolist()


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)
