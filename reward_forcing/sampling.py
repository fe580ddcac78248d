"""Rectified-flow schedule shared by generator, teacher and critic.

x_t = (1 - sigma) * x0 + sigma * noise, and the networks predict the flow v = noise - x0, so
x0 = x_t - sigma * v. Timesteps live in [0, num_train_timesteps]; sigma is found either on the
shifted training grid (nearest point, as upstream) or exactly as t / num_train_timesteps.
Latents are [B, C, F, H, W]; t may be a scalar, [B] or per-frame [B, F]. The teachers' many-step sampler (an Euler
solve of the flow ODE, for ODE pairs and the autoregressive teacher) and classifier-free guidance live here too, so
inference and training share them.
"""
import torch

from reward_forcing.errors import ConfigError


def shift_sigma(sigma, shift: float):
    """The timestep-shift warp sigma -> s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def euler_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The num_steps + 1 sigmas of an Euler ODE solve from 1 down to a final 0 (float64): the shifted points
    warp(1 - k / num_steps), k = 0 .. num_steps - 1, as upstream's FlowMatchScheduler(extra_one_step=True)
    sets them, then 0."""
    if num_steps < 1:
        raise ConfigError(f"ode_num_steps must be at least 1, got {num_steps}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)])


def euler_ode(flow, x: torch.Tensor, sigmas, keep=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler steps of the flow ODE on the decreasing grid `sigmas` (ending at 0):
        x_{k+1} = x_k + flow(x_k, 1000 * sigma_k) * (sigma_{k+1} - sigma_k).
    Returns the end state and the states x_k at the indices `keep` (0 = x itself), in order."""
    keep = set(keep)
    states = [x] if 0 in keep else []
    for k in range(len(sigmas) - 1):
        x = x + flow(x, float(1000 * sigmas[k])) * float(sigmas[k + 1] - sigmas[k])
        if k + 1 in keep:
            states.append(x)
    return x, states


def classifier_free_guidance(x_cond: torch.Tensor, x_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Upstream's form x_c + s * (x_c - x_u), i.e. classic CFG with weight 1 + s."""
    return x_cond + scale * (x_cond - x_uncond)


def warped_steps(step_list, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Map nominal steps (e.g. [1000, 750, 500, 250]) onto the shifted grid, as upstream does."""
    warped = []
    for step in step_list:
        if not 0 <= step <= num_train_timesteps:
            raise ConfigError(f"denoising step {step} is outside [0, {num_train_timesteps}]")
        sigma = step / num_train_timesteps
        warped.append(float(num_train_timesteps * shift_sigma(sigma, shift)))
    return warped


class FlowMatchSchedule:
    def __init__(self, shift: float, num_train_timesteps: int = 1000, sigma_lookup: str = "nearest"):
        if sigma_lookup not in ("nearest", "exact"):
            raise ConfigError(f"sigma_lookup must be 'nearest' or 'exact', got '{sigma_lookup}'")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self.sigma_lookup = sigma_lookup
        # The training grid: N sigmas from 1 towards 0 (the final 0 excluded), then warped.
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigma(base, self.shift)
        self.timesteps = self.sigmas * num_train_timesteps

    def sigma(self, t) -> torch.Tensor:
        """sigma for timestep(s) t, in float64, with t's shape."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.sigma_lookup == "exact":
            return t / self.num_train_timesteps
        grid = self.timesteps.to(t.device)
        index = (t.reshape(-1, 1) - grid.reshape(1, -1)).abs().argmin(dim=1)
        return self.sigmas.to(t.device)[index].reshape(t.shape)

    @staticmethod
    def _broadcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Place sigma of shape (), [B] or [B, F] against a [B, C, F, H, W] tensor."""
        sigma = sigma.to(like.device)
        if sigma.dim() == 0:
            return sigma
        if sigma.dim() == 1:
            return sigma.reshape(-1, 1, 1, 1, 1)
        if sigma.dim() == 2:
            return sigma.reshape(sigma.shape[0], 1, sigma.shape[1], 1, 1)
        raise ValueError(f"timestep tensor must be a scalar, [B] or [B, F]; got shape {tuple(sigma.shape)}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        sigma = self._broadcast(self.sigma(t), noise).to(noise.dtype)
        return ((1 - sigma) * x0 + sigma * noise).to(noise.dtype)

    def flow_to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = self._broadcast(self.sigma(t), flow)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = self._broadcast(self.sigma(t), x0)
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0
