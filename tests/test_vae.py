"""Wan VAE: Wan-layout weights through our converter vs diffusers' AutoencoderKLWan."""
import pytest
import torch
from diffusers import AutoencoderKLWan

from reward_forcing.errors import CheckpointError, ConfigError
from reward_forcing.models.vae import DiffusersVersionError, WanVAE, diffusers_to_wan_vae, wan_vae_to_diffusers
from reward_forcing.testing.assets import write_vae

CFG4 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
CFG16 = dict(CFG4, z_dim=16)
# Wan2.1's latent normalisation numbers (wan/modules/vae.py), typed here rather than read from diffusers.
MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def reference(cfg, sd):
    """diffusers model built here from the config, fed the diffusers-layout weights directly."""
    model = AutoencoderKLWan(base_dim=cfg["base_dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"],
                             num_res_blocks=2, temperal_downsample=cfg["temperal_downsample"],
                             latents_mean=[0.0] * cfg["z_dim"], latents_std=[1.0] * cfg["z_dim"])
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def vae4(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    sd = write_vae(path, CFG4, seed=1)
    return WanVAE.from_file(path, CFG4), reference(CFG4, sd), path


@pytest.mark.parametrize("diffusers_key, wan_key", [
    ("post_quant_conv.weight", "conv2.weight"),
    ("quant_conv.bias", "conv1.bias"),
    ("encoder.conv_in.weight", "encoder.conv1.weight"),
    ("encoder.down_blocks.3.conv_shortcut.weight", "encoder.downsamples.3.shortcut.weight"),
    ("encoder.down_blocks.5.time_conv.weight", "encoder.downsamples.5.time_conv.weight"),
    ("encoder.down_blocks.0.norm2.gamma", "encoder.downsamples.0.residual.3.gamma"),
    ("decoder.mid_block.resnets.1.conv2.bias", "decoder.middle.2.residual.6.bias"),
    ("decoder.mid_block.attentions.0.to_qkv.weight", "decoder.middle.1.to_qkv.weight"),
    ("decoder.norm_out.gamma", "decoder.head.0.gamma"),
    ("decoder.up_blocks.1.resnets.0.conv_shortcut.weight", "decoder.upsamples.4.shortcut.weight"),
    ("decoder.up_blocks.3.resnets.2.conv1.weight", "decoder.upsamples.14.residual.2.weight"),
    ("decoder.up_blocks.1.upsamplers.0.time_conv.weight", "decoder.upsamples.7.time_conv.weight"),
    ("decoder.up_blocks.2.upsamplers.0.resample.1.weight", "decoder.upsamples.11.resample.1.weight"),
    ("decoder.up_blocks.0.upsamplers.0.resample.1.bias", "decoder.upsamples.3.resample.1.bias"),
])
def test_key_table(diffusers_key, wan_key, vae4):
    sd = vae4[1].state_dict()
    assert diffusers_to_wan_vae(sd)[wan_key] is sd[diffusers_key]


def test_inverse_converter_round_trips_through_diffusers_converter(vae4):
    sd = vae4[1].state_dict()
    wan = diffusers_to_wan_vae(sd)
    assert len(wan) == len(sd)
    back = wan_vae_to_diffusers(wan)  # diffusers' own single-file converter
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_decode_and_encode_bit_exact_vs_diffusers(vae4):
    ours, ref, _ = vae4
    z = torch.randn(1, 4, 4, 4, 6)
    expected = ref.decode(z).sample
    assert expected.shape == (1, 3, 13, 32, 48)
    assert (ours.decode(z) - expected).abs().max() == 0
    z = torch.randn(1, 4, 3, 2, 3)  # at this size diffusers' all-frames post_quant_conv rounds differently
    assert torch.allclose(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)
    pixels = torch.rand(1, 3, 13, 32, 48) * 2 - 1
    assert (ours.encode(pixels) - ref.encode(pixels).latent_dist.mode()).abs().max() == 0


def test_normalisation_uses_wan_statistics_outside_the_model(tmp_path):
    sd = write_vae(tmp_path / "vae.pth", CFG16, seed=2)
    ours, ref = WanVAE.from_file(tmp_path / "vae.pth", CFG16), reference(CFG16, sd)
    mean, std = torch.tensor(MEAN).view(1, 16, 1, 1, 1), torch.tensor(STD).view(1, 16, 1, 1, 1)
    pixels = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mu = ref.encode(pixels).latent_dist.mode()
    assert torch.allclose(ours.encode(pixels), (mu - mean) / std, atol=1e-6, rtol=0)
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.allclose(ours.decode(z), ref.decode(z * std + mean).sample, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunks", [[1, 3, 2], [3, 3], [1, 1, 1, 1, 1, 1]])
def test_streaming_decode_equals_full_decode(vae4, chunks):
    ours = vae4[0]
    z = torch.randn(1, 4, sum(chunks), 2, 3)
    full = ours.decode(z)
    assert full.shape[2] == 1 + 4 * (sum(chunks) - 1)
    stream = ours.stream_decoder()
    parts, start = [], 0
    for n in chunks:
        parts.append(stream.decode_chunk(z[:, :, start:start + n]))
        start += n
        if len(parts) == 1:
            ours.decode(torch.randn_like(z[:, :, :2]))  # an unrelated decode in between must not disturb the stream
    assert [p.shape[2] for p in parts] == [4 * chunks[0] - 3] + [4 * n for n in chunks[1:]]
    assert (torch.cat(parts, dim=2) - full).abs().max() == 0


def test_errors(vae4, tmp_path, monkeypatch):
    ours, _, path = vae4
    with pytest.raises(ConfigError, match="num_res_blocks"):
        WanVAE.from_file(path, dict(CFG4, num_res_blocks=1))
    with pytest.raises(CheckpointError, match="shape"):
        WanVAE.from_file(path, CFG16)
    with pytest.raises(CheckpointError, match="not found"):
        WanVAE.from_file(tmp_path / "missing.pth", CFG4)
    monkeypatch.setattr(ours.vae.decoder, "forward", lambda x: x)
    with pytest.raises(DiffusersVersionError, match="feat_cache"):
        ours.stream_decoder()
    monkeypatch.undo()
    monkeypatch.delattr(type(ours.vae), "clear_cache")
    monkeypatch.delattr(ours.vae, "_feat_map")
    with pytest.raises(DiffusersVersionError, match="_feat_map"):
        ours.stream_decoder()
