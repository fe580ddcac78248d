"""ODE regression: per-chunk state sampling, state gathering and the masked MSE, against hand values."""
import pytest
import torch
import torch.nn.functional as F

from reward_forcing.errors import ConfigError
from reward_forcing.sampling import FlowMatchSchedule
from pathlib import Path

from reward_forcing.config import load_config
from reward_forcing.training.ode import (
    gather_states, ode_loss, ode_regression_loss, sample_state_indices, state_schedule, state_timesteps,
    student_inputs)

CONFIGS = Path(__file__).parents[1] / "configs"


def test_state_index_is_shared_within_each_chunk_and_uniform():
    index = sample_state_indices(4000, 9, 3, 5, torch.Generator().manual_seed(1))
    assert index.shape == (4000, 9) and index.dtype == torch.int64
    blocks = index.reshape(4000, 3, 3)
    assert torch.equal(blocks, blocks[:, :, :1].expand(-1, -1, 3))
    assert index.min() == 0 and index.max() == 4
    # 12000 chunk draws over 5 states: each frequency within 5 sigma of 0.2
    freq = torch.bincount(blocks[:, :, 0].flatten(), minlength=5).float() / 12000
    assert torch.allclose(freq, torch.full((5,), 0.2), atol=5 * (0.2 * 0.8 / 12000) ** 0.5)
    # chunks of one sample are drawn independently: some samples mix states
    assert (blocks[:, :, 0] != blocks[:, :1, 0]).any()


def test_frames_not_a_multiple_of_the_chunk_are_refused():
    with pytest.raises(ConfigError, match="multiple of num_frame_per_block=3"):
        sample_state_indices(1, 7, 3, 5)


def test_gather_picks_state_per_sample_and_frame():
    b, k, c, f, h, w = 2, 5, 3, 6, 2, 2
    # value = 100*b + 10*state + frame, so every pick is identifiable
    ode_latent = (100 * torch.arange(b).view(b, 1, 1, 1, 1, 1) + 10 * torch.arange(k).view(1, k, 1, 1, 1, 1)
                  + torch.arange(f).view(1, 1, 1, f, 1, 1)).float().expand(b, k, c, f, h, w)
    index = torch.tensor([[0, 0, 0, 4, 4, 4], [2, 2, 2, 1, 1, 1]])
    out = gather_states(ode_latent, index)
    assert out.shape == (b, c, f, h, w)
    expected = torch.tensor([[0, 1, 2, 43, 44, 45], [120, 121, 122, 113, 114, 115]]).float()
    assert torch.equal(out[:, 1, :, 0, 1], expected)


def test_loss_is_mse_over_frames_with_nonzero_t():
    clean = torch.zeros(1, 2, 4, 1, 1)
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1, 1).repeat(1, 2, 1, 1, 1)
    t = torch.tensor([[1000.0, 0.0, 500.0, 0.0]])
    # frames 0 and 2 count: (1 + 9) / 2 = 5
    assert ode_regression_loss(pred, clean, t).item() == pytest.approx(5.0)
    # library oracle on a random case
    pred, clean = torch.randn(2, 3, 6, 2, 2), torch.randn(2, 3, 6, 2, 2)
    t = torch.tensor([[750.0] * 3 + [0.0] * 3, [0.0] * 3 + [250.0] * 3])
    mask = t != 0
    expected = F.mse_loss(pred.permute(0, 2, 1, 3, 4)[mask], clean.permute(0, 2, 1, 3, 4)[mask])
    assert ode_regression_loss(pred, clean, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_clean_frames_get_no_gradient_and_all_clean_gives_zero():
    pred = torch.randn(1, 2, 6, 2, 2, requires_grad=True)
    t = torch.tensor([[500.0] * 3 + [0.0] * 3])
    ode_regression_loss(pred, torch.zeros_like(pred), t).backward()
    assert pred.grad[:, :, 3:].abs().sum() == 0 and pred.grad[:, :, :3].abs().sum() > 0
    loss = ode_regression_loss(pred, torch.zeros_like(pred), torch.zeros(1, 6))
    assert loss.item() == 0.0 and loss.requires_grad


def test_student_inputs_label_each_chunk_with_its_state_timestep():
    b, k, c, f = 3, 5, 2, 6
    ode_latent = torch.arange(k).float().view(1, k, 1, 1, 1, 1).expand(b, k, c, f, 2, 2)
    labels = [1000, 750, 500, 250, 0]
    noisy, t = student_inputs(ode_latent, labels, 3, torch.Generator().manual_seed(0))
    state = noisy[:, 0, :, 0, 0].long()  # the state index each frame received
    assert torch.equal(t, torch.tensor(labels, dtype=torch.float32)[state])
    with pytest.raises(ConfigError, match="4 entries but the ODE pairs hold 5 states"):
        student_inputs(ode_latent, labels[:4], 3)


class _ConstantFlow(torch.nn.Module):
    """A 'student' that always predicts the flow v = x_t (so x0 = (1 - sigma) * x_t)."""

    def forward(self, x, t, context):
        self.seen = (x, t, context)
        return x


def test_ode_loss_wires_schedule_and_clean_target():
    schedule = FlowMatchSchedule(shift=5.0)
    ode_latent = torch.randn(2, 5, 2, 6, 2, 2)
    model = _ConstantFlow()
    context = torch.randn(2, 4, 8)
    loss = ode_loss(model, schedule, ode_latent, context, [1000, 750, 500, 250, 0], 3,
                    torch.Generator().manual_seed(3))
    x, t, ctx = model.seen
    assert ctx is context and t.shape == (2, 6)
    sigma = schedule.sigma(t).float().view(2, 1, 6, 1, 1)
    expected = ode_regression_loss((1 - sigma) * x, ode_latent[:, -1], t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pairs_that_cannot_train_the_student_are_refused():
    from types import SimpleNamespace

    from reward_forcing.training.ode import check_pairs

    data = [{"ode_latent": torch.zeros(5, 16, 6, 2, 2)}]
    student = SimpleNamespace(in_dim=16)
    check_pairs(data, student, [1000, 750, 500, 250, 0], 3)
    with pytest.raises(ConfigError, match="4 latent channels"):
        check_pairs([{"ode_latent": torch.zeros(5, 4, 6, 2, 2)}], student, [1000, 750, 500, 250, 0], 3)
    with pytest.raises(ConfigError, match="must end with 0"):
        check_pairs(data, student, [1000, 750, 500, 250, 100], 3)
    with pytest.raises(ConfigError, match="holds 5 states|hold 5 states"):
        check_pairs(data, student, [1000, 500, 0], 3)
    with pytest.raises(ConfigError, match="multiple of num_frame_per_block=4"):
        check_pairs(data, student, [1000, 750, 500, 250, 0], 4)


class _TrueFlow(torch.nn.Module):
    """A 'student' that predicts the exact flow v = noise - x0 of the trajectory the states lie on."""

    def __init__(self, x0, noise):
        super().__init__()
        self.flow, self.seen = noise - x0, []

    def forward(self, x, t, context):
        self.seen.append(t)
        return self.flow


@pytest.mark.parametrize("preset", ["ode_init.yaml", "tiny_ode.yaml"])
def test_each_recorded_state_is_labelled_and_converted_with_its_own_sigma(preset):
    # the pairs keep steps 0, 12, 24, 36 of 48 Euler steps at shift 8: sigma = 8 s / (1 + 7 s), s = 1, 3/4, 1/2, 1/4
    recorded = [1.0, 24 / 25, 8 / 9, 8 / 11]
    cfg = load_config(CONFIGS / preset)
    labels = state_timesteps(cfg)
    assert labels == pytest.approx([1000.0, 960.0, 8000 / 9, 8000 / 11, 0.0], abs=1e-9)  # model input t
    sigmas = state_schedule(cfg).sigma(torch.tensor(labels[:4], dtype=torch.float64))
    assert sigmas.tolist() == pytest.approx(recorded, abs=1e-12)  # sigma of x0 = x_t - sigma * v
    # so a student predicting the true flow of the stored states recovers the clean latent on every state
    x0, noise = torch.randn(2, 8, 2, 6, 2, 2, dtype=torch.float64).unbind(0)
    ode_latent = torch.stack([(1 - s) * x0 + s * noise for s in recorded] + [x0], dim=1)
    model = _TrueFlow(x0, noise)
    loss = ode_loss(model, state_schedule(cfg), ode_latent, torch.zeros(8, 4, 8), labels, 3,
                    torch.Generator().manual_seed(0))
    assert model.seen[0].unique().tolist() == torch.tensor(labels[::-1]).tolist()  # every state was drawn
    assert loss.item() < 1e-20
    # upstream's default config (no warp) feeds 750 and converts with sigma 0.75 a state recorded at sigma 0.96
    nominal = load_config(CONFIGS / preset, ["ode_warp_timesteps=false"])
    assert state_timesteps(nominal) == [1000.0, 750.0, 500.0, 250.0, 0.0]
    assert float(state_schedule(nominal).sigma(750.0)) == pytest.approx(0.75, abs=1e-3)
    assert ode_loss(model, state_schedule(nominal), ode_latent, torch.zeros(8, 4, 8), state_timesteps(nominal), 3,
                    torch.Generator().manual_seed(0)).item() > 1e-3
