"""The streaming server's latency as a client sees it (reward_forcing/benchmarks/serve.py).

    python scripts/benchmark_serve.py --tiny
"""
import sys

from reward_forcing.benchmarks.serve import main
from reward_forcing.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
