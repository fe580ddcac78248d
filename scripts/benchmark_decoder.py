"""Decoder speed: the Wan VAE against TAEHV (reward_forcing/benchmarks/decoder.py).
"""
import sys

from reward_forcing.benchmarks.decoder import main
from reward_forcing.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
