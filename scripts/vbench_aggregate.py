"""Aggregate VBench `*_eval_results.json` files into the Total / Quality / Semantic scores (reward_forcing/vbench.py).

    python scripts/vbench_aggregate.py RESULTS [RESULTS ...] [--json OUT]
"""
import sys

from reward_forcing.errors import run_cli
from reward_forcing.vbench import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
