"""A differentiable reward on chosen frames of a rollout's latents, for reward feedback (arXiv 2601.16933):
`trainer: reward_feedback` (reward_forcing/training/reward_feedback.py) and the `reward.feedback_weight` term of
distillation (reward_forcing/training/distill.py).

`reward.frame`: `last` (the paper's choice), `random` (one frame per video, drawn from a keyed stream, the
paper's ablation), `all` (every frame, mean score; decodes the whole video with gradient). Only what the scored
frame needs is decoded with gradient: the Wan VAE's decoder is causal, so the latents before the frame's latent
fill its feature cache without gradient and that latent alone is decoded with it (decoder activations for one
latent, 4 frames). A latent reward (no decoder, e.g. the miniature world's blob_quality,
reward_forcing/miniworld/blob_reward.py) picks among the latent frames themselves: the chosen latent frame alone,
as a one-frame video, or the whole latent video for `all`.
"""

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.rng import keyed_randint

DIFFERENTIABLE_EXAMPLES = ("imagereward", "blob_quality")  # what the refusals of a non-differentiable reward suggest


def temporal_factor(vae_cfg) -> int:
    """Pixel frames per latent after the first (Wan VAE: 1 + 4(T - 1) frames from T latents)."""
    return 2 ** sum(bool(x) for x in vae_cfg["temperal_downsample"])


def frame_location(frame: int, factor: int) -> tuple[int, int]:
    """(latent index, position among that latent's decoded frames) of pixel frame `frame`."""
    return (0, 0) if frame == 0 else ((frame - 1) // factor + 1, (frame - 1) % factor)


def choose_frames(choice: str, num_pixel_frames: int, seed: int, step: int, sample_ids) -> list | None:
    """The pixel frame each sample is scored on (None = all); `random` draws per global sample index, so the
    draw does not depend on how samples are spread over ranks."""
    if choice == "all":
        return None
    if choice == "last":
        return [num_pixel_frames - 1] * len(sample_ids)
    return [keyed_randint(num_pixel_frames, seed, "reward_frame", step, i) for i in sample_ids]


class FrameReward:
    """A differentiable reward (reward_forcing/rewards/base.py) on the frame(s) `reward.frame` picks from normalised
    latents [B, C, F, h, w]; per-sample scores [B] under `score_key`, differentiable in the latents. A pixel
    reward gets a one-frame video decoded by the Wan VAE (all frames for `all`); a latent reward gets the chosen
    latent frame as a one-frame video [B, C, 1, h, w] (the whole latents for `all`): its frames are the latents'."""

    def __init__(self, reward, score_key: str, vae_cfg):
        if not reward.differentiable:
            raise ConfigError(f"reward feedback needs a differentiable reward; {type(reward).__name__} is not "
                              f"(use reward.name={' or '.join(DIFFERENTIABLE_EXAMPLES)})")
        if reward.input == "pixels" and not hasattr(reward.decoder, "stream_decoder"):
            raise ConfigError("reward feedback decodes through the Wan VAE's causal decoder: set decoder=vae")
        self.reward, self.score_key = reward, score_key
        self.factor = temporal_factor(vae_cfg) if reward.input == "pixels" else 1  # no decoder, no upsampling

    @classmethod
    def from_config(cls, cfg, info, dtype) -> "FrameReward":
        """The `reward:` section's scorer (trainer reward_feedback)."""
        from reward_forcing.training.networks import configured_reward

        return cls(configured_reward(cfg, info, dtype), cfg.reward.score_key, cfg.vae)

    @classmethod
    def imagereward(cls, cfg, info, dtype) -> "FrameReward":
        """ImageReward on Wan VAE pixels, whatever the `reward:` section names (it drives Re-DMD's weight)."""
        from reward_forcing.models.decoder import wan_vae
        from reward_forcing.rewards.imagereward_scorer import ImageRewardReward

        vae = wan_vae(cfg, info.device, dtype)
        scorer = ImageRewardReward.from_settings(cfg.reward, cfg.checkpoint_dir, cfg.fps, info, dtype, vae)
        return cls(scorer, ImageRewardReward.keys[0], cfg.vae)

    def num_pixel_frames(self, num_latents: int) -> int:
        return 1 + self.factor * (num_latents - 1)

    def decode_latent(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """Pixels [B, 3, n, H, W] of latent `index`, with gradient to latents[:, :, index] only."""
        stream = self.reward.decoder.stream_decoder()
        if index > 0:
            stream.decode_chunk(latents[:, :, :index])  # fills the causal cache; no gradient
        return stream.decode_chunk(latents[:, :, index:index + 1], with_grad=True)

    def _score(self, videos, prompts) -> torch.Tensor:
        return self.reward.score(videos, prompts)[self.score_key]

    def __call__(self, latents: torch.Tensor, prompts: list[str], frames: list | None) -> torch.Tensor:
        if self.reward.input == "latents":
            if frames is None:
                return self._score(latents, prompts)
            chosen = torch.stack([latents[b, :, f] for b, f in enumerate(frames)])[:, :, None]  # [B, C, 1, h, w]
            return self._score(chosen, prompts)
        if frames is None:
            return self._score(self.reward.decoder.stream_decoder().decode_chunk(latents, with_grad=True), prompts)
        scores = [None] * len(frames)
        located = [frame_location(f, self.factor) for f in frames]
        for index in sorted({latent for latent, _ in located}):
            rows = [b for b, (latent, _) in enumerate(located) if latent == index]
            pixels = self.decode_latent(latents[rows], index)
            videos = torch.stack([pixels[j, :, located[b][1]] for j, b in enumerate(rows)])[:, :, None]
            for b, score in zip(rows, self._score(videos, [prompts[b] for b in rows])):
                scores[b] = score
        return torch.stack(scores)
