"""Every checkpoint layout loads into the student with identical weights; every broken one is one CheckpointError."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from reward_forcing.checkpoints import (
    asset_path,
    load_generator_state_dict,
    load_into,
    load_wan_folder,
    strip_prefixes,
)
from reward_forcing.errors import CheckpointError


class WanLike(torch.nn.Module):
    """Original Wan key names and shapes in miniature (patch embedding, one block, head)."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch_embedding = torch.nn.Conv3d(4, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        block = torch.nn.Module()
        block.self_attn = torch.nn.Module()
        block.self_attn.q = torch.nn.Linear(dim, dim)
        block.modulation = torch.nn.Parameter(torch.randn(1, 6, dim))
        self.blocks = torch.nn.ModuleList([block])
        self.head = torch.nn.Module()
        self.head.head = torch.nn.Linear(dim, 16)

    def forward(self, x):
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        block = self.blocks[0]
        tokens = tokens + block.self_attn.q(tokens) * block.modulation[:, 0]
        return self.head.head(tokens)


def new_model(seed):
    torch.manual_seed(seed)
    return WanLike().eval()


@pytest.fixture
def source():
    """A model with its own random weights, and an input on which to compare outputs."""
    return new_model(1), torch.randn(1, 4, 2, 4, 4)


def prefixed(state_dict, prefix):
    return {prefix + key: value.clone() for key, value in state_dict.items()}


def fsdp_wrapped(state_dict):
    """Key names as FSDP1 + activation checkpointing + torch.compile leave them inside a `model.` wrapper."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            head, index, rest = key.split(".", 2)
            key = f"{head}.{index}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        out[f"model._fsdp_wrapped_module._orig_mod.{key}"] = value.clone()
    return out


def write_file(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_loads_identically(path, source_model, x, use_ema=False):
    student = new_model(2)
    assert not torch.equal(student.head.head.weight, source_model.head.head.weight)
    load_into(student, load_generator_state_dict(path, use_ema=use_ema), str(path))
    for key, value in source_model.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(student(x), source_model(x))


def test_flat_file_with_and_without_use_ema(tmp_path, source):
    model, x = source
    path = write_file(tmp_path, "flat.pt", {k: v.clone() for k, v in model.state_dict().items()})
    assert_loads_identically(path, model, x)
    assert_loads_identically(path, model, x, use_ema=True)


def test_released_model_prefixed_flat_file_with_use_ema(tmp_path, source):
    # The release README passes --use_ema with the flat `model.`-prefixed rewardforcing.pt.
    model, x = source
    path = write_file(tmp_path, "rewardforcing.pt", prefixed(model.state_dict(), "model."))
    assert_loads_identically(path, model, x, use_ema=True)
    assert_loads_identically(path, model, x, use_ema=False)


def test_generator_section_as_in_ode_init(tmp_path, source):
    model, x = source
    path = write_file(tmp_path, "ode_init.pt", {"generator": prefixed(model.state_dict(), "model.")})
    assert_loads_identically(path, model, x)


def test_use_ema_selects_generator_ema(tmp_path, source):
    model, x = source
    other = new_model(3)
    checkpoint = {
        "generator": prefixed(other.state_dict(), "model."),
        "generator_ema": prefixed(model.state_dict(), "model."),
        "critic": prefixed(other.state_dict(), "model."),
    }
    path = write_file(tmp_path, "model.pt", checkpoint)
    assert_loads_identically(path, model, x, use_ema=True)
    assert_loads_identically(path, other, x, use_ema=False)


def test_fsdp_checkpoint_wrapper_and_compile_segments_are_stripped(tmp_path, source):
    model, x = source
    path = write_file(tmp_path, "model.pt", {"generator": fsdp_wrapped(model.state_dict())})
    assert_loads_identically(path, model, x)


def test_comfyui_prefix_and_safetensors_file(tmp_path, source):
    model, x = source
    path = tmp_path / "comfy.safetensors"
    save_file(prefixed(model.state_dict(), "model.diffusion_model."), str(path))
    assert_loads_identically(path, model, x)


def test_strip_prefixes_table():
    names = {
        "model.blocks.0.self_attn.q.weight": "blocks.0.self_attn.q.weight",
        "model.diffusion_model.head.head.bias": "head.head.bias",
        "_orig_mod.patch_embedding.weight": "patch_embedding.weight",
        "model._fsdp_wrapped_module.blocks.3._checkpoint_wrapped_module.ffn.0.weight": "blocks.3.ffn.0.weight",
        "blocks.1.modulation": "blocks.1.modulation",
    }
    out = strip_prefixes({key: torch.zeros(1) for key in names})
    assert sorted(out) == sorted(names.values())


def write_wan_folder(folder, model, shards):
    folder.mkdir()
    config = {"_class_name": "WanModel", "dim": 8, "num_layers": 1}
    (folder / "config.json").write_text(json.dumps(config))
    state_dict = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
        return config
    keys = sorted(state_dict)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state_dict[key] for key in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({key: name for key in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return config


@pytest.mark.parametrize("shards", [1, 3])
def test_wan_folder_single_file_and_sharded(tmp_path, source, shards):
    model, x = source
    folder = tmp_path / "Wan2.1-T2V"
    config = write_wan_folder(folder, model, shards)
    read_config, state_dict = load_wan_folder(folder)
    assert read_config == config
    assert_loads_identically(folder, model, x)
    assert sorted(state_dict) == sorted(model.state_dict())


def assert_one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_key_is_named(tmp_path, source):
    model, _ = source
    state_dict = dict(model.state_dict())
    del state_dict["blocks.0.self_attn.q.bias"]
    state_dict["blocks.0.extra.weight"] = torch.zeros(2)
    message = assert_one_line_error(
        "1 missing", load_into, new_model(2), state_dict, "ckpt.pt"
    )
    assert "blocks.0.self_attn.q.bias" in message and "1 unexpected (blocks.0.extra.weight)" in message


def test_wrong_shape_is_named_with_both_shapes(source):
    model, _ = source
    state_dict = dict(model.state_dict())
    state_dict["head.head.weight"] = torch.zeros(16, 9)
    message = assert_one_line_error("1 wrong shape", load_into, new_model(2), state_dict, "ckpt.pt")
    assert "head.head.weight [16, 9] vs model [16, 8]" in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, source, suffix):
    model, _ = source
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file(dict(model.state_dict()), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error("truncated", load_generator_state_dict, path)


def test_truncated_shard_in_wan_folder(tmp_path, source):
    model, _ = source
    folder = tmp_path / "Wan"
    write_wan_folder(folder, model, 2)
    shard = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert_one_line_error("00002-of-00002.safetensors.*truncated", load_wan_folder, folder)


def test_missing_shard_in_wan_folder(tmp_path, source):
    model, _ = source
    folder = tmp_path / "Wan"
    write_wan_folder(folder, model, 2)
    (folder / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
    assert_one_line_error("weights file not found: .*00001-of-00002", load_wan_folder, folder)


def test_use_ema_on_sectioned_file_without_ema(tmp_path, source):
    model, _ = source
    path = write_file(tmp_path, "model.pt", {"generator": model.state_dict(), "critic": model.state_dict()})
    message = assert_one_line_error("no 'generator_ema' section", load_generator_state_dict, path, use_ema=True)
    assert "generator, critic" in message and "drop --use_ema" in message


def test_missing_file_and_folder(tmp_path):
    assert_one_line_error("checkpoint not found", load_generator_state_dict, tmp_path / "absent.pt")
    assert_one_line_error("Wan model folder not found", load_wan_folder, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert_one_line_error("Wan config not found", load_wan_folder, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert_one_line_error("neither diffusion_pytorch_model.safetensors nor", load_wan_folder, tmp_path / "empty")


def test_pickled_objects_are_refused(tmp_path):
    path = write_file(tmp_path, "model.pt", {"generator": {"w": torch.zeros(1)}, "config": OmegaConf.create({"a": 1})})
    assert_one_line_error("weights_only", load_generator_state_dict, path)


def test_unrecognised_layout(tmp_path):
    path = write_file(tmp_path, "model.pt", {"step": 3, "weights": {"w": torch.zeros(1)}})
    assert_one_line_error("neither a flat state dict nor", load_generator_state_dict, path)


def test_asset_path_resolves_under_checkpoint_dir(tmp_path):
    cfg = OmegaConf.create({"checkpoint_dir": str(tmp_path)})
    assert asset_path(cfg, "ode_init.pt") == tmp_path / "ode_init.pt"
    assert asset_path(cfg, "/abs/file.pt").as_posix() == "/abs/file.pt"
    assert asset_path(cfg, "./here.pt").as_posix() == "here.pt"
    (tmp_path / "Videoreward").mkdir()
    assert asset_path(cfg, "VideoReward") == tmp_path / "Videoreward"
    assert_one_line_error("empty asset path", asset_path, cfg, None)
