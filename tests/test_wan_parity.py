"""WanModel vs diffusers WanTransformer3DModel, fp32, all parameters randomised."""
import pytest
import torch
from diffusers import WanTransformer3DModel

from reward_forcing.errors import ConfigError
from reward_forcing.models.wan import WanModel, diffusers_config, diffusers_to_wan_state_dict, wan_to_diffusers_state_dict
from reward_forcing.testing.wan_parity import TINY, Fp64Sinusoid, init_fan_in_normal_

HEAD128 = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=1, in_dim=4, out_dim=4, text_dim=24, text_len=16,
               freq_dim=256)


def make_pair(cfg):
    ours = WanModel(**cfg).eval()
    init_fan_in_normal_(ours)
    ref = WanTransformer3DModel(**diffusers_config(cfg)).eval()
    ref.load_state_dict(wan_to_diffusers_state_dict(ours.state_dict()), strict=True)
    ref.condition_embedder.timesteps_proj = Fp64Sinusoid(cfg["freq_dim"])
    return ours, ref


@pytest.mark.parametrize("cfg", [TINY, HEAD128], ids=["tiny", "head_dim128"])
def test_matches_diffusers(cfg):
    ours, ref = make_pair(cfg)
    x = torch.randn(2, cfg["in_dim"], 3, 4, 6)
    context = torch.randn(2, cfg["text_len"] - 5, cfg["text_dim"])
    padded = torch.nn.functional.pad(context, (0, 0, 0, 5))
    for t in ([1.0, 999.0], [500.0, 873.1234]):
        t = torch.tensor(t)
        with torch.no_grad():
            got = ours(x, t, context)
            want = ref(x, t, padded, return_dict=False)[0]
        assert got.shape == x.shape
        assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
        assert want.abs().max() > 0.1  # a dead head would make the comparison vacuous


def test_unpadded_context_differs():
    # The padding is part of the model: diffusers fed the unpadded context gives clearly different output.
    ours, ref = make_pair(TINY)
    x, t, context = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 6, TINY["text_dim"])
    with torch.no_grad():
        assert (ours(x, t, context) - ref(x, t, context, return_dict=False)[0]).abs().max() > 1e-3


def test_state_dict_keys_convert_both_ways():
    ours = WanModel(**TINY)
    ref = WanTransformer3DModel(**diffusers_config(ours))
    ours_keys, ref_keys = set(ours.state_dict()), set(ref.state_dict())
    assert set(wan_to_diffusers_state_dict(dict.fromkeys(ours_keys))) == ref_keys
    assert set(diffusers_to_wan_state_dict(dict.fromkeys(ref_keys))) == ours_keys
    assert "blocks.0.norm3.weight" in ours_keys and "blocks.0.norm2.weight" in ref_keys
    # 27 tensors per block + 15 top level (Wan2.1's model.py); no RoPE table in the state dict
    assert len(ours_keys) == 27 * TINY["num_layers"] + 15


def test_from_config_and_bad_config():
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", **TINY}
    model = WanModel.from_config(cfg)
    assert model.blocks[0].ffn[0].out_features == TINY["ffn_dim"]
    assert diffusers_config(cfg) == diffusers_config(model)
    with pytest.raises(ConfigError, match="unknown"):
        WanModel.from_config({**cfg, "dimm": 3})
    with pytest.raises(ConfigError, match="model_type"):
        WanModel.from_config({**cfg, "model_type": "i2v"})


def test_bf16_autocast_keeps_fp32_islands():
    ours = WanModel(**TINY)
    init_fan_in_normal_(ours)
    x, t, context = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 6, TINY["text_dim"])
    with torch.no_grad():
        want = ours(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x, t, context)
            e, e0 = ours.embed_time(t.view(1, 1))
    assert got.dtype == torch.float32 and e.dtype == torch.float32 and e0.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("cfg,params,tensors", [
    ({}, 1_418_996_800, 825),
    (dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), 14_288_491_584, 1095),
], ids=["1.3B", "14B"])
def test_real_sizes_match_published_counts(cfg, params, tensors):
    with torch.device("meta"):  # shapes only, no memory
        model = WanModel(**cfg)
    sd = model.state_dict()
    assert len(sd) == tensors
    assert sum(v.numel() for v in sd.values()) == params


def test_diffusers_single_file_loader_reads_our_keys(tmp_path):
    """diffusers' own original-Wan converter (from_single_file) accepts our state dict and reproduces our output."""
    from safetensors.torch import save_file
    import json

    ours, _ = make_pair(TINY)
    save_file(ours.state_dict(), tmp_path / "wan.safetensors")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(
        {"_class_name": "WanTransformer3DModel", **diffusers_config(ours)}))
    ref = WanTransformer3DModel.from_single_file(str(tmp_path / "wan.safetensors"), config=str(tmp_path / "cfg"),
                                                 torch_dtype=torch.float32).eval()
    ref.condition_embedder.timesteps_proj = Fp64Sinusoid(TINY["freq_dim"])
    x, t, context = torch.randn(1, 4, 2, 4, 4), torch.tensor([250.0]), torch.randn(1, TINY["text_len"], 24)
    with torch.no_grad():
        assert (ours(x, t, context) - ref(x, t, context, return_dict=False)[0]).abs().max() <= 1e-5
