"""Making ODE pairs: a teacher's Euler trajectories with classifier-free guidance (CausVid, arXiv 2412.07772 §4.3),
from the bidirectional teacher or, with `ode_teacher_causal`, from the autoregressive one (Causal Forcing, arXiv
2602.02214 §4).

From pure noise, `num_steps` Euler steps on the shifted sigma grid
    sigma_k = warp(1 - k / num_steps), k = 0 .. num_steps - 1, then sigma_num_steps = 0,
    x_{k+1} = x_k + v(x_k, 1000 * sigma_k) * (sigma_{k+1} - sigma_k),
    v = v_uncond + guidance_scale * (v_cond - v_uncond),
with x_0 the noise. The states x_k at `keep_indices` are recorded, noisiest first.

The command line (scripts/generate_ode_pairs.py, `main` below):

    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --config_path configs/ode_init.yaml \
        --data_path prompts.txt --output_dir ode_pairs [key=value ...]

Each prompt line becomes one pair: the teacher (`ode_teacher_name`) integrates the guided flow ODE
from pure noise with `ode_num_steps` Euler steps (shift `ode_shift`, CFG `ode_guidance_scale` against
`negative_prompt`), and the states at `ode_keep_indices` are stored, noisiest first. The bidirectional
teacher integrates every frame at once, so a frame's clean state depends on the noise of all frames —
the later ones included, which the causal student never sees (the "frame-level injectivity" defect of
arXiv 2602.02214 §3). The autoregressive teacher (`ode_teacher_causal: true`) integrates chunk by chunk,
each chunk attending to the clean chunks it generated before (reward_forcing/inference/ar_teacher.py),
so a chunk's states depend only on its own noise and the chunks before it. (Upstream's
get_causal_ode_data_chunkwise.py conditions each chunk on a latent dataset's clean video instead and
stores that too; the pairs here need no dataset, and their last state is the teacher's own video.) Output format: reward_forcing/training/ode_data.py. Prompts are grouped into shards
of `ode_shard_size` dealt round-robin over the ranks, none dropped; a shard is written as soon as it
is complete, and rerunning the same command skips the shards already on disk. Pair i's noise
depends only on (seed, i), so the result does not depend on the number of ranks.
"""
import argparse
import os
from functools import partial
from pathlib import Path

import torch

from reward_forcing.checkpoints import asset_path, load_into, load_wan_folder
from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.inference.ar_teacher import ARTeacherSampler
from reward_forcing.inference.generator import latent_size
from reward_forcing.inference.pipeline import load_student
from reward_forcing.models.text_encoder import TextEncoder
from reward_forcing.models.wan import WanModel
from reward_forcing.sampling import classifier_free_guidance, euler_ode, euler_sigmas
from reward_forcing.training.data import read_prompt_texts
from reward_forcing.training.ode_data import prepare_output_dir, shard_done, shard_range, shards_for_rank, write_shard


def check_keep_indices(keep_indices, num_steps: int) -> list[int]:
    keep = [int(i) for i in keep_indices]
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] > num_steps:
        raise ConfigError(f"ode_keep_indices must be increasing indices in [0, {num_steps}], got {keep}")
    return keep


def guided_flow(teacher, x: torch.Tensor, t: float, cond: torch.Tensor, uncond: torch.Tensor,
                guidance_scale: float) -> torch.Tensor:
    """CFG flow for one latent x [1, C, F, H, W]; both branches run as one batch of two."""
    timestep = torch.full((2,), t, device=x.device, dtype=torch.float32)
    flow = teacher(torch.cat([x, x]), timestep, torch.cat([cond, uncond]))
    flow_cond, flow_uncond = flow.float().chunk(2)
    # Wan's u + s (c - u) is the project's c + (s - 1) (c - u)
    return classifier_free_guidance(flow_cond, flow_uncond, guidance_scale - 1)


@torch.no_grad()
def euler_trajectory(teacher, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     sigmas: torch.Tensor, guidance_scale: float, keep_indices) -> torch.Tensor:
    """Recorded states [K, C, F, H, W] (float32) of the bidirectional teacher's guided Euler ODE started from noise
    [1, C, F, H, W]: every frame's trajectory at once."""
    def flow(x, t):
        return guided_flow(teacher, x, t, cond, uncond, guidance_scale)

    _, states = euler_ode(flow, noise.float(), sigmas, keep_indices)
    return torch.stack([state[0] for state in states])


@torch.no_grad()
def causal_trajectory(sampler, noise: torch.Tensor, cond: torch.Tensor, keep_indices) -> torch.Tensor:
    """Recorded states [K, C, F, H, W] (float32) of the autoregressive teacher (an ARTeacherSampler) from noise
    [1, C, F, H, W], chunk by chunk: each chunk's guided Euler ODE attends to the clean chunks generated before it,
    then a context pass writes the clean chunk into the cache. A chunk's recorded states therefore depend only on its
    own noise and the earlier chunks: what the causal student sees (Causal Forcing, arXiv 2602.02214 §4)."""
    cache = sampler.new_cache(1, static=True)
    chunks = []
    for start in range(0, noise.shape[2], sampler.chunk_frames):
        x = noise[:, :, start:start + sampler.chunk_frames].float()
        clean, states = sampler.chunk_trajectory(cache, cond, x, start, keep_indices)
        sampler.context_pass(cache, cond, clean, start)
        chunks.append(torch.stack([state[0] for state in states]))
    return torch.cat(chunks, dim=2)


def pair_noise(seed: int, prompt_index: int, shape) -> torch.Tensor:
    """The starting noise of pair `prompt_index`: a function of (seed, index) only, so pairs do not
    depend on the number of ranks or on where a run was resumed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + prompt_index)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def generate_pairs(trajectory, encode, prompts: list[str], output_dir, latent_shape, shard_size: int, seed: int,
                   rank: int = 0, world_size: int = 1, save_dtype=torch.float16, device="cpu", progress=None) -> int:
    """Write this rank's missing shards; returns how many pairs it generated.

    `trajectory(noise [1, C, F, H, W], cond [1, L, D])` returns a pair's recorded states [K, C, F, H, W]
    (`teacher_trajectory`); `encode(list_of_prompts)` returns text embeddings [B, L, D]; latent_shape is [C, F, H, W].
    """
    made = 0
    for k in shards_for_rank(len(prompts), shard_size, rank, world_size):
        if shard_done(output_dir, k):
            continue
        indices = list(shard_range(k, len(prompts), shard_size))
        states = []
        for i in indices:
            cond = encode([prompts[i]]).to(device)
            noise = pair_noise(seed, i, (1, *latent_shape)).to(device)
            states.append(trajectory(noise, cond).cpu())
            made += 1
            if progress is not None:
                progress.update(1)
        write_shard(output_dir, k, [prompts[i] for i in indices], indices, torch.stack(states).to(save_dtype))
    return made


DESCRIPTION = "Generate ODE pairs for the student's ODE-regression initialisation (CausVid, arXiv 2412.07772 §4.3)."
SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--config_path", required=True)
    parser.add_argument("--data_path", required=True, help="prompt file, one prompt per line")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def load_teacher(cfg, device):
    """The teacher named by `ode_teacher_name`, in fp32: a bidirectional Wan folder, or with `ode_teacher_causal` the
    autoregressive teacher — the causal student's architecture (`model_name`'s config.json) with the weights of a
    Wan folder (`trainer: diffusion` with `causal: true` exports one) or a generator file (the released
    chunkwise/ar_diffusion.pt of thu-ml/Causal-Forcing: {"generator": {"model.<Wan key>": ...}})."""
    if cfg.ode_teacher_causal:
        teacher, _ = load_student(cfg, asset_path(cfg.checkpoint_dir, cfg.ode_teacher_name))
    else:
        folder = asset_path(cfg.checkpoint_dir, cfg.ode_teacher_name)
        config, state_dict = load_wan_folder(folder)
        teacher = load_into(WanModel.from_config(config), state_dict, str(folder))
    return teacher.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def teacher_trajectory(cfg, teacher, uncond: torch.Tensor, keep_indices):
    """`trajectory(noise, cond)` for generate_pairs: the bidirectional teacher's whole-video ODE, or with
    `ode_teacher_causal` the autoregressive teacher's chunk-by-chunk ODE through the student's cache."""
    if cfg.ode_teacher_causal:
        return partial(causal_trajectory, ARTeacherSampler.from_config(teacher, cfg, uncond), keep_indices=keep_indices)
    return partial(euler_trajectory, teacher, uncond=uncond, sigmas=euler_sigmas(cfg.ode_num_steps, cfg.ode_shift),
                   guidance_scale=cfg.ode_guidance_scale, keep_indices=keep_indices)


def manifest(cfg, args, num_prompts: int, latent_shape) -> dict:
    """Everything that determines the pairs: a resumed run must match it."""
    sigmas = euler_sigmas(cfg.ode_num_steps, cfg.ode_shift)
    made = {
        "num_prompts": num_prompts, "shard_size": cfg.ode_shard_size,
        "prompt_file": str(Path(args.data_path).resolve()),
        "latent_shape": list(latent_shape), "keep_indices": list(cfg.ode_keep_indices),
        "sigmas": [float(sigmas[i]) for i in cfg.ode_keep_indices], "num_steps": cfg.ode_num_steps,
        "shift": cfg.ode_shift, "guidance_scale": cfg.ode_guidance_scale, "negative_prompt": cfg.negative_prompt,
        "teacher": cfg.ode_teacher_name, "seed": cfg.seed, "dtype": cfg.ode_save_dtype,
    }
    if cfg.ode_teacher_causal:  # the chunking and the cache decide what each chunk attended to
        made.update(teacher_causal=True, num_frame_per_block=cfg.num_frame_per_block,
                    local_attn_size=cfg.local_attn_size, sink_size=cfg.sink_size, sink_mode=str(cfg.sink_mode),
                    compression_alpha=cfg.compression_alpha)
    return made


def check_causal_frames(cfg) -> None:
    if cfg.ode_teacher_causal and cfg.ode_num_frames % cfg.num_frame_per_block:
        raise ConfigError(f"ode_num_frames={cfg.ode_num_frames} must be a multiple of num_frame_per_block="
                          f"{cfg.num_frame_per_block}: the autoregressive teacher generates whole chunks")


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    keep = check_keep_indices(cfg.ode_keep_indices, cfg.ode_num_steps)
    check_causal_frames(cfg)
    prompts = read_prompt_texts(args.data_path)
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
    text_encoder = TextEncoder.from_wan_folder(asset_path(cfg.checkpoint_dir, cfg.model_name), cfg.text_encoder, device=device)

    def encode(texts):
        with torch.no_grad():
            return text_encoder.encode(texts).float()

    trajectory = teacher_trajectory(cfg, teacher, encode([cfg.negative_prompt]).to(device), keep)

    from tqdm import tqdm

    todo = sum(len(shard_range(k, len(prompts), cfg.ode_shard_size))
               for k in shards_for_rank(len(prompts), cfg.ode_shard_size, rank, world_size)
               if not shard_done(args.output_dir, k))
    with tqdm(total=todo, desc=f"ODE pairs (rank {rank})", unit="pair", disable=rank != 0) as progress:
        made = generate_pairs(trajectory, encode, prompts, args.output_dir, latent_shape, cfg.ode_shard_size,
                              cfg.seed, rank, world_size, SAVE_DTYPES[cfg.ode_save_dtype], device, progress)
    print(f"rank {rank}: generated {made} pairs into {args.output_dir}")
