"""ImageReward's torch preprocessing against the released PIL transform
(reward_forcing/benchmarks/imagereward_preprocessing.py).

    python scripts/compare_imagereward_preprocessing.py IMAGES...
"""
import sys

from reward_forcing.benchmarks.imagereward_preprocessing import main
from reward_forcing.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
