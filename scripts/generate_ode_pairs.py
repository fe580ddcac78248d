"""Generate ODE pairs for the student's ODE-regression initialisation (reward_forcing/training/ode_pairs.py).

    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --config_path configs/ode_init.yaml \
        --data_path prompts.txt --output_dir ode_pairs [key=value ...]
"""
import sys

from reward_forcing.errors import run_cli
from reward_forcing.training.ode_pairs import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
