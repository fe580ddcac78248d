"""The streaming decoder a config names, latents -> frames: `decoder: vae` is the Wan VAE of the base model
folder (as upstream), `decoder: taehv` the tiny TAEHV at `taehv_path` (reward_forcing/models/vae.py, taehv.py)."""
from pathlib import Path

from reward_forcing.checkpoints import asset_path
from reward_forcing.errors import ConfigError

WAN_VAE_FILE = "Wan2.1_VAE.pth"  # the file name inside a Wan2.1 model folder


def load_decoder(cfg, device, dtype):
    if cfg.decoder == "vae":
        from reward_forcing.models.vae import WanVAE
        path = asset_path(cfg, Path(cfg.model_name) / WAN_VAE_FILE)
        return WanVAE.from_file(path, cfg.vae, device=device, dtype=dtype)
    if cfg.decoder == "taehv":
        from reward_forcing.models.taehv import TAEHV
        return TAEHV.from_file(asset_path(cfg, cfg.taehv_path), device=device, dtype=dtype)
    raise ConfigError(f"decoder must be 'vae' or 'taehv', got '{cfg.decoder}'")
