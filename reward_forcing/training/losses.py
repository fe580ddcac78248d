"""Distribution-matching losses as pure functions of tensors: DMD (arXiv 2311.18828), as Self Forcing uses it
(arXiv 2506.08009), and Re-DMD (arXiv 2512.04678 §3.3).

Latents are [B, C, F, H, W]. x is the generator's rollout, x_real / x_fake the teacher's (with CFG)
and critic's x0 predictions at the same noisy input.
"""
import torch

from reward_forcing.sampling import shift_sigma


def score_timesteps(uniform_steps: torch.Tensor, shift: float, min_t: float, max_t: float,
                    num_train_timesteps: int = 1000) -> torch.Tensor:
    """Integer draws in [0, N) -> shifted, clamped DMD / critic timesteps (float, same shape)."""
    u = uniform_steps.double() / num_train_timesteps
    return (num_train_timesteps * shift_sigma(u, shift)).clamp(min_t, max_t)


def dmd_gradient(x: torch.Tensor, x_real: torch.Tensor, x_fake: torch.Tensor) -> torch.Tensor:
    """g = (x_fake - x_real) / mean|x - x_real|, the normaliser taken per sample over C, F, H, W."""
    dims = tuple(range(1, x.dim()))
    normaliser = (x - x_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x_fake - x_real) / normaliser)


def normalise_weight(weight: torch.Tensor, how: str) -> torch.Tensor:
    """`reward.weight_norm`: `none` keeps w = exp(beta * score) as the paper defines it; `batch_mean` divides by w's
    mean over the micro-batch of every rank, so only the emphasis among a batch's samples remains. Unnormalised,
    an Adam step's size follows its batch's mean reward (with beta 4 on the miniature world's motion_norm, 10 % of
    the generator steps carried half the total weight)."""
    if how == "none":
        return weight
    import torch.distributed as dist

    totals = torch.stack([weight.sum(), torch.tensor(float(weight.numel()), dtype=weight.dtype, device=weight.device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return weight * (totals[1] / totals[0])


def reward_weight(score: torch.Tensor, beta: float, clip=None) -> torch.Tensor:
    """Per-sample Re-DMD weight w = exp(beta * score) (upstream's score: VideoReward's MQ_norm), optionally
    capped at `clip`."""
    weight = torch.exp(beta * score.double())
    return weight if clip is None else weight.clamp(max=float(clip))


def re_dmd_loss(x: torch.Tensor, grad: torch.Tensor, weight=None) -> torch.Tensor:
    """0.5 * mean_b(w_b * mean((x_b - sg(x_b - g_b))^2)) in float64, so dL/dx = w * g / x.numel().

    weight: None (plain DMD, w = 1) or a per-sample tensor [B] with no gradient.
    """
    x = x.double()
    target = (x - grad.double()).detach()
    per_sample = ((x - target) ** 2).flatten(1).mean(dim=1)
    if weight is not None:
        per_sample = per_sample * weight.detach().double().to(per_sample.device)
    return 0.5 * per_sample.mean()


def critic_flow_loss(x_pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                     t, schedule) -> torch.Tensor:
    """Flow matching on the critic's x0 prediction: v_hat = (x_t - x_pred) / sigma vs target noise - x0."""
    flow_pred = schedule.x0_to_flow(x_pred, x_t, t)
    return ((flow_pred - schedule.training_target(x0, noise)) ** 2).mean()
