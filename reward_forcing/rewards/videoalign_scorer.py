"""`reward: {name: videoalign}`: VideoAlign's VideoReward on VAE-decoded pixels, the reward of Reward Forcing
(arXiv 2512.04678 §3.3; upstream drives Re-DMD with its normalised motion quality, `MQ_norm`).

`reward_placement: rank0` gathers every rank's decoded videos to rank 0, scores them there one rank's
batch at a time and scatters the scores back, so only one rank holds the 2B reward model;
`every_rank` scores locally.
"""
import torch
import torch.distributed as dist

from reward_forcing.checkpoints import asset_path
from reward_forcing.errors import ConfigError
from reward_forcing.rewards.base import Reward
from reward_forcing.rewards.videoalign import DIMENSIONS

PLACEMENTS = ("rank0", "every_rank")


class VideoAlignReward(Reward):
    input = "pixels"
    keys = tuple(f"{name}{suffix}" for suffix in ("", "_norm") for name in (*DIMENSIONS, "Overall"))

    def __init__(self, model, decoder, fps: float, info=None, central: bool = False):
        """model: a VideoReward (None on ranks other than 0 when central); info: the DistInfo when central."""
        super().__init__(decoder)
        self.model, self.fps, self.info, self.central = model, fps, info, central

    @classmethod
    def from_config(cls, cfg, info, dtype, decoder):
        from reward_forcing.rewards.videoalign import VideoReward
        from reward_forcing.training.parallel import on_main

        if cfg.reward_placement not in PLACEMENTS:
            raise ConfigError(f"reward_placement must be rank0 or every_rank; got '{cfg.reward_placement}'")
        central = cfg.reward_placement == "rank0" and info.world_size > 1

        def load():
            return VideoReward.from_checkpoint(asset_path(cfg, cfg.reward_dir), asset_path(cfg, cfg.reward_base_dir),
                                               device=info.device, dtype=dtype,
                                               verify_template=bool(cfg.reward_check_template))

        return cls(on_main(load, info) if central else load(), decoder, float(cfg.fps), info, central)

    def _score_here(self, videos, prompts) -> torch.Tensor:
        out = self.model.score(videos, prompts, input_range="[-1,1]", fps=self.fps)
        return torch.stack([out[k].float() for k in self.keys], dim=1)  # [B, len(keys)]

    def score(self, videos, prompts) -> dict:
        if not self.central:
            scores = self._score_here(videos, prompts)
        else:
            world, main = self.info.world_size, self.info.is_main
            gathered = [torch.empty_like(videos) for _ in range(world)] if main else None
            dist.gather(videos.contiguous(), gathered, dst=0)
            all_prompts = [None] * world if main else None
            dist.gather_object(prompts, all_prompts, dst=0)
            scores = torch.empty(len(prompts), len(self.keys), device=videos.device)
            chunks = None
            if main:  # one rank's batch at a time, so rank 0's activations do not grow with the world size
                chunks = [self._score_here(v, p).to(videos.device) for v, p in zip(gathered, all_prompts)]
            dist.scatter(scores, chunks, src=0)
        return {key: scores[:, i] for i, key in enumerate(self.keys)}
