"""`reward: {name: blob_quality}`: a per-frame image score of the miniature world, read from latents with gradient.

It plays the role ImageReward plays in reward feedback (arXiv 2601.16933, "Reward-Forcing: Autoregressive Video
Generation with Reward Feedback"): image quality and prompt alignment of single frames, with no notion of motion.
Per frame, with rest = frame - the world's background (reward_forcing/miniworld/world.py):

    quality = max over p of cos(rest, blob_amplitude * signature[prompt's colour] * blob(p))

the cosine taken over all C x H x W values, p over a half-pixel grid of the torus (2H x 2W candidate positions).
It is 1 for a clean frame of the prompt's colour at a grid position, and lower for another colour (0 for an
orthogonal signature), a smeared, doubled or noisy blob, or an empty frame (0). Per video: the mean over the
frames it is handed. The max over templates is differentiable almost everywhere (the gradient flows through the
best template; ties are split evenly).
"""
import torch

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.world import World
from reward_forcing.rewards.base import Reward

NORM_FLOOR = 1e-12  # an empty frame (rest = 0) scores 0 instead of 0 / 0


class BlobQualityReward(Reward):
    input = "latents"
    differentiable = True
    keys = ("quality",)

    def __init__(self, world: World):
        super().__init__()
        self.world = world
        spec = world.spec
        grid = torch.cartesian_prod(torch.arange(2 * spec.height, dtype=torch.float64) / 2,
                                    torch.arange(2 * spec.width, dtype=torch.float64) / 2)
        blobs = world.blob(grid)  # [P, H, W]
        # the templates' colour and amplitude factor out of the cosine: unit-norm spatial shapes per candidate
        self.shapes = blobs / blobs.flatten(1).norm(dim=1)[:, None, None]

    @classmethod
    def from_settings(cls, reward, checkpoint_dir=None, fps=None, info=None, dtype=None, decoder=None):
        if not reward.world_path:
            raise ConfigError("reward 'blob_quality' needs reward.world_path=<world.json of a miniworld dataset>")
        return cls(World.from_file(reward.world_path))

    def frame_scores(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-frame quality [B, F] of latents [B, C, F, H, W] (gradient to the latents)."""
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")
        like = dict(dtype=videos.dtype, device=videos.device)
        colours = [self.world.colour_of(p) for p in prompts]
        signature = self.world.signatures.to(**like)[colours]             # [B, C]
        signature = signature / signature.norm(dim=1, keepdim=True)
        rest = videos - self.world.background.to(**like)[None, :, None]    # [B, C, F, H, W]
        along = torch.einsum("bc,bcfhw->bfhw", signature, rest)            # rest projected on the prompt's colour
        dots = torch.einsum("bfhw,phw->bfp", along, self.shapes.to(**like))
        norms = rest.pow(2).sum(dim=(1, 3, 4)).clamp(min=NORM_FLOOR).sqrt()  # [B, F]
        return dots.amax(dim=-1) / norms

    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        return {"quality": self.frame_scores(videos, prompts).mean(dim=1)}
