"""`reward: {name: latent_motion}`: the miniature world's motion score, read from latents by its detector.

    speed     the track's least-squares velocity, pixels per latent frame (reward_forcing/miniworld/detector.py):
              a blob that only jitters in place is not paid for the jitter
    validity  fraction of frames that hold one valid blob
    motion    validity x speed / max_speed: the speed as a fraction of the world's fastest data, counted only
              as far as the frames show a valid blob (a student that dissolves the blob into noise, whose
              centroid jumps about, is not paid for it)
It plays the role VideoReward's motion quality plays in Reward Forcing (arXiv 2512.04678 §3.3): Re-DMD
weights each rollout's DMD gradient by exp(beta * motion).
"""
import torch

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.detector import video_stats
from reward_forcing.miniworld.world import World
from reward_forcing.rewards.base import Reward


class LatentMotionReward(Reward):
    input = "latents"
    keys = ("motion", "speed", "validity")

    def __init__(self, world: World):
        super().__init__()
        self.world = world

    @classmethod
    def from_config(cls, cfg, info, dtype, decoder=None):
        if not cfg.reward.world_path:
            raise ConfigError("reward 'latent_motion' needs reward.world_path=<world.json of a miniworld dataset>")
        return cls(World.from_file(cfg.reward.world_path))

    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        stats = video_stats(self.world, videos)
        motion = stats["validity"] * stats["speed"] / self.world.spec.max_speed
        return {"motion": motion, "speed": stats["speed"], "validity": stats["validity"]}
