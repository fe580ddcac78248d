"""How much memory the streaming server holds for a client that never reads, at a large frame size
(reward_forcing/benchmarks/serve_memory.py).

    python scripts/serve_slow_reader_memory.py --noise                  # 480x832 (the packaged defaults' size)
    python scripts/serve_slow_reader_memory.py --tiny height=480 width=832 decoder=taehv
"""
import sys

from reward_forcing.benchmarks.serve_memory import main
from reward_forcing.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
