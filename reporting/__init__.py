"""Run batches of experiments (scripts/reproduce.py, scripts/sweep.py) and report on them; README, Design."""
