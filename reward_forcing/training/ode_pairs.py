"""Making ODE pairs: the bidirectional teacher's Euler trajectories with classifier-free guidance
(CausVid, arXiv 2412.07772 §4.3).

From pure noise, `num_steps` Euler steps on the shifted sigma grid
    sigma_k = warp(1 - k / num_steps), k = 0 .. num_steps - 1, then sigma_num_steps = 0,
    x_{k+1} = x_k + v(x_k, 1000 * sigma_k) * (sigma_{k+1} - sigma_k),
    v = v_uncond + guidance_scale * (v_cond - v_uncond),
with x_0 the noise. The states x_k at `keep_indices` are recorded, noisiest first.
"""
import torch

from reward_forcing.errors import ConfigError
from reward_forcing.sampling import shift_sigma
from reward_forcing.training.losses import classifier_free_guidance
from reward_forcing.training.ode_data import shard_done, shard_range, shards_for_rank, write_shard


def euler_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The num_steps + 1 sigmas of the trajectory, from 1 down to a final 0 (float64)."""
    if num_steps < 1:
        raise ConfigError(f"ode_num_steps must be at least 1, got {num_steps}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)])


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
    """Recorded states [K, C, F, H, W] (float32) of the guided Euler ODE started from noise [1, C, F, H, W]."""
    keep = set(keep_indices)
    x = noise.float()
    states = [x[0]] if 0 in keep else []
    for k in range(len(sigmas) - 1):
        flow = guided_flow(teacher, x, float(1000 * sigmas[k]), cond, uncond, guidance_scale)
        x = x + flow * float(sigmas[k + 1] - sigmas[k])
        if k + 1 in keep:
            states.append(x[0])
    return torch.stack(states)


def pair_noise(seed: int, prompt_index: int, shape) -> torch.Tensor:
    """The starting noise of pair `prompt_index`: a function of (seed, index) only, so pairs do not
    depend on the number of ranks or on where a run was resumed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + prompt_index)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def generate_pairs(teacher, encode, prompts: list[str], output_dir, negative_prompt: str, latent_shape,
                   sigmas: torch.Tensor, guidance_scale: float, keep_indices, shard_size: int, seed: int,
                   rank: int = 0, world_size: int = 1, save_dtype=torch.float16, device="cpu", progress=None) -> int:
    """Write this rank's missing shards; returns how many pairs it generated.

    `encode(list_of_prompts)` returns text embeddings [B, L, D]; latent_shape is [C, F, H, W].
    """
    uncond = encode([negative_prompt]).to(device)
    made = 0
    for k in shards_for_rank(len(prompts), shard_size, rank, world_size):
        if shard_done(output_dir, k):
            continue
        indices = list(shard_range(k, len(prompts), shard_size))
        states = []
        for i in indices:
            cond = encode([prompts[i]]).to(device)
            noise = pair_noise(seed, i, (1, *latent_shape)).to(device)
            states.append(euler_trajectory(teacher, noise, cond, uncond, sigmas, guidance_scale, keep_indices).cpu())
            made += 1
            if progress is not None:
                progress.update(1)
        write_shard(output_dir, k, [prompts[i] for i in indices], indices, torch.stack(states).to(save_dtype))
    return made
