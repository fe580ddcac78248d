"""DMD / Re-DMD / critic losses against closed forms."""
import math

import pytest
import torch

from reward_forcing.sampling import FlowMatchSchedule, classifier_free_guidance
from reward_forcing.training.losses import (
    critic_flow_loss,
    dmd_gradient,
    re_dmd_loss,
    reward_weight,
    score_timesteps,
)

SHAPE = (3, 4, 5, 2, 3)  # [B, C, F, H, W]


def test_score_timesteps_shift_and_clamp():
    t = score_timesteps(torch.tensor([0, 500, 999, 1]), shift=5.0, min_t=20, max_t=980)
    # 1000 * 5u / (1 + 4u): u=0.5 -> 833.33; u=0.999 -> 999.8 -> clamp 980; u=0.001 -> 4.98 -> clamp 20
    assert torch.allclose(t, torch.tensor([20.0, 2500 / 3, 980.0, 20.0], dtype=torch.float64))


def test_cfg_is_classic_cfg_with_weight_one_plus_scale():
    cond, uncond = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.allclose(classifier_free_guidance(cond, uncond, 3.0), uncond + 4.0 * (cond - uncond), atol=1e-6)


def test_dmd_gradient_per_sample_normaliser():
    x, real, fake = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    g = dmd_gradient(x, real, fake)
    for b in range(SHAPE[0]):
        norm = sum(abs(float(a) - float(r)) for a, r in zip(x[b].flatten(), real[b].flatten())) / x[b].numel()
        assert torch.allclose(g[b], (fake[b] - real[b]) / norm, atol=1e-5)


def test_dmd_gradient_nan_to_num_when_x_equals_real():
    """Upstream's torch.nan_to_num on a zero normaliser: a sample whose x equals x_real gets +-float max where
    x_fake != x_real and 0 where they are equal; the other samples keep their ordinary value.
    Bug caught: a normaliser shared across the batch (sample 0's zero would not stay in sample 0), or a missing
    nan_to_num (inf / nan reach the loss)."""
    x, real, fake = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    real[0] = x[0]
    fake[0, 0, 0, 0, 0] = real[0, 0, 0, 0, 0]
    g = dmd_gradient(x, real, fake)
    big = torch.finfo(torch.float32).max
    expected0 = torch.sign(fake[0] - real[0]) * big
    assert torch.equal(g[0], expected0) and g[0, 0, 0, 0, 0] == 0
    for b in range(1, SHAPE[0]):
        norm = (x[b].double() - real[b].double()).abs().mean()
        torch.testing.assert_close(g[b].double(), (fake[b].double() - real[b].double()) / norm, rtol=1e-6, atol=1e-6)


def test_re_dmd_autograd_is_w_times_g_over_n():
    x = torch.randn(SHAPE, requires_grad=True)
    g = torch.randn(SHAPE)
    w = torch.tensor([0.5, 2.0, 7.0])
    re_dmd_loss(x, g, w).backward()
    n = x.numel()
    expected = w.reshape(-1, 1, 1, 1, 1) * g / n
    assert torch.allclose(x.grad, expected, atol=1e-7)


def test_re_dmd_value_and_plain_dmd():
    x, g = torch.randn(SHAPE), torch.randn(SHAPE)
    w = torch.tensor([0.5, 2.0, 7.0])
    per_sample = (g.double() ** 2).flatten(1).mean(1)
    assert math.isclose(float(re_dmd_loss(x, g, w)), float(0.5 * (w.double() * per_sample).mean()), rel_tol=1e-12)
    assert math.isclose(float(re_dmd_loss(x, g)), float(0.5 * per_sample.mean()), rel_tol=1e-12)


def test_reward_weight_exp_and_clip():
    mq = torch.tensor([-2.0, 0.0, 1.0, 2.0])
    w = reward_weight(mq, beta=2.0)
    assert torch.allclose(w, torch.tensor([math.exp(-4), 1.0, math.exp(2), math.exp(4)], dtype=torch.float64))
    assert float(reward_weight(mq, 2.0, clip=5.0).max()) == 5.0


@pytest.mark.parametrize("t", [20.0, 500.0, 980.0])
def test_critic_loss_is_flow_matching_mse(t):
    schedule = FlowMatchSchedule(5.0, sigma_lookup="exact")
    x0, noise, pred = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    sigma = t / 1000
    x_t = (1 - sigma) * x0 + sigma * noise
    expected = (((x_t - pred) / sigma - (noise - x0)) ** 2).mean()
    tb = torch.full((SHAPE[0],), t)
    assert torch.allclose(critic_flow_loss(pred, x_t, x0, noise, tb, schedule), expected, rtol=1e-5)
    # a perfect x0 prediction recovers the flow exactly
    assert float(critic_flow_loss(x0, x_t, x0, noise, tb, schedule)) < 1e-10


def test_batch_mean_weight_norm_keeps_the_ratios_and_averages_one():
    from reward_forcing.training.losses import normalise_weight

    weight = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert torch.equal(normalise_weight(weight, "none"), weight)
    # mean 3: each weight / 3
    torch.testing.assert_close(normalise_weight(weight, "batch_mean"),
                               torch.tensor([1 / 3, 2 / 3, 1.0, 2.0], dtype=torch.float64))


def test_an_unknown_weight_norm_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "train.py"), "--config_path", str(root / "configs" / "tiny_train.yaml"),
               "--logdir", str(tmp_path), "reward.weight_norm=softmax"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid value for 'reward.weight_norm' in command-line overrides: Invalid value 'softmax', expected "
        "one of [none, batch_mean]"]


def _normalise_on_rank(rank, init_file, out_dir):
    import torch.distributed as dist

    from reward_forcing.training.losses import normalise_weight

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    weight = torch.tensor([[1.0, 2.0], [3.0, 6.0]][rank], dtype=torch.float64)
    torch.save(normalise_weight(weight, "batch_mean"), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_batch_mean_is_the_mean_over_every_ranks_samples(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_normalise_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    # the global batch [1, 2, 3, 6] has mean 3, whatever its split over ranks
    torch.testing.assert_close(torch.cat(got), torch.tensor([1 / 3, 2 / 3, 1.0, 2.0], dtype=torch.float64))
