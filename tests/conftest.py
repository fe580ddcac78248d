import json
import os
from pathlib import Path

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.testing.assets import (random_wan_state_dict, write_t5, write_tiny_checkpoint_dir, write_tokenizer,
                                           write_vae, write_wan_folder)

# Tests compare against closed forms and library oracles in fp32; keep CPU work bounded on 2 cores.
torch.set_num_threads(max(1, min(int(os.environ.get("OMP_NUM_THREADS", 2)), os.cpu_count() or 1)))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

# The inference tests' own tiny sizes (smaller than configs/tiny.yaml), so their Wan folder is written in seconds.
INFERENCE_DIT = dict(_class_name="WanModel", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                     text_dim=32, text_len=16, freq_dim=16, patch_size=[1, 2, 2], eps=1e-6, qk_norm=True,
                     cross_attn_norm=True, window_size=[-1, -1], model_type="t2v")
INFERENCE_TE = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, text_len=16)
INFERENCE_VAE = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                     temperal_downsample=[False, True, True])
INFERENCE_PROMPTS = ("a cat walks on the grass\n\nrock/paper scissors\na cat walks on the grass\n"
                     "waves crash on a beach\n")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny convolutions lose more to thread hand-offs than they gain, badly so on
    a shared 2-core machine (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_training_assets(root) -> Path:
    root = Path(root)
    write_tiny_checkpoint_dir(root, load_config(ROOT / "configs" / "tiny_train.yaml"), seed=1)
    (root / "prompts.txt").write_text("a cat walks on grass\na red car at night\nwaves on a beach\n"
                                      "a dog plays in snow\nclouds over mountains\n")
    return root


def _write_inference_assets(root) -> Path:
    root = Path(root)
    base = random_wan_state_dict(INFERENCE_DIT)
    folder = write_wan_folder(root / "checkpoints" / "Wan2.1-T2V-1.3B", INFERENCE_DIT, base)
    write_tokenizer(folder, INFERENCE_TE["vocab_size"])
    write_t5(folder / "models_t5_umt5-xxl-enc-bf16.pth", INFERENCE_TE)
    write_vae(folder / "Wan2.1_VAE.pth", INFERENCE_VAE)
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    torch.save({"generator": base, "generator_ema": ema}, root / "model.pt")
    config = {"checkpoint_dir": str(root / "checkpoints"), "text_encoder": INFERENCE_TE, "vae": INFERENCE_VAE,
              "height": 16, "width": 32}
    (root / "tiny.yaml").write_text(json.dumps(config))  # JSON is YAML
    (root / "prompts.txt").write_text(INFERENCE_PROMPTS)
    return root


@pytest.fixture(scope="session")
def write_training_assets():
    """write(root) -> root: the trainers' tiny checkpoint_dir (scripts/make_tiny_checkpoints.py's layout sized by
    configs/tiny_train.yaml, seed 1) and a prompts.txt of five prompts."""
    return _write_training_assets


@pytest.fixture(scope="session")
def write_inference_assets():
    """write(root) -> root: a Wan folder (DiT config + weights, T5, tokenizer, VAE), a sectioned student checkpoint
    model.pt (generator, generator_ema), its config tiny.yaml and prompts.txt, for inference.py and the server."""
    return _write_inference_assets
