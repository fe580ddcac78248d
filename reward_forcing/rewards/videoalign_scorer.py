"""`reward: {name: videoalign}`: VideoAlign's VideoReward on VAE-decoded pixels, the reward of Reward Forcing
(arXiv 2512.04678 §3.3; upstream drives Re-DMD with its normalised motion quality, `MQ_norm`).

`reward.placement: rank0` gathers every rank's decoded videos to rank 0, scores them there one rank's
batch at a time and scatters the scores back, so only one rank holds the 2B reward model;
`every_rank` scores locally.

`reward.input: native` scores every sample as VideoAlign was trained: [0, 255] pixels sampled at its 2 fps.
`reward.input: upstream` scores as the run behind the released weights did (model/re_dmd.py with
videoalign/wan_inference.py `reward_from_frames` in JaydenLyh/Reward-Forcing): `255 * x` of the [-1, 1] pixels,
read as if in [0, 255] (so in [-255, 255], resized as floats, never clamped), all frames, and sample 0 of each
rank's batch only, whose scores weight the whole batch.
"""
import torch
import torch.distributed as dist

from reward_forcing.checkpoints import asset_path
from reward_forcing.distributed import on_main
from reward_forcing.rewards.base import Reward
from reward_forcing.rewards.videoalign import DIMENSIONS


class VideoAlignReward(Reward):
    input = "pixels"
    keys = tuple(f"{name}{suffix}" for suffix in ("", "_norm") for name in (*DIMENSIONS, "Overall"))

    def __init__(self, model, decoder, fps: float, info=None, central: bool = False, reward_input: str = "native"):
        """model: a VideoReward (None on ranks other than 0 when central); info: the DistInfo when central;
        reward_input: native | upstream (module docstring)."""
        super().__init__(decoder)
        self.model, self.fps, self.info, self.central = model, fps, info, central
        self.reward_input = reward_input

    @classmethod
    def from_settings(cls, reward, checkpoint_dir, fps, info, dtype, decoder):
        from reward_forcing.rewards.videoalign import VideoReward

        central = reward.placement == "rank0" and info.world_size > 1

        def load():
            return VideoReward.from_checkpoint(asset_path(checkpoint_dir, reward.videoalign_dir),
                                               asset_path(checkpoint_dir, reward.qwen_dir), device=info.device,
                                               dtype=dtype, verify_template=bool(reward.check_template))

        return cls(on_main(load, info) if central else load(), decoder, float(fps), info, central, str(reward.input))

    def _score_here(self, videos, prompts) -> torch.Tensor:
        """[B, len(keys)] scores of one rank's batch."""
        if self.reward_input == "upstream":
            out = self.model.score(255.0 * videos[:1], prompts[:1], input_range="[0,255]", fps=self.fps, sample="all",
                                   quantise=False)
            return self._stack(out).repeat(len(prompts), 1)  # sample 0's scores for every sample
        return self._stack(self.model.score(videos, prompts, input_range="[-1,1]", fps=self.fps))

    def _stack(self, out: dict) -> torch.Tensor:
        return torch.stack([out[k].float() for k in self.keys], dim=1)

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
