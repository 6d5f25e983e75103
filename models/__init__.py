"""Models: GPO, the in-context group-preference predictor (method.md §3)."""
from .gpo import GPO, Episode, GPOConfig

__all__ = ["GPO", "GPOConfig", "Episode"]
