"""Generate ODE pairs for the student's ODE-regression initialisation (CausVid, arXiv 2412.07772 §4.3).

    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --config_path configs/ode_init.yaml \
        --data_path prompts.txt --output_dir ode_pairs [key=value ...]

Each prompt line becomes one pair: the bidirectional teacher (`ode_teacher_name`) integrates the
guided flow ODE from pure noise with `ode_num_steps` Euler steps (shift `ode_shift`, CFG
`ode_guidance_scale` against `negative_prompt`), and the states at `ode_keep_indices` are stored,
noisiest first. Output format: reward_forcing/training/ode_data.py. Prompts are grouped into shards
of `ode_shard_size` dealt round-robin over the ranks, none dropped; a shard is written as soon as it
is complete, and rerunning the same command skips the shards already on disk. Pair i's noise
depends only on (seed, i), so the result does not depend on the number of ranks.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reward_forcing.checkpoints import asset_path, load_into, load_wan_folder  # noqa: E402
from reward_forcing.config import load_config  # noqa: E402
from reward_forcing.errors import ConfigError, run_cli  # noqa: E402
from reward_forcing.inference.generator import latent_size  # noqa: E402
from reward_forcing.models.text_encoder import TextEncoder  # noqa: E402
from reward_forcing.models.wan import WanModel  # noqa: E402
from reward_forcing.training.ode_data import (  # noqa: E402
    prepare_output_dir, shard_done, shard_range, shards_for_rank)
from reward_forcing.training.ode_pairs import check_keep_indices, euler_sigmas, generate_pairs  # noqa: E402
from reward_forcing.video import read_prompts  # noqa: E402

SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_path", required=True)
    parser.add_argument("--data_path", required=True, help="prompt file, one prompt per line")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def load_teacher(cfg, device):
    folder = asset_path(cfg, cfg.ode_teacher_name)
    config, state_dict = load_wan_folder(folder)
    teacher = load_into(WanModel.from_config(config), state_dict, str(folder))
    return teacher.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def manifest(cfg, args, num_prompts: int, latent_shape) -> dict:
    """Everything that determines the pairs: a resumed run must match it."""
    sigmas = euler_sigmas(cfg.ode_num_steps, cfg.ode_shift)
    return {
        "num_prompts": num_prompts, "shard_size": cfg.ode_shard_size,
        "prompt_file": str(Path(args.data_path).resolve()),
        "latent_shape": list(latent_shape), "keep_indices": list(cfg.ode_keep_indices),
        "sigmas": [float(sigmas[i]) for i in cfg.ode_keep_indices], "num_steps": cfg.ode_num_steps,
        "shift": cfg.ode_shift, "guidance_scale": cfg.ode_guidance_scale, "negative_prompt": cfg.negative_prompt,
        "teacher": cfg.ode_teacher_name, "seed": cfg.seed, "dtype": cfg.ode_save_dtype,
    }


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    if cfg.ode_save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"ode_save_dtype must be one of {sorted(SAVE_DTYPES)}, got {cfg.ode_save_dtype!r}")
    keep = check_keep_indices(cfg.ode_keep_indices, cfg.ode_num_steps)
    prompts = [p.text for p in read_prompts(args.data_path)[0]]
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device = torch.device("cpu")

    teacher = load_teacher(cfg, device)
    latent_shape = (teacher.in_dim, cfg.ode_num_frames, *latent_size(cfg, teacher.patch_size))
    # Ranks need no communication: they write disjoint shards and identical manifests (atomically).
    prepare_output_dir(args.output_dir, manifest(cfg, args, len(prompts), latent_shape))
    text_encoder = TextEncoder.from_wan_folder(asset_path(cfg, cfg.model_name), cfg.text_encoder, device=device)

    def encode(texts):
        with torch.no_grad():
            return text_encoder.encode(texts).float()

    from tqdm import tqdm

    todo = sum(len(shard_range(k, len(prompts), cfg.ode_shard_size))
               for k in shards_for_rank(len(prompts), cfg.ode_shard_size, rank, world_size)
               if not shard_done(args.output_dir, k))
    with tqdm(total=todo, desc=f"ODE pairs (rank {rank})", unit="pair", disable=rank != 0) as progress:
        made = generate_pairs(teacher, encode, prompts, args.output_dir, cfg.negative_prompt, latent_shape,
                              euler_sigmas(cfg.ode_num_steps, cfg.ode_shift), cfg.ode_guidance_scale, keep,
                              cfg.ode_shard_size, cfg.seed, rank, world_size, SAVE_DTYPES[cfg.ode_save_dtype],
                              device, progress)
    print(f"rank {rank}: generated {made} pairs into {args.output_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
