"""Write a tiny random `checkpoint_dir` in the released layout, for tests and the CPU demo.

    python scripts/make_tiny_checkpoints.py --output_dir checkpoints/tiny [--seed 0]
    python inference.py --config_path configs/tiny.yaml ...   # configs/tiny.yaml points at checkpoints/tiny
"""
import argparse
import sys
from pathlib import Path

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to fill (the tiny checkpoint_dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random weights")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"),
                        help="config giving the T5, VAE and folder names (default: configs/tiny.yaml)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} exists and is not a folder")
    cfg = load_config(args.config)

    from reward_forcing.testing.assets import write_tiny_checkpoint_dir

    paths = write_tiny_checkpoint_dir(out, cfg, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:12s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
