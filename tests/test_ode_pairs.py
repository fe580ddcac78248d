"""Pair generation with a linear stand-in teacher whose guided Euler trajectory has a closed form."""
from functools import partial

import pytest
import torch

from reward_forcing.errors import ConfigError
from reward_forcing.training.ode_data import OdePairDataset, prepare_output_dir, shard_name
from reward_forcing.training.ode_pairs import (
    check_keep_indices, euler_sigmas, euler_trajectory, generate_pairs, pair_noise)


class LinearTeacher(torch.nn.Module):
    """flow = a * x with a = the context's mean, per sample; records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, x, t, context):
        self.timesteps.append(t.clone())
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def encode(prompts):
    # cond prompts -> a = 2, the negative prompt "neg" -> a = 1
    return torch.stack([torch.full((3, 4), 1.0 if p == "neg" else 2.0) for p in prompts])


def test_kept_sigmas_by_hand():
    sigmas = euler_sigmas(48, 8.0)
    assert len(sigmas) == 49 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    # warp(u) = 8u / (1 + 7u) at u = 0.75, 0.5, 0.25
    assert sigmas[[0, 12, 24, 36, 48]].tolist() == pytest.approx([1.0, 0.96, 8 / 9, 8 / 11, 0.0], abs=1e-12)


def test_guided_euler_trajectory_matches_closed_form():
    teacher, scale, steps = LinearTeacher(), 6.0, 8
    sigmas = euler_sigmas(steps, 8.0)
    noise = torch.randn(1, 2, 3, 2, 2)
    states = euler_trajectory(teacher, noise, encode(["p"]), encode(["neg"]), sigmas, scale, [0, 4, 8])
    # guided flow = (1 + scale * (2 - 1)) x = 7x, so each step multiplies x by 1 + 7 (s_{k+1} - s_k)
    factor = [1.0]
    for k in range(steps):
        factor.append(factor[-1] * (1 + 7 * (sigmas[k + 1] - sigmas[k]).item()))
    assert states.shape == (3, 2, 3, 2, 2)
    for state, f in zip(states, [factor[0], factor[4], factor[8]]):
        torch.testing.assert_close(state, noise[0] * f, rtol=1e-5, atol=1e-6)
    # the teacher saw t = 1000 sigma_k for both CFG branches
    seen = torch.stack(teacher.timesteps)
    assert seen.shape == (steps, 2)
    torch.testing.assert_close(seen[:, 0].double(), 1000 * sigmas[:-1], rtol=1e-6, atol=1e-4)


def test_keep_indices_are_validated():
    assert check_keep_indices([0, 12, 24, 36, 48], 48) == [0, 12, 24, 36, 48]
    for bad in ([0, 49], [12, 0], [], [3, 3]):
        with pytest.raises(ConfigError, match="ode_keep_indices"):
            check_keep_indices(bad, 48)


def _generate(out, world_size, prompts, **kw):
    prepare_output_dir(out, {"num_prompts": len(prompts), "shard_size": 2})
    trajectory = partial(euler_trajectory, LinearTeacher(), uncond=encode(["neg"]), sigmas=euler_sigmas(4, 8.0),
                         guidance_scale=6.0, keep_indices=[0, 2, 4])
    made = 0
    for rank in range(world_size):
        made += generate_pairs(trajectory, encode, prompts, out, (2, 3, 2, 2), 2, seed=7, rank=rank,
                               world_size=world_size, save_dtype=torch.float32, **kw)
    return made


def test_generation_covers_all_prompts_independent_of_ranks_and_resumes(tmp_path):
    prompts = [f"p{i}" for i in range(5)]
    assert _generate(tmp_path / "two", 2, prompts) == 5
    assert _generate(tmp_path / "one", 1, prompts) == 5
    two, one = OdePairDataset(tmp_path / "two"), OdePairDataset(tmp_path / "one")
    assert [two[i]["prompts"] for i in range(5)] == prompts
    for i in range(5):
        assert two[i]["ode_latent"].shape == (3, 2, 3, 2, 2)
        assert torch.equal(two[i]["ode_latent"], one[i]["ode_latent"])
        torch.testing.assert_close(two[i]["ode_latent"][0], pair_noise(7, i, (1, 2, 3, 2, 2))[0])
    # resuming regenerates only the missing shard (prompts 2 and 3), identically
    before = two[3]["ode_latent"]
    (tmp_path / "two" / shard_name(1)).unlink()
    assert _generate(tmp_path / "two", 2, prompts) == 2
    assert torch.equal(OdePairDataset(tmp_path / "two")[3]["ode_latent"], before)


def test_ode_init_config_carries_the_published_recipe():
    from pathlib import Path

    from reward_forcing.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "ode_init.yaml")
    assert cfg.trainer == "ode" and cfg.ode_teacher_name == "Wan2.1-T2V-1.3B"
    assert (cfg.ode_num_steps, cfg.ode_shift, cfg.ode_guidance_scale) == (48, 8.0, 6.0)
    assert list(cfg.ode_keep_indices) == [0, 12, 24, 36, 48] and cfg.ode_num_frames == 21
    assert list(cfg.ode_timesteps) == [1000, 750, 500, 250, 0]
    # Wan2.1's sample_neg_prompt (wan/configs/shared_config.py): 28 phrases joined by full-width commas
    phrases = cfg.negative_prompt.split("，")
    assert len(phrases) == 28 and phrases[0] == "色调艳丽" and phrases[13] == "JPEG压缩残留" and phrases[-1] == "倒着走"
