"""The miniature world's detector (reward_forcing/miniworld/world.py), computed on latents.

Per frame: subtract the world's background, project the remainder onto each colour signature (a map per
colour, about amplitude x blob for the blob's own colour and about 0 for the others, the signatures being
orthogonal), take the colour with the most positive energy, its peak (contrast), the blob's position as the
circular centroid of the map above `centroid_floor` x peak on the torus, and whether the frame holds one
valid blob (contrast in range and little left after subtracting the detected blob). Per video: the majority
colour, the fraction of valid frames, the speed (the least-squares velocity of the unwrapped track: the mean
displacement per frame of the line that fits it best, which frame-to-frame jitter of a wobbling or
dissolving blob does not inflate), the path speed (mean length of the frame-to-frame steps, which it does)
and the straightness of the track (net displacement / path length).
"""
import math

import torch

from reward_forcing.miniworld.world import World

CENTROID_FLOOR = 0.2  # fraction of the peak below which pixels do not pull the centroid


def colour_maps(world: World, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, K, F, H, W] response of each colour signature (per-channel mean of signature x rest)."""
    rest = latents.float() - world.background.to(latents.device)[None, :, None]
    return torch.einsum("kc,bcfhw->bkfhw", world.signatures.to(latents.device), rest) / world.spec.channels


def _circular_centroid(weights: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Circular mean coordinate along `dim` (size pixels) of non-negative weights [..., H, W]."""
    angle = 2 * math.pi * torch.arange(size, device=weights.device, dtype=weights.dtype) / size
    shape = [1] * weights.dim()
    shape[dim] = size
    cos = (weights * angle.cos().view(shape)).sum(dim=(-2, -1))
    sin = (weights * angle.sin().view(shape)).sum(dim=(-2, -1))
    return torch.remainder(torch.atan2(sin, cos) * size / (2 * math.pi), size)


def detect_frames(world: World, latents: torch.Tensor) -> dict:
    """Per-frame detections of latents [B, C, F, H, W]: colour [B, F] (index), contrast [B, F] (peak / amplitude),
    position [B, F, 2] (y, x), residual [B, F] (energy left / blob energy) and valid [B, F] (bool)."""
    spec = world.spec
    maps = colour_maps(world, latents)
    energy = maps.clamp(min=0).pow(2).sum(dim=(-2, -1))             # [B, K, F]
    colour = energy.argmax(dim=1)                                    # [B, F]
    own = maps.gather(1, colour[:, None, :, None, None].expand(-1, 1, -1, *maps.shape[-2:]))[:, 0]  # [B, F, H, W]
    peak = own.flatten(2).amax(dim=2)
    weights = (own - CENTROID_FLOOR * peak[..., None, None]).clamp(min=0)
    position = torch.stack([_circular_centroid(weights, -2, spec.height),
                            _circular_centroid(weights, -1, spec.width)], dim=-1)
    b, f = colour.shape
    blobs = world.blob(position.reshape(-1, 2).to(latents.device)).view(b, f, spec.height, spec.width)
    signature = world.signatures.to(latents.device)[colour]         # [B, F, C]
    template = spec.blob_amplitude * signature[..., None, None] * blobs[:, :, None]  # [B, F, C, H, W]
    rest = (latents.float() - world.background.to(latents.device)[None, :, None]).transpose(1, 2)  # [B, F, C, H, W]
    residual = (rest - template).pow(2).sum(dim=(2, 3, 4)) / template.pow(2).sum(dim=(2, 3, 4))
    contrast = peak / spec.blob_amplitude
    low, high = spec.valid_contrast
    valid = (contrast >= low) & (contrast <= high) & (residual <= spec.valid_residual)
    return {"colour": colour, "contrast": contrast, "position": position, "residual": residual, "valid": valid}


def track_velocity(steps: torch.Tensor) -> torch.Tensor:
    """Least-squares velocity [B, 2] (pixels per frame) of the tracks whose frame-to-frame steps are [B, F-1, 2]:
    the slope of the line fitted to the unwrapped positions (cumulative steps) against the frame index."""
    track = torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(dim=1)], dim=1)  # [B, F, 2]
    time = torch.arange(track.shape[1], dtype=track.dtype, device=track.device)
    time = time - time.mean()
    return (track * time[None, :, None]).sum(dim=1) / time.pow(2).sum()


def torus_steps(world: World, position: torch.Tensor) -> torch.Tensor:
    """Frame-to-frame steps [B, F-1, 2] (shortest on the torus, pixels) of tracks [B, F, 2]."""
    return world.wrap(position[:, 1:] - position[:, :-1])


def video_stats(world: World, latents: torch.Tensor, target_colours=None) -> dict:
    """Per-video statistics [B]: colour (majority over frames), validity (fraction of valid frames), speed (norm of
    the track's least-squares velocity, pixels per frame), path_speed (mean step length), straightness (net / total
    displacement; 1 for a still blob) and, with target_colours [B], color_correct (1.0 when the majority colour is
    the target)."""
    frames = detect_frames(world, latents)
    colour = frames["colour"].mode(dim=1).values
    steps = torus_steps(world, frames["position"])
    lengths = steps.norm(dim=-1)
    path = lengths.sum(dim=1)
    net = steps.sum(dim=1).norm(dim=-1)
    out = {"colour": colour, "validity": frames["valid"].float().mean(dim=1),
           "speed": track_velocity(steps).norm(dim=-1), "path_speed": lengths.mean(dim=1),
           "straightness": torch.where(path > 1e-6, net / path.clamp(min=1e-6), torch.ones_like(path))}
    if target_colours is not None:
        out["color_correct"] = (colour == torch.as_tensor(target_colours, device=colour.device)).float()
    return out
