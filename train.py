"""Train the streaming student: `[torchrun ...] train.py --config_path CFG --logdir DIR [key=value ...]`
(reward_forcing/training/cli.py)."""
import sys

from reward_forcing.errors import run_cli
from reward_forcing.training.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
