"""Stream text-to-video from a prompt file (upstream-compatible flags). See README for examples.

    python inference.py --config_path configs/reward_forcing.yaml \
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt --use_ema \
        --data_path prompts/MovieGenVideoBench_extended.txt --output_folder videos/rf --num_output_frames 21
"""
import sys

from reward_forcing.errors import run_cli
from reward_forcing.inference.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
