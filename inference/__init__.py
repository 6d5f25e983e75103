"""Use a trained group-preference predictor: load a run, predict a group's answers, score LLM answers
(docs/inference.md; CLIs `python -m inference.predict` and `python -m inference.export`)."""
from .items import Answer, Question, parse_choice
from .predictor import GroupPredictor
from .reward import GroupReward

__all__ = ["Answer", "GroupPredictor", "GroupReward", "Question", "parse_choice"]
