#!/usr/bin/env python
"""Reproduce the paper's tables and figures over seeds (see reporting/pipeline.py).

  python scripts/reproduce.py --dataset opinionqa --data_path ../shared/data/opinionqa \
      --emb_model minilm --seeds 0 1 2 3 --comm_round 300 --central_epochs 300
  python scripts/reproduce.py --report_only --runs 'runs/reproduce/opinionqa/*' --name opinionqa
  python scripts/reproduce.py --preset smoke
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reporting.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
