"""ODE-regression initialisation of the causal student (SPEC §10).

Each training pair holds K recorded states of one teacher trajectory, noisiest first. Per sample,
every chunk of frames draws one state index; the student sees that state labelled with the
matching entry of `ode_timesteps` (a K-entry list ending in 0), runs its block-causal training
forward, and regresses its x0 prediction onto the clean (last) state on the frames whose label is
not 0.
"""
import torch

from reward_forcing.errors import ConfigError


def sample_state_indices(batch_size: int, num_frames: int, frames_per_block: int, num_states: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, F] state indices, uniform over range(num_states), one draw per chunk of frames."""
    if num_frames % frames_per_block:
        raise ConfigError(f"ODE pairs have {num_frames} latent frames, not a multiple of "
                          f"num_frame_per_block={frames_per_block}")
    per_block = torch.randint(0, num_states, (batch_size, num_frames // frames_per_block), generator=generator)
    return per_block.repeat_interleave(frames_per_block, dim=1)


def gather_states(ode_latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick, per sample and frame, state index[b, f] of ode_latent [B, K, C, F, H, W] -> [B, C, F, H, W]."""
    b, _, c, f, h, w = ode_latent.shape
    index = index.to(ode_latent.device).reshape(b, 1, 1, f, 1, 1).expand(b, 1, c, f, h, w)
    return ode_latent.gather(1, index).squeeze(1)


def ode_regression_loss(pred_x0: torch.Tensor, clean: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the frames whose timestep is not 0 (pred_x0, clean: [B, C, F, H, W]; t: [B, F]).

    When every frame of the batch is already clean there is nothing to regress; the loss is then 0
    (still attached to the graph) rather than upstream's NaN mean over an empty set.
    """
    mask = (timesteps != 0).to(pred_x0.device)
    error = (pred_x0.float() - clean.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    if not mask.any():
        return error.sum() * 0.0
    return error[mask].mean()


def student_inputs(ode_latent: torch.Tensor, timestep_list, frames_per_block: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input [B, C, F, H, W] and per-frame timesteps [B, F] for a batch of pairs."""
    b, k, _, f = ode_latent.shape[:4]
    if len(timestep_list) != k:
        raise ConfigError(f"ode_timesteps has {len(timestep_list)} entries but the ODE pairs hold {k} states")
    index = sample_state_indices(b, f, frames_per_block, k, generator)
    timesteps = torch.as_tensor(list(timestep_list), dtype=torch.float32)[index]
    return gather_states(ode_latent, index), timesteps.to(ode_latent.device)


def ode_loss(model, schedule, ode_latent: torch.Tensor, context: torch.Tensor, timestep_list,
             frames_per_block: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One regression loss: block-causal student forward (no cache) on a random state per chunk."""
    noisy, timesteps = student_inputs(ode_latent, timestep_list, frames_per_block, generator)
    flow = model(noisy, timesteps, context)
    pred_x0 = schedule.flow_to_x0(flow, noisy, timesteps)
    return ode_regression_loss(pred_x0, ode_latent[:, -1], timesteps)
