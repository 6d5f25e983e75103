"""PluralLLM: train the GPO group-preference model with FedAvg (one client per group).

    python main_fl.py --dataset globalqa            # paper protocol, see README
    python main_fl.py --help                        # every flag with its default
"""
import sys

from orchestration.entry import main

if __name__ == "__main__":
    sys.exit(main("fedavg"))
