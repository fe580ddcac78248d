"""Qwen2-VL video preprocessing in plain torch: frame sampling, smart resize, CLIP normalisation, patchify.

Mirrors what VideoAlign trained on (qwen-vl-utils' frame sampling and resize, then the Qwen2-VL processor),
without torchvision, and differentiable with respect to the input pixels when asked.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reward_forcing.errors import UserError

# qwen-vl-utils' video defaults (VideoAlign's vision_process.py): frame-count bounds and the per-frame
# pixel floor, counted in merged vision tokens of `factor`² pixels each.
MIN_SAMPLED_FRAMES = 4
MAX_SAMPLED_FRAMES = 768
VIDEO_MIN_TOKENS = 128

INPUT_RANGES = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0), "[0,255]": (0.0, 255.0)}


class VideoInputError(UserError):
    """A video tensor the reward model cannot take."""


@dataclass(frozen=True)
class VisionSpec:
    """What the Qwen2-VL processor needs; read from the base model's preprocessor_config.json."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple
    image_std: tuple
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _round_even(x: float, factor: int) -> int:
    # Python's round (half to even), as qwen-vl-utils uses.
    return round(x / factor) * factor


def sample_frame_indices(num_frames: int, video_fps: float, sample_fps: float, factor: int = 2) -> list:
    """VideoAlign's uniform fps sampling: n = T/fps·sample_fps, clamped, rounded to even, spread by linspace."""
    lo = math.ceil(MIN_SAMPLED_FRAMES / factor) * factor
    hi = math.floor(min(MAX_SAMPLED_FRAMES, num_frames) / factor) * factor
    n = _round_even(min(max(num_frames / video_fps * sample_fps, lo), hi), factor)
    n = min(n, num_frames)
    if n < factor:
        raise VideoInputError(f"a video of {num_frames} frame(s) is too short for fps sampling (needs >= {factor})")
    # float32 linspace + round, as upstream does (torch.round is half to even).
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """Sides to multiples of `factor`, area kept within [min_pixels, max_pixels], aspect ratio kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Round to uint8 levels; the gradient passes straight through so differentiable scores match."""
    q = x.clamp(0, 255).round()
    return x + (q - x).detach() if x.requires_grad else q


def to_unit255(videos: torch.Tensor, input_range: str) -> torch.Tensor:
    if input_range not in INPUT_RANGES:
        raise VideoInputError(f"input_range must be one of {sorted(INPUT_RANGES)}, got {input_range!r}")
    lo, hi = INPUT_RANGES[input_range]
    return (videos.float() - lo) * (255.0 / (hi - lo))


def resize_frames(frames: torch.Tensor, size: tuple, quantise: bool = True) -> torch.Tensor:
    """Bicubic antialiased resize of [N, C, H, W] frames in 0..255; on uint8 levels when `quantise`."""
    if quantise:
        frames = _quantise(frames)
    if tuple(frames.shape[-2:]) != tuple(size):
        frames = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False)
    return _quantise(frames) if quantise else frames


def normalise(frames: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    mean = torch.tensor(spec.image_mean, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.image_std, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    return (frames / 255.0 - mean) / std


def patchify(frames: torch.Tensor, spec: VisionSpec) -> tuple:
    """[T, C, H, W] normalised frames -> (patches [gt·gh·gw, C·tp·p·p], grid (gt, gh, gw)) in Qwen2-VL order."""
    tp, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    pad = (-frames.shape[0]) % tp
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])], dim=0)
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_video(video: torch.Tensor, spec: VisionSpec, video_fps: float, sample_fps=None, size=None,
                     quantise: bool = True) -> tuple:
    """One video [3, T, H, W] in 0..255 -> (patches, grid).

    sample_fps: frames are sampled at this rate (VideoAlign's training); None keeps every frame.
    size: (H, W) to resize to; None = smart_resize within the spec's pixel budget.
    """
    frames = video.transpose(0, 1)  # [T, C, H, W]
    if sample_fps is not None:
        index = sample_frame_indices(frames.shape[0], video_fps, sample_fps, spec.temporal_patch_size)
        frames = frames[index]
    if size is None:
        size = smart_resize(frames.shape[-2], frames.shape[-1], spec.factor, spec.min_pixels, spec.max_pixels)
    elif size[0] % spec.factor or size[1] % spec.factor:
        raise VideoInputError(f"resize target {tuple(size)} must be multiples of {spec.factor}")
    frames = resize_frames(frames, tuple(size), quantise)
    return patchify(normalise(frames, spec), spec)
