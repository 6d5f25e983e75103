"""The centralized baseline: the same GPO model trained on the training groups' pooled data.

    python main_centralized.py --dataset globalqa   # see README
"""
import sys

from orchestration.entry import main

if __name__ == "__main__":
    sys.exit(main("centralized"))
