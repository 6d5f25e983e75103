#!/usr/bin/env python
"""Reproduce the paper's tables and figures over seeds (reporting/reproduce.py; README)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reporting.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
