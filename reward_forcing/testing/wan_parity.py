"""What the comparisons of our Wan models with diffusers' WanTransformer3DModel share (tests/test_wan_parity.py,
tests/test_causal_wan.py): a tiny config, a fan-in scaled initialisation, an fp64 timestep sinusoid for diffusers."""
import math

import torch

TINY = dict(dim=32, ffn_dim=48, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=24, text_len=16, freq_dim=32)


class Fp64Sinusoid(torch.nn.Module):
    """diffusers computes the timestep sinusoid in fp32 while Wan computes it in fp64; at t ~ 1000 the fp32
    phase error alone moves outputs by ~1e-5. Swapping in an fp64 sinusoid (closed form
    [cos(t w_i) | sin(t w_i)], w_i = 10000^(-i/half)) isolates the architecture comparison."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        s = torch.outer(t.to(torch.float64), w)
        return torch.cat([torch.cos(s), torch.sin(s)], dim=-1).float()


def init_fan_in_normal_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every parameter with seeded normal draws, matrices at std fan_in^-1/2 and vectors at std 0.1, so that
    activations stay at unit scale and no part of the model is at its default (zero bias, unit norm) init.
    Unlike assets.perturb_parameters_, nothing of the previous values is kept."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 and p.shape[0] > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model
