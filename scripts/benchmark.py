"""Streaming speed: DiT-only and end-to-end FPS, time to first frame, chunk latency, memory, compile and overlap
(reward_forcing/benchmarks/streaming.py; `--help` for every option).

    python scripts/benchmark.py                                        # small model, 12 chunks: about a minute on a CPU
    python scripts/benchmark.py --compile --compare --json out.json
"""
from reward_forcing.benchmarks.streaming import main

if __name__ == "__main__":
    main()
