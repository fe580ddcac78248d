"""Every real-size GPU figure of the fast path in one run (reward_forcing/benchmarks/gpu_fast_path.py).

    python scripts/gpu_fast_path.py --out gpu_results [--upstream_repo ../Reward-Forcing]
"""
from reward_forcing.benchmarks.gpu_fast_path import main

if __name__ == "__main__":
    main()
