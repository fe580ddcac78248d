"""TAEHV (madebyollin/taehv): sizes of taew2_1, temporal layer semantics, parallel == streaming, file round trip."""
import pytest
import torch
from torch import nn

from reward_forcing.errors import CheckpointError
from reward_forcing.models.taehv import TAEHV, TGrow, TPool, _run_parallel
from reward_forcing.testing.assets import write_taehv

TINY = dict(latent_channels=16, encoder_width=8, decoder_widths=(16, 8, 8, 8))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    sd = write_taehv(path, **TINY, seed=4)
    return path, sd


def test_default_sizes_match_taew2_1():
    with torch.device("meta"):
        model = TAEHV()
    assert len(model.state_dict()) == 128
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_470_928
    assert sum(p.numel() for p in model.decoder.parameters()) == 9_844_611
    assert all(k.split(".")[0] in ("encoder", "decoder") and k.split(".")[1].isdigit() for k in model.state_dict())


def test_temporal_layers_hand_computed():
    grow = TGrow(1, 2)
    grow.conv.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    frames = torch.tensor([3.0, 5.0]).view(1, 2, 1, 1, 1)  # [N, T, C, H, W]
    assert _run_parallel(nn.Sequential(grow), frames).flatten().tolist() == [3.0, 6.0, 5.0, 10.0]
    pool = TPool(1, 2)
    pool.conv.weight.data = torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    frames = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1, 1)
    assert _run_parallel(nn.Sequential(pool), frames).flatten().tolist() == [21.0, 43.0]


def test_shapes(tiny_file):
    model = TAEHV.from_file(tiny_file[0])
    pixels = model.decode(torch.randn(1, 16, 5, 8, 12))  # NTCHW 1x5x16x8x12 in taehv.py's NTCHW order
    assert pixels.shape == (1, 3, 17, 64, 96)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert model.encode(pixels).shape == (1, 16, 5, 8, 12)  # 17 frames -> 5 latents


def test_encode_end_pads_with_last_frame(tiny_file):
    model = TAEHV.from_file(tiny_file[0])
    pixels = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    padded = torch.cat([pixels] + [pixels[:, :, -1:]] * 3, dim=2)
    assert torch.equal(model.encode(pixels), model.encode(padded))


def test_encode_pad_front_mirrors_decodes_trim(tiny_file):
    """pad_front: 17 frames get 3 copies of frame 0 in front (latent j sees frames 4j-3..4j, as decode's trim
    puts them); a single picture is 4 copies of itself either way."""
    model = TAEHV.from_file(tiny_file[0])
    pixels = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    front = torch.cat([pixels[:, :, :1]] * 3 + [pixels], dim=2)
    assert torch.equal(model.encode(pixels, pad_front=True), model.encode(front))
    assert not torch.equal(model.encode(pixels, pad_front=True), model.encode(pixels))
    picture = pixels[:, :, :1]
    assert torch.equal(model.encode(picture, pad_front=True), model.encode(picture.expand(-1, -1, 4, -1, -1)))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_streaming_equals_parallel_and_is_causal(tiny_file, dtype, tol):
    model = TAEHV.from_file(tiny_file[0], dtype=dtype)
    latents = torch.randn(1, 16, 5, 4, 6, dtype=dtype)
    full = model.decode(latents)
    stream = model.stream_decoder()
    parts = [stream.decode_chunk(latents[:, :, a:b]) for a, b in [(0, 1), (1, 3), (3, 5)]]
    assert [p.shape[2] for p in parts] == [1, 8, 8]
    assert (torch.cat(parts, dim=2) - full).abs().max() <= tol
    assert (model.decode(latents[:, :, :3]) - full[:, :, :9]).abs().max() <= tol  # no look-ahead


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip_128_keys(tmp_path, suffix):
    written = write_taehv(tmp_path / f"taew2_1{suffix}", **TINY, seed=5)
    loaded = TAEHV.from_file(tmp_path / f"taew2_1{suffix}").state_dict()
    assert len(written) == len(loaded) == 128
    assert all(torch.equal(written[k], loaded[k]) for k in written)


def test_wider_tgrow_keeps_last_rows(tiny_file):
    sd = dict(tiny_file[1])
    key = "decoder.7.conv.weight"  # TGrow(16, 1)
    sd[key] = torch.cat([torch.randn_like(sd[key]), tiny_file[1][key]])
    assert torch.equal(TAEHV.from_state_dict(sd).state_dict()[key], tiny_file[1][key])


def test_bad_checkpoints(tmp_path, tiny_file):
    with pytest.raises(CheckpointError, match="not a TAEHV checkpoint"):
        TAEHV.from_state_dict({"foo": torch.zeros(1)})
    sd = {k: v for k, v in tiny_file[1].items() if k != "decoder.3.conv.0.bias"}
    with pytest.raises(CheckpointError, match="missing"):
        TAEHV.from_state_dict(sd)
    with pytest.raises(CheckpointError, match="not found"):
        TAEHV.from_file(tmp_path / "none.pth")
