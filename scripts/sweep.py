#!/usr/bin/env python
"""Train FedAvg variants (aggregation strategies, attacks, DP noise levels) over seeds, then compare
them with a baseline variant (reporting/compare.py).

  python scripts/sweep.py --preset strategies        # docs/results/strategies.md
  python scripts/sweep.py --preset privacy           # docs/results/privacy.md
  python scripts/sweep.py --preset strategies --report_only

One run folder per (variant, seed): <out_root>/<variant>_s<seed>. A finished folder is reused, an
interrupted one resumed (its flags must match: the training code's --resume checks them), so the
same command picks up where a stopped sweep left off.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reporting.sweep import main

if __name__ == "__main__":
    sys.exit(main())
