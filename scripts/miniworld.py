"""Miniature world: Reward Forcing's claims measured end to end on CPU (reward_forcing/miniworld/run.py).

    python scripts/miniworld.py --output_dir runs/miniworld [--quick] [--stages data,teacher,...] [--jobs 2]
"""
import sys

from reward_forcing.errors import run_cli
from reward_forcing.miniworld.run import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
