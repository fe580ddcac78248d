"""A tiny self-forcing rollout and the initial noise it draws (tests/test_training_rollout.py,
tests/test_first_frame_training.py): a causal student and text embeddings under configs/tiny_train.yaml."""
from pathlib import Path

import torch

from reward_forcing.config import load_config
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.training.rollout import sample_noise

CONFIG = Path(__file__).parents[2] / "configs" / "tiny_train.yaml"
HW = (4, 4)


def rollout_setup(*overrides):
    """(cfg, model, context): configs/tiny_train.yaml with `overrides`, a tiny causal student in chunks of 3 frames
    windowed by the config's local_attn_size (seed 0), and text embeddings for a batch of 2."""
    cfg = load_config(CONFIG, list(overrides))
    torch.manual_seed(0)
    model = CausalWanModel(dim=32, ffn_dim=48, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=8,
                           text_len=4, freq_dim=16, num_frame_per_block=3, local_attn_size=cfg.local_attn_size)
    context = torch.randn(2, 4, 8)
    return cfg, model, context


def initial_noise(sampler, frames, key, ids):
    """The initial noise a rollout keyed by `key` draws for the samples `ids`, chunk by chunk, as one tensor to
    give StreamingGenerator.stream."""
    shape = (sampler.model.in_dim, sampler.chunk_frames, *HW)
    return torch.cat([sample_noise(shape, 3, *key, c, "init", sample_ids=ids, dtype=torch.float32, device="cpu")
                      for c in range(frames // sampler.chunk_frames)], dim=2)
