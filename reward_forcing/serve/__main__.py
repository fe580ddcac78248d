import sys

from reward_forcing.errors import run_cli
from reward_forcing.serve.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
