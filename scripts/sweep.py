#!/usr/bin/env python
"""Train FedAvg variants over seeds and compare them with a baseline (reporting/sweep.py; README)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reporting.sweep import main

if __name__ == "__main__":
    sys.exit(main())
