"""The decoder a config names, latents -> frames: `decoder: vae` is the Wan VAE of the base model folder (as
upstream), `decoder: taehv` the tiny TAEHV at `taehv_path` (reward_forcing/models/vae.py, taehv.py), `decoder: none`
the latents themselves (latent worlds without a VAE, e.g. reward_forcing/miniworld)."""
from pathlib import Path

import torch

from reward_forcing.checkpoints import asset_path

WAN_VAE_FILE = "Wan2.1_VAE.pth"  # the file name inside a Wan2.1 model folder


class IdentityDecoder:
    """`decoder: none`: the latents are the video."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def wan_vae(cfg, device, dtype):
    """The Wan VAE of the base model folder `model_name`, shaped by the `vae:` settings."""
    from reward_forcing.models.vae import WanVAE

    path = asset_path(cfg.checkpoint_dir, Path(cfg.model_name) / WAN_VAE_FILE)
    return WanVAE.from_file(path, cfg.vae, device=device, dtype=dtype)


def load_decoder(cfg, device, dtype):
    if cfg.decoder == "none":
        return IdentityDecoder()
    if cfg.decoder == "vae":
        return wan_vae(cfg, device, dtype)
    from reward_forcing.models.taehv import TAEHV  # decoder: taehv
    return TAEHV.from_file(asset_path(cfg.checkpoint_dir, cfg.taehv_path), device=device, dtype=dtype)
