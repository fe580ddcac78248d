"""Tiny random checkpoints in the released layouts for the training end-to-end tests (CPU, seconds).

<root>/Wan2.1-T2V-1.3B/{config.json, diffusion_pytorch_model.safetensors, models_t5_umt5-xxl-enc-bf16.pth,
google/umt5-xxl/, Wan2.1_VAE.pth}, <root>/Wan2.1-T2V-14B/ (teacher, 3 layers), <root>/VideoReward and
<root>/Qwen2-VL-tiny. Sizes come from configs/tiny_train.yaml where they exist there.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from reward_forcing.config import load_config
from reward_forcing.models.wan import WanModel
from reward_forcing.tiny_assets import randomise_, write_t5, write_tokenizer, write_vae
from reward_forcing.tiny_reward import write_tiny_videoreward

ROOT = Path(__file__).parents[1]


def dit_config(cfg, num_layers):
    return {"_class_name": "WanModel", "dim": 32, "ffn_dim": 48, "num_heads": 2, "num_layers": num_layers,
            "in_dim": cfg.vae.z_dim, "out_dim": cfg.vae.z_dim, "text_dim": cfg.text_encoder.d_model,
            "text_len": cfg.text_encoder.text_len, "freq_dim": 32, "patch_size": [1, 2, 2], "eps": 1e-6,
            "qk_norm": True, "cross_attn_norm": True, "model_type": "t2v"}


def write_dit(folder: Path, config: dict, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = randomise_(WanModel.from_config(config), seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))


def write_tiny_training_assets(root) -> Path:
    root = Path(root)
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml")
    student = root / cfg.model_name
    write_dit(student, dit_config(cfg, 2), seed=1)
    write_dit(root / cfg.real_name, dit_config(cfg, 3), seed=2)
    write_tokenizer(student, cfg.text_encoder.vocab_size)
    write_t5(student / "models_t5_umt5-xxl-enc-bf16.pth", cfg.text_encoder, seed=3)
    write_vae(student / "Wan2.1_VAE.pth", cfg.vae, seed=4)
    paths = write_tiny_videoreward(root, seed=5)
    assert paths["root"] == root / cfg.reward_dir and paths["qwen_dir"] == root / cfg.reward_base_dir
    (root / "prompts.txt").write_text("a cat walks on grass\na red car at night\nwaves on a beach\n"
                                      "a dog plays in snow\nclouds over mountains\n")
    return root
