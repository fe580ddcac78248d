"""Every checkpoint layout loads into the student with identical weights; every broken one is one CheckpointError;
the tiny fake checkpoint_dir loads end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from reward_forcing.checkpoints import (
    asset_path,
    load_generator_state_dict,
    load_generator_weights,
    load_into,
    load_wan_folder,
    read_wan_config,
    strip_prefixes,
)
from reward_forcing.config import load_config
from reward_forcing.errors import CheckpointError
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.wan import WanModel, wan_to_diffusers_state_dict
from reward_forcing.testing.assets import TINY_WAN_CONFIG, randomise_
from reward_forcing.testing.assets import write_wan_folder as write_tiny_wan_folder


def new_model(seed):
    """The causal student at the tiny sizes, every parameter perturbed by `seed`."""
    torch.manual_seed(seed)
    model = CausalWanModel.from_config(TINY_WAN_CONFIG, num_frame_per_block=3)
    return randomise_(model, seed).eval()


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture
def source():
    """A model with its own random weights, and an input on which to compare outputs."""
    x = torch.randn(1, TINY_WAN_CONFIG["in_dim"], 3, 4, 4)
    context = torch.randn(1, 5, TINY_WAN_CONFIG["text_dim"])
    return new_model(1), (x, torch.tensor([700.0]), context)


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
    assert torch.equal(forward(student, x), forward(source_model, x))


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


def test_use_ema_with_exported_safetensors_reads_the_ema_file_beside_it(tmp_path, source):
    from reward_forcing.training.state import export_weights

    model, x = source
    other = new_model(3)
    export_weights(tmp_path / "generator", {"generator": dict(other.state_dict()),
                                            "generator_ema": dict(model.state_dict())})
    assert_loads_identically(tmp_path / "generator.safetensors", model, x, use_ema=True)
    assert_loads_identically(tmp_path / "generator.safetensors", other, x, use_ema=False)
    assert_loads_identically(tmp_path / "generator_ema.safetensors", model, x, use_ema=True)


def test_use_ema_says_which_file_was_read(tmp_path, source):
    from reward_forcing.checkpoints import load_generator_weights
    from reward_forcing.training.state import export_weights

    model, _ = source
    export_weights(tmp_path / "run" / "generator", {"generator": dict(model.state_dict()),
                                                    "generator_ema": dict(model.state_dict())})
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert len(modes) == 3 and len(set(modes.values())) == 1, modes  # the .pt and both .safetensors alike
    save_file(dict(model.state_dict()), str(tmp_path / "generator.safetensors"))  # no EMA file beside it
    flat = write_file(tmp_path, "rewardforcing.pt", dict(model.state_dict()))
    described = {name: str(load_generator_weights(tmp_path / name, use_ema=True)[1])
                 for name in ("run/generator.safetensors", "run/generator.pt", "generator.safetensors", flat.name)}
    assert described["run/generator.safetensors"].startswith(str(tmp_path / "run" / "generator_ema.safetensors"))
    assert described["run/generator.pt"] == f"{tmp_path / 'run' / 'generator.pt'} [generator_ema]"
    for name in ("generator.safetensors", flat.name):
        assert described[name].startswith(str(tmp_path / name)) and "holds no separate EMA weights" in described[name]
    assert str(load_generator_weights(flat, use_ema=False)[1]) == str(flat)


def test_fsdp_checkpoint_wrapper_and_compile_segments_are_stripped(tmp_path, source):
    model, x = source
    path = write_file(tmp_path, "model.pt", {"generator": fsdp_wrapped(model.state_dict())})
    assert_loads_identically(path, model, x)


def test_comfyui_prefix_and_safetensors_file(tmp_path, source):
    model, x = source
    path = tmp_path / "comfy.safetensors"
    save_file(prefixed(model.state_dict(), "model.diffusion_model."), str(path))
    assert_loads_identically(path, model, x)


def test_diffusers_layout_is_renamed(tmp_path, source):
    model, x = source
    diffusers_sd = wan_to_diffusers_state_dict(dict(model.state_dict()))
    assert "condition_embedder.time_proj.weight" in diffusers_sd  # the layout really differs
    path = write_file(tmp_path, "diffusers.pt", {"generator_ema": prefixed(diffusers_sd, "_orig_mod.")})
    assert_loads_identically(path, model, x, use_ema=True)


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
    state_dict = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    write_tiny_wan_folder(folder, TINY_WAN_CONFIG, state_dict, num_shards=shards)
    return TINY_WAN_CONFIG


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
    state_dict["head.head.weight"] = torch.zeros(64, 9)
    message = assert_one_line_error("1 wrong shape", load_into, new_model(2), state_dict, "ckpt.pt")
    assert "head.head.weight [64, 9] vs model [64, 64]" in message


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


def test_use_ema_on_sectioned_file_without_ema_reads_its_generator_and_says_so(tmp_path, source):
    """A run exported before its EMA was made has no generator_ema: use_ema (the default of inference.py and the
    Python API) takes the generator section, and the description names it."""
    model, x = source
    path = write_file(tmp_path, "model.pt", {"generator": model.state_dict(), "critic": model.state_dict()})
    assert_loads_identically(path, model, x, use_ema=True)
    weights = load_generator_weights(path, use_ema=True)[1]
    assert weights.identity == f"{path.resolve()} [generator]" and "no generator_ema section" in str(weights)
    path = write_file(tmp_path, "critic_only.pt", {"critic": model.state_dict()})
    message = assert_one_line_error("no 'generator_ema' section", load_generator_state_dict, path, use_ema=True)
    assert "(it has: critic)" in message


@pytest.mark.parametrize("folder, flag", [("Wan2.1-T2V-1.3B", "--only wan-1.3b"), ("Wan2.1-T2V-14B", "--with-teacher")])
def test_a_missing_wan_folder_names_the_download_flag_that_fetches_it(tmp_path, folder, flag):
    message = assert_one_line_error("Wan model folder not found", load_wan_folder, tmp_path / folder)
    assert f"`bash download_checkpoints.sh {flag}` fetches it" in message
    usage = subprocess.run(["bash", str(REPO / "download_checkpoints.sh"), "--help"], capture_output=True, text=True,
                           check=True).stdout
    option, *part = flag.split()
    assert f"  {option} " in usage and all(f"  {name} " in usage for name in part)  # the flag and part exist


def test_missing_file_and_folder(tmp_path):
    assert_one_line_error("checkpoint not found", load_generator_state_dict, tmp_path / "absent.pt")
    assert_one_line_error("Wan model folder not found", load_wan_folder, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert_one_line_error("Wan config not found", load_wan_folder, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert_one_line_error("neither diffusion_pytorch_model.safetensors nor", load_wan_folder, tmp_path / "empty")
    (tmp_path / "dcp").mkdir()
    assert_one_line_error("folder without config.json", load_generator_state_dict, tmp_path / "dcp")


def test_pickled_objects_are_refused(tmp_path):
    path = write_file(tmp_path, "model.pt", {"generator": {"w": torch.zeros(1)}, "config": OmegaConf.create({"a": 1})})
    assert_one_line_error("weights_only", load_generator_state_dict, path)


def test_unrecognised_layout(tmp_path):
    path = write_file(tmp_path, "model.pt", {"step": 3, "weights": {"w": torch.zeros(1)}})
    assert_one_line_error("neither a flat state dict nor", load_generator_state_dict, path)


def test_asset_path_resolves_under_checkpoint_dir(tmp_path):
    cfg = OmegaConf.create({"checkpoint_dir": str(tmp_path)})
    assert asset_path(cfg.checkpoint_dir, "ode_init.pt") == tmp_path / "ode_init.pt"
    assert asset_path(cfg.checkpoint_dir, "/abs/file.pt").as_posix() == "/abs/file.pt"
    assert asset_path(cfg.checkpoint_dir, "./here.pt").as_posix() == "here.pt"
    (tmp_path / "Videoreward").mkdir()
    assert asset_path(cfg.checkpoint_dir, "VideoReward") == tmp_path / "Videoreward"
    assert_one_line_error("empty asset path", asset_path, cfg, None)


def test_checkpoint_dir_default_and_command_line_override():
    assert asset_path(load_config().checkpoint_dir, "ode_init.pt") == Path("checkpoints/ode_init.pt")
    cfg = load_config(overrides=["checkpoint_dir=/data/weights"])
    assert asset_path(cfg.checkpoint_dir, cfg.model_name) == Path("/data/weights/Wan2.1-T2V-1.3B")


# ---- scripts/make_tiny_checkpoints.py: a complete fake checkpoint_dir that the project loaders read ----

REPO = Path(__file__).resolve().parents[1]
TINY_FILES = [
    "Wan2.1-T2V-1.3B/config.json",
    "Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors",
    "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
    "Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer_config.json",
    "Wan2.1-T2V-14B/config.json",
    "Wan2.1-T2V-14B/diffusion_pytorch_model.safetensors.index.json",
    "Wan2.1-T2V-14B/diffusion_pytorch_model-00001-of-00003.safetensors",
    "Reward-Forcing-T2V-1.3B/rewardforcing.pt",
    "ode_init.pt",
    "VideoReward/model_config.json",
    "Qwen2-VL-2B-Instruct/config.json",
    "ImageReward/ImageReward.pt",
    "ImageReward/med_config.json",
    "ImageReward/bert-base-uncased/tokenizer_config.json",
    "taew2_1.pth",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "checkpoints"
    result = subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_checkpoints.py"), "--output_dir", str(out),
                             "--seed", "3"], capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return load_config(REPO / "configs/tiny.yaml", [f"checkpoint_dir={out}"])


def test_tiny_yaml_has_the_tiny_sizes():
    cfg = load_config(REPO / "configs/tiny.yaml")
    te, vae = cfg.text_encoder, cfg.vae
    assert (te.vocab_size, te.d_model, te.d_kv, te.num_heads, te.d_ff, te.num_layers) == (256, 32, 8, 4, 64, 2)
    assert (te.relative_attention_num_buckets, te.relative_attention_max_distance, te.text_len) == (32, 128, 64)
    assert (vae.base_dim, vae.z_dim, list(vae.dim_mult), vae.num_res_blocks) == (8, 16, [1, 2, 4, 4], 2)
    assert list(vae.temperal_downsample) == [False, True, True]
    assert (cfg.height, cfg.width, cfg.num_frame_per_block, cfg.local_attn_size, cfg.sink_size) == (64, 96, 3, 9, 3)
    assert cfg.compression_alpha == 0.999 and cfg.checkpoint_dir == "checkpoints/tiny"


def test_tiny_dir_is_complete_with_the_tiny_dit_config(tiny):
    root = Path(tiny.checkpoint_dir)
    assert [name for name in TINY_FILES if not (root / name).is_file()] == []
    config = json.loads((root / "Wan2.1-T2V-1.3B/config.json").read_text())
    sizes = {"dim": 64, "ffn_dim": 128, "num_heads": 4, "num_layers": 2, "freq_dim": 32, "text_dim": 32,
             "text_len": 64, "in_dim": 16, "out_dim": 16}
    assert {key: config[key] for key in sizes} == sizes
    student = CausalWanModel.from_config(read_wan_config(root / "Wan2.1-T2V-1.3B"), num_frame_per_block=3)
    assert student.patch_size == (1, 2, 2)


def assert_non_degenerate(state_dict):
    constant = [key for key, value in state_dict.items() if value.numel() > 1 and value.float().std() == 0]
    assert constant == [] and all(torch.isfinite(v.float()).all() for v in state_dict.values())


def test_tiny_dits_load_and_run(tiny):
    base = asset_path(tiny.checkpoint_dir, tiny.model_name)
    config = read_wan_config(base)
    x = torch.randn(1, config["in_dim"], 3, tiny.height // 8, tiny.width // 8)
    context = torch.randn(1, config["text_len"], config["text_dim"])
    t = torch.tensor([500.0])
    outputs = []
    # The release README passes --use_ema with the flat rewardforcing.pt.
    sources = [(base, False), (asset_path(tiny.checkpoint_dir, "Reward-Forcing-T2V-1.3B/rewardforcing.pt"), True),
               (asset_path(tiny.checkpoint_dir, "ode_init.pt"), False)]
    for source, use_ema in sources:
        state_dict = load_generator_state_dict(source, use_ema=use_ema)
        assert_non_degenerate(state_dict)
        model = load_into(CausalWanModel.from_config(config, num_frame_per_block=3), state_dict, str(source))
        flow = forward(model.eval(), (x, t, context))
        assert torch.isfinite(flow).all() and 0.1 < flow.std() < 10
        outputs.append(flow)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])

    teacher_dir = asset_path(tiny.checkpoint_dir, tiny.real_name)
    teacher_config, teacher_sd = load_wan_folder(teacher_dir)
    assert teacher_config["dim"] != config["dim"] and teacher_config["num_layers"] != config["num_layers"]
    teacher = load_into(WanModel.from_config(teacher_config), teacher_sd, str(teacher_dir))
    assert_non_degenerate(teacher_sd)
    assert torch.isfinite(forward(teacher.eval(), (x, t, context))).all()


def test_tiny_text_encoder_vae_taehv_and_reward_load(tiny):
    from reward_forcing.models.taehv import TAEHV
    from reward_forcing.models.text_encoder import TextEncoder
    from reward_forcing.models.vae import WanVAE
    from reward_forcing.rewards.imagereward import ImageReward
    from reward_forcing.rewards.videoalign import VideoReward

    base = asset_path(tiny.checkpoint_dir, tiny.model_name)
    context = TextEncoder.from_wan_folder(base, tiny.text_encoder).encode(["a cat walks across the grass"])
    assert context.shape == (1, tiny.text_encoder.text_len, tiny.text_encoder.d_model)
    assert torch.isfinite(context).all() and context[0, 0].abs().sum() > 0

    latents = torch.randn(1, tiny.vae.z_dim, 2, tiny.height // 8, tiny.width // 8)
    with torch.no_grad():
        pixels = WanVAE.from_file(base / "Wan2.1_VAE.pth", tiny.vae).decode(latents)
        preview = TAEHV.from_file(asset_path(tiny.checkpoint_dir, tiny.taehv_path)).decode(latents)
    assert pixels.shape == preview.shape == (1, 3, 5, tiny.height, tiny.width)
    assert torch.isfinite(pixels).all() and pixels.std() > 0.01

    reward = VideoReward.from_checkpoint(asset_path(tiny.checkpoint_dir, "VideoReward"), asset_path(tiny.checkpoint_dir, "Qwen2-VL-2B-Instruct"),
                                         verify_template=False)
    with torch.no_grad():
        scores = reward.score(pixels, ["a cat walks across the grass"])
    assert all(torch.isfinite(scores[key]).all() for key in ("VQ", "MQ", "TA", "Overall"))

    image_reward = ImageReward.from_checkpoint(asset_path(tiny.checkpoint_dir, "ImageReward"))
    with torch.no_grad():
        assert torch.isfinite(image_reward.score(pixels[:, :, -1], ["a cat walks across the grass"])).all()


def test_make_tiny_checkpoints_refuses_a_file_as_output_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    result = subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_checkpoints.py"), "--output_dir",
                             str(target)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --output_dir {target} exists and is not a folder"
