"""Use a trained group-preference predictor: load a run, predict a group's answers, score LLM answers.

    from inference import GroupPredictor, GroupReward
    p = GroupPredictor.from_run("runs/opinionqa_fedavg_50")
    p.predict(context=[(question, options, distribution), ...], questions=[(question, options), ...])

CLIs: `python -m inference.predict` and `python -m inference.export`; docs/inference.md.
"""
from .items import Answer, Question, parse_choice
from .predictor import GroupPredictor
from .reward import GroupReward

__all__ = ["Answer", "GroupPredictor", "GroupReward", "Question", "parse_choice"]
