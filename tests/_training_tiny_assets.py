"""Tiny random checkpoints for the training end-to-end tests: the assets helper's complete tiny
checkpoint_dir (scripts/make_tiny_checkpoints.py) sized by configs/tiny_train.yaml, plus a prompt file."""
from pathlib import Path

from reward_forcing.config import load_config
from reward_forcing.tiny_assets import write_tiny_checkpoint_dir

ROOT = Path(__file__).parents[1]


def write_tiny_training_assets(root) -> Path:
    root = Path(root)
    write_tiny_checkpoint_dir(root, load_config(ROOT / "configs" / "tiny_train.yaml"), seed=1)
    (root / "prompts.txt").write_text("a cat walks on grass\na red car at night\nwaves on a beach\n"
                                      "a dog plays in snow\nclouds over mountains\n")
    return root
