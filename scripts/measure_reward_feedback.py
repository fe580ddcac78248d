"""Held-out reward before and after reward-feedback fine-tuning (reward_forcing/benchmarks/reward_feedback.py).
"""
import sys

from reward_forcing.benchmarks.reward_feedback import main
from reward_forcing.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
