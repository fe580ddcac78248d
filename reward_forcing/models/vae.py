"""Wan2.1 VAE: `Wan2.1_VAE.pth` loaded into diffusers' AutoencoderKLWan, latent normalisation outside the model.

Latents handed to and from the rest of the project are normalised, (mu - mean) / std per channel
(as Wan2.1's wan/modules/vae.py).
mean/std are the diffusers `AutoencoderKLWan` defaults (Wan's numbers) when z_dim matches their length;
for any other z_dim (tiny test configs only) there are no trained statistics, so mean 0 / std 1 is used.
"""
import inspect
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from reward_forcing.errors import CheckpointError, ConfigError, UserError


class DiffusersVersionError(UserError):
    """The installed diffusers lacks the private AutoencoderKLWan cache the streaming decoder relies on."""


def wan_vae_to_diffusers(sd: dict) -> dict:
    """Wan VAE keys -> diffusers AutoencoderKLWan keys (diffusers' own single-file converter)."""
    return convert_wan_vae_to_diffusers(sd)


_RESNET_PARTS = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                 "conv2": "residual.6", "conv_shortcut": "shortcut"}
_TOP_PARTS = {"quant_conv": "conv1", "post_quant_conv": "conv2", "conv_in": "conv1",
              "norm_out.gamma": "head.0.gamma", "conv_out": "head.2"}


def _resnet_part(rest: str) -> str:
    for new, old in _RESNET_PARTS.items():
        if rest.startswith(new + ".") or rest == new:
            return old + rest[len(new):]
    raise CheckpointError(f"unexpected resnet key part '{rest}' in diffusers VAE state dict")


def _diffusers_key_to_wan(key: str, num_res_blocks: int) -> str:
    side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    prefix = side + "." if side else ""
    for new, old in _TOP_PARTS.items():
        if rest == new or rest.startswith(new + "."):
            return prefix + old + rest[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(.+)", rest):
        part = m.group(2) if m.group(2).startswith(("resample.", "time_conv.")) else _resnet_part(m.group(2))
        return f"{prefix}downsamples.{m.group(1)}.{part}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{prefix}middle.{2 * int(m.group(1))}.{_resnet_part(m.group(2))}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{prefix}middle.1.{m.group(1)}"
    # Wan's decoder is one flat list: per stage (num_res_blocks + 1) resnets, then the upsampler.
    stride = num_res_blocks + 2
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{prefix}upsamples.{int(m.group(1)) * stride + int(m.group(2))}.{_resnet_part(m.group(3))}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{prefix}upsamples.{int(m.group(1)) * stride + num_res_blocks + 1}.{m.group(2)}"
    raise CheckpointError(f"unexpected key '{key}' in diffusers VAE state dict")


def diffusers_to_wan_vae(sd: dict, num_res_blocks: int = 2) -> dict:
    """diffusers AutoencoderKLWan keys -> Wan VAE keys (inverse of `wan_vae_to_diffusers`)."""
    return {_diffusers_key_to_wan(k, num_res_blocks): v for k, v in sd.items()}


def latent_stats(z_dim: int) -> tuple[list, list]:
    """Per-channel (mean, std): diffusers' Wan defaults when their length is z_dim, else identity."""
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    mean, std = list(params["latents_mean"].default), list(params["latents_std"].default)
    if len(mean) == z_dim:
        return mean, std
    return [0.0] * z_dim, [1.0] * z_dim


def build_autoencoder(vae_cfg) -> AutoencoderKLWan:
    """AutoencoderKLWan from the `vae` config section, randomly initialised."""
    if vae_cfg["num_res_blocks"] != 2 or len(vae_cfg["dim_mult"]) != 4:
        raise ConfigError("vae: the Wan VAE layout needs num_res_blocks=2 and 4 dim_mult stages "
                          f"(got {vae_cfg['num_res_blocks']} and {list(vae_cfg['dim_mult'])})")
    mean, std = latent_stats(vae_cfg["z_dim"])
    return AutoencoderKLWan(base_dim=vae_cfg["base_dim"], z_dim=vae_cfg["z_dim"], dim_mult=list(vae_cfg["dim_mult"]),
                            num_res_blocks=vae_cfg["num_res_blocks"],
                            temperal_downsample=list(vae_cfg["temperal_downsample"]),
                            latents_mean=mean, latents_std=std)


def _check_private_cache_api(vae: AutoencoderKLWan):
    params = inspect.signature(vae.decoder.forward).parameters
    if hasattr(vae, "clear_cache"):
        vae.clear_cache()
    if not all(name in params for name in ("feat_cache", "feat_idx", "first_chunk")) or \
            not isinstance(getattr(vae, "_feat_map", None), list):
        import diffusers
        raise DiffusersVersionError(
            f"diffusers {diffusers.__version__}: AutoencoderKLWan lacks clear_cache()/_feat_map or the "
            "decoder's feat_cache/feat_idx/first_chunk arguments needed for streaming decode; install diffusers 0.42")


class WanVAE(torch.nn.Module):
    """Normalised-latent interface over AutoencoderKLWan: pixels [B,3,T,H,W] in [-1,1] <-> latents [B,C,F,h,w]."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        c = vae.config
        self.register_buffer("mean", torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path, vae_cfg, device="cpu", dtype=torch.float32):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"VAE weights not found: {path}")
        try:
            wan_sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or non-zip files raise a variety of errors
            raise CheckpointError(f"cannot read VAE weights {path}: {str(err).splitlines()[0]}") from None
        vae = build_autoencoder(vae_cfg)
        sd = wan_vae_to_diffusers(wan_sd)
        expected = vae.state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"VAE weights {path} do not match the vae config: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        bad = [k for k in sd if sd[k].shape != expected[k].shape]
        if bad:
            raise CheckpointError(f"VAE weight '{bad[0]}' has shape {tuple(sd[bad[0]].shape)}, "
                                  f"config expects {tuple(expected[bad[0]].shape)}")
        vae.load_state_dict(sd, strict=True)
        vae = vae.to(device) if dtype == torch.float32 else vae.to(device=device, dtype=dtype)
        return cls(vae.eval().requires_grad_(False))

    def normalise(self, z):
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalise(self, latents):
        return latents * self.std.to(latents) + self.mean.to(latents)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean, normalised. Frames beyond the last 1 + 4k are dropped, as in Wan."""
        mu = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return self.normalise(mu)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole video through the streaming path, so a chunked decode reproduces it bit for bit (diffusers'
        `decode` runs post_quant_conv on all frames at once, which can differ by ~5e-6 at some sizes)."""
        return self.stream_decoder().decode_chunk(latents)

    def stream_decoder(self) -> "StreamingVAEDecoder":
        return StreamingVAEDecoder(self)


class StreamingVAEDecoder:
    """Decodes one video chunk by chunk with the VAE's causal conv cache: 1 frame for the first latent, then 4
    per latent, bit-identical to `WanVAE.decode` of the whole latent video. One instance per video; the cache
    list is the stream's own, so other decodes on the same VAE in between do not disturb it."""

    def __init__(self, wan_vae: WanVAE):
        self.wan_vae = wan_vae
        _check_private_cache_api(wan_vae.vae)
        self.feat_map = list(wan_vae.vae._feat_map)  # one empty slot per causal conv, sized by clear_cache()
        self.frames_seen = 0

    def decode_chunk(self, latents: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
        """with_grad: keep the graph from these latents to the pixels (reward feedback); the cached features of
        earlier chunks enter as constants when those were decoded without it."""
        vae = self.wan_vae.vae
        with torch.set_grad_enabled(with_grad):
            z = self.wan_vae.denormalise(latents.to(vae.dtype))
            outs = []
            for i in range(z.shape[2]):
                # post_quant_conv frame by frame: its result must not depend on how the video was chunked
                x = vae.post_quant_conv(z[:, :, i:i + 1])
                outs.append(vae.decoder(x, feat_cache=self.feat_map, feat_idx=[0], first_chunk=self.frames_seen == 0))
                self.frames_seen += 1
            return torch.cat(outs, dim=2).clamp(-1.0, 1.0)
