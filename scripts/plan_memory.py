"""Per-rank GPU memory of a training config before renting GPUs:
`python scripts/plan_memory.py --config CFG --gpus N --gpu_memory_gb M [key=value ...]`.
The model and what it leaves out: reward_forcing/training/memory_plan.py."""
from reward_forcing.errors import run_cli
from reward_forcing.training.memory_plan import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
