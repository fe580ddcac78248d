"""What a Re-DMD reward is: per-sample scores of a batch of generated videos (Reward Forcing, arXiv
2512.04678 §3.3, where VideoReward's motion-quality score weights the DMD gradient by exp(beta * r)).

A reward states what it reads (`input`): decoded `pixels` [B, 3, T, H, W] in [-1, 1], or the generator's
`latents` [B, C, F, h, w]; whether its scores carry gradient back to that input (`differentiable`); and the
names of the per-sample scores it returns (`keys`). Calling it on latents decodes them first when it reads
pixels, so a trainer only ever hands over its rollout. reward_forcing.rewards.registry builds one from the
config's `reward:` section through the scorer's classmethod `from_settings(reward, checkpoint_dir, fps, info, dtype,
decoder)`: the `reward:` settings, the folder its weights live under, the videos' frame rate, the rank's DistInfo,
the compute dtype and the decoder (pixel rewards).
"""
import contextlib
from abc import ABC, abstractmethod

import torch

INPUTS = ("pixels", "latents")


class Reward(ABC):
    input: str = "pixels"          # "pixels" | "latents"
    differentiable: bool = False   # scores carry gradient to the input
    keys: tuple = ()               # names of the per-sample scores returned

    def __init__(self, decoder=None):
        """decoder: what turns latents into pixels (WanVAE, TAEHV, IdentityDecoder); unused by latent rewards."""
        if self.input not in INPUTS:
            raise ValueError(f"{type(self).__name__}.input must be one of {INPUTS}, not {self.input!r}")
        if self.input == "pixels" and decoder is None:
            raise ValueError(f"{type(self).__name__} reads pixels and needs a decoder")
        self.decoder = decoder

    @abstractmethod
    def score(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        """{key: tensor [B]} for every key in `keys`, from `videos` as `input` describes them."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents).clamp(-1, 1)

    def __call__(self, latents: torch.Tensor, prompts: list[str]) -> dict:
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            videos = latents if self.input == "latents" else self.decode(latents)
            return self.score(videos, prompts)
