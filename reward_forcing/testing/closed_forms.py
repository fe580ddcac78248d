"""Closed forms shared by tests, written independently of the code under test."""
import torch


def grid_sigma(t, shift: float, n: int = 1000) -> torch.Tensor:
    """sigma of timestep(s) t on the shifted training grid, nearest point by timestep: the grid is
    sigma_k = s u / (1 + (s - 1) u) with u = 1 - k / n, k = 0..n-1, and its timesteps are n * sigma_k."""
    t = torch.as_tensor(t, dtype=torch.float64)
    u = 1 - torch.arange(n, dtype=torch.float64) / n
    sigmas = shift * u / (1 + (shift - 1) * u)
    index = (t.reshape(-1, 1) - n * sigmas.reshape(1, -1)).abs().argmin(dim=1)
    return sigmas[index].reshape(t.shape)
