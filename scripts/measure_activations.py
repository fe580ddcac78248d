"""Activation memory per rank, measured on CPU with saved-tensor hooks, alone and under 2-rank sequence parallelism,
beside what the memory plan computes for the same runs (reward_forcing/training/memory_plan.py):

    python scripts/measure_activations.py [--workdir DIR] [key=value ...]

Tiny random models in the released layouts (configs/tiny_train.yaml, 256 x 128 pixels: 16 x 8 tokens per frame) run
the distillation trainer's rollout and critic forward (reward_forcing/testing/memory_worker.py) on 1 rank and on
2 ranks with sequence_parallel 2 (one sample, its tokens split); prints rank 0's peaks and their ratio.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from reward_forcing.config import load_config
from reward_forcing.testing.assets import write_tiny_checkpoint_dir
from reward_forcing.testing.memory_worker import CONFIG, settings
from reward_forcing.training.memory_plan import plan, trainer_dits

SIZE = ("height=256", "width=128")
PROMPTS = "a cat walks on grass\na red car at night\nwaves on a beach\n"


def measure(assets: Path, out: Path, ranks: int, overrides) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = launcher + ["-m", "reward_forcing.testing.memory_worker", str(assets), str(out), *overrides]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    return torch.load(out / "memory.pt", weights_only=True)["activations"]


def computed(assets: Path, ranks: int, overrides, checkpoint: bool) -> dict:
    cfg = settings(assets, (*overrides, f"gradient_checkpointing={str(checkpoint).lower()}"))
    moments = plan(cfg, trainer_dits(cfg), ranks, 80, device="cpu").moments

    def row(moment, start):
        return next(value for label, value in moments[moment] if label.startswith(start))

    rollout = "one chunk's exit-step forward recomputed" if checkpoint else "rollout activations (no checkpointing)"
    return {"rollout": row("generator: backward", rollout), "critic": row("critic: backward", "critic forward")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the tiny assets and results go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for both runs")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="measure_activations_"))
    assets = root / "assets"
    if not (assets / "prompts.txt").is_file():
        write_tiny_checkpoint_dir(assets, load_config(CONFIG), seed=1)
        (assets / "prompts.txt").write_text(PROMPTS)
    overrides = [*SIZE, *args.overrides]
    runs = {"1 rank": (1, [*overrides, "sequence_parallel=1"]),
            "2 ranks, sequence_parallel 2": (2, [*overrides, "sequence_parallel=2"])}
    found = {name: measure(assets, root / name.replace(" ", "_").replace(",", ""), ranks, extra)
             for name, (ranks, extra) in runs.items()}
    alone, split = found.values()
    print(f"saved-tensor peaks per rank, MB (measured on CPU, fp32; computed by the plan in brackets); {root}")
    for checkpoint in alone:
        for name in alone[checkpoint]:
            plans = [computed(assets, ranks, extra, checkpoint == "checkpointed")[name]
                     for ranks, extra in runs.values()]
            print(f"  {name:8} {checkpoint:17} 1 rank {alone[checkpoint][name] / 1e6:7.2f} [{plans[0] / 1e6:6.2f}]   "
                  f"2-rank SP {split[checkpoint][name] / 1e6:7.2f} [{plans[1] / 1e6:6.2f}]   "
                  f"ratio {split[checkpoint][name] / alone[checkpoint][name]:.3f}")


if __name__ == "__main__":
    main()
