#!/usr/bin/env python
"""Reproduce the paper's tables and figures over seeds (see reporting/reproduce.py).

  python scripts/reproduce.py --preset paper                      # OpinionQA, 1,300 rounds, 3 methods
  python scripts/reproduce.py --preset paper --dataset globalqa \
      --min_ctx_num_qs 5 --min_tar_num_qs 6 --eval_num_qs 9       # the GlobalOpinionQA sample
  python scripts/reproduce.py --preset paper --methods fedavg centralized --seeds 0 1 \
      --loss_reduction slot_mean --layer_init clones --episode_bounds code --name opinionqa_paper_code
  python scripts/reproduce.py --report_only --runs 'runs/reproduce/opinionqa_paper/*' --name opinionqa_paper
  python scripts/reproduce.py --preset smoke                      # the whole pipeline in minutes
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reporting.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
