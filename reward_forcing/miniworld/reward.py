"""`reward: {name: latent_motion}`: the miniature world's motion score, read from latents by its detector.

    speed     the track's least-squares velocity, pixels per latent frame (reward_forcing/miniworld/detector.py):
              a blob that only jitters in place is not paid for the jitter
    validity  fraction of frames that hold one valid blob
    motion    validity x speed / max_speed: the speed as a fraction of the world's fastest data, counted only
              as far as the frames show a valid blob (a student that dissolves the blob into noise, whose
              centroid jumps about, is not paid for it)
    motion_norm  validity x speed standardised by the data's speed distribution (uniform on [0, max_speed]: mean
              max_speed / 2, standard deviation max_speed / sqrt(12)); the counterpart of VideoReward's MQ_norm,
              which upstream's Re-DMD weights by. A score in standard units gives reward.beta the same meaning as
              there: at beta 4, two samples one data standard deviation apart differ in weight by e^4. On the raw
              `motion` scale students slower than the data span a few tenths, and beta 4 moved their weights by a
              factor of about 2 (min 1.19, max 2.38 over a batch of 8)
It plays the role VideoReward's motion quality plays in Reward Forcing (arXiv 2512.04678 §3.3): Re-DMD
weights each rollout's DMD gradient by exp(beta * motion).
"""
import math

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.detector import video_stats
from reward_forcing.miniworld.world import World
from reward_forcing.rewards.base import Reward


class LatentMotionReward(Reward):
    input = "latents"
    keys = ("motion", "motion_norm", "speed", "validity")

    def __init__(self, world: World):
        super().__init__()
        self.world = world

    @classmethod
    def from_settings(cls, reward, checkpoint_dir=None, fps=None, info=None, dtype=None, decoder=None):
        if not reward.world_path:
            raise ConfigError("reward 'latent_motion' needs reward.world_path=<world.json of a miniworld dataset>")
        return cls(World.from_file(reward.world_path))

    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        stats = video_stats(self.world, videos)
        top = self.world.spec.max_speed
        paid = stats["validity"] * stats["speed"]
        return {"motion": paid / top, "motion_norm": (paid - top / 2) / (top / math.sqrt(12)), "speed": stats["speed"],
                "validity": stats["validity"]}
