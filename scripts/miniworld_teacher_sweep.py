"""What limits the miniature world's teacher: train and measure variants (reward_forcing/miniworld/teacher_sweep.py).

    python scripts/miniworld_teacher_sweep.py --output_dir runs/teacher_sweep --variant NAME \
        [--settings dit.dim=128 ...] [--train lr_generator=2e-3 ...] [--evals 1000,2000,3000] [--sdedit 0.4,0.8]
"""
import sys

from reward_forcing.errors import run_cli
from reward_forcing.miniworld.teacher_sweep import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
