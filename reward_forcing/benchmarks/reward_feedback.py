"""Does reward feedback raise the reward on prompts it never trained on? Mean ImageReward of the last frame on
held-out prompts, before (the ODE init) and after N steps of `trainer: reward_feedback`, plus the run's peak memory.

    python scripts/make_tiny_checkpoints.py --output_dir checkpoints/tiny
    python scripts/measure_reward_feedback.py --config configs/tiny_reward_feedback.yaml --steps 30 \
        --train_prompts prompts/demo.txt --heldout_prompts HELDOUT.txt --logdir runs/measure_rf [key=value ...]

Evaluation samples with the full denoising schedule (every chunk exits at the last step), fixed noise per prompt,
on one process; training runs train.py's loop in this process (one rank).
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError



@torch.no_grad()
def mean_heldout_reward(cfg, weights: dict, prompts: list[str], seed: int = 1234) -> float:
    """Mean reward of the last frame over `prompts`, for a generator with these (unsharded) weights."""
    from reward_forcing.checkpoints import asset_path, read_wan_config
    from reward_forcing.inference.generator import latent_size
    from reward_forcing.models.causal_wan import CausalWanModel
    from reward_forcing.models.text_encoder import TextEncoder
    from reward_forcing.distributed import DistInfo
    from reward_forcing.training.frame_reward import FrameReward, choose_frames
    from reward_forcing.training.rollout import rollout, training_sampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    model = CausalWanModel.from_config(read_wan_config(asset_path(cfg.checkpoint_dir, cfg.model_name)),
                                       num_frame_per_block=int(cfg.num_frame_per_block),
                                       local_attn_size=int(cfg.local_attn_size))
    model.load_state_dict(weights, strict=True)
    model = model.to(device).eval()
    sampler = training_sampler(model, cfg)
    encoder = TextEncoder.from_wan_folder(asset_path(cfg.checkpoint_dir, cfg.model_name), cfg.text_encoder, device=device)
    reward = FrameReward.from_config(cfg, info, torch.float32)
    frames = int(cfg.num_training_frames)
    exits = [len(sampler.timesteps) - 1] * (frames // sampler.chunk_frames)
    scores = []
    for index, prompt in enumerate(prompts):
        x = rollout(sampler, encoder.encode([prompt]), frames, latent_size(cfg, model.patch_size), exits, seed,
                    ("heldout",), [index], torch.float32, with_grad=False)
        scores.append(reward(x, [prompt], choose_frames("last", reward.num_pixel_frames(frames), seed, 0, [0])))
    return torch.cat(scores).mean().item()


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process peak)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_reward_feedback", help="config path or preset name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train_prompts", required=True)
    parser.add_argument("--heldout_prompts", required=True)
    parser.add_argument("--logdir", required=True, help="an empty or absent folder for the training run")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (also passed to training)")
    args = parser.parse_args(argv)
    if Path(args.logdir).exists() and any(Path(args.logdir).iterdir()):
        raise ConfigError(f"--logdir {args.logdir} is not empty (a run there would resume)")
    heldout = [line.strip() for line in Path(args.heldout_prompts).read_text().splitlines() if line.strip()]
    overrides = [*args.overrides, f"prompt_path={args.train_prompts}", f"max_steps={args.steps}",
                 f"save_every={args.steps}"]
    cfg = load_config(args.config, overrides)
    train_set = {line.strip() for line in Path(args.train_prompts).read_text().splitlines()}
    if train_set & set(heldout):
        raise ConfigError("held-out prompts overlap the training prompts")

    from reward_forcing.checkpoints import asset_path, load_generator_state_dict
    from reward_forcing.training.cli import main as train

    began = time.perf_counter()
    train(["--config_path", args.config, "--logdir", args.logdir, "--disable-wandb", *overrides])
    train_time, memory = time.perf_counter() - began, peak_memory()
    rows = [json.loads(line) for line in (Path(args.logdir) / "metrics.jsonl").read_text().splitlines()]
    exported = Path(args.logdir) / "generator.pt"
    results = {
        "init": mean_heldout_reward(cfg, load_generator_state_dict(asset_path(cfg.checkpoint_dir, cfg.generator_ckpt)), heldout),
        "trained": mean_heldout_reward(cfg, load_generator_state_dict(exported), heldout),
    }
    if cfg.ema_decay is not None and cfg.ema_start < args.steps:
        results["trained_ema"] = mean_heldout_reward(cfg, load_generator_state_dict(exported, use_ema=True), heldout)
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-5:]) / len(rows[-5:])
    print(f"training reward (batch mean): step 1 {first:.4f}, mean of the last 5 steps {last:.4f}")
    print(f"held-out prompts ({len(heldout)}), mean last-frame reward: " +
          ", ".join(f"{name} {value:.4f}" for name, value in results.items()))
    print(f"{args.steps} steps in {train_time:.1f} s; peak memory {memory}")
    return 0

