import pytest
import torch

from reward_forcing.sampling import FlowMatchSchedule, warped_steps


def test_warped_four_step_list_matches_closed_form():
    steps = warped_steps([1000, 750, 500, 250], shift=5.0)
    # sigma = 5u / (1 + 4u) with u = s / 1000, by hand: 1, 3.75/4, 2.5/3, 1.25/2
    assert steps == pytest.approx([1000.0, 937.5, 2500.0 / 3.0, 625.0], abs=1e-9)


def test_warped_steps_are_on_the_shift5_grid_so_sigma_is_t_over_1000():
    schedule = FlowMatchSchedule(shift=5.0)
    for t in warped_steps([1000, 750, 500, 250], shift=5.0):
        assert schedule.sigma(t).item() == pytest.approx(t / 1000.0, abs=1e-12)


def test_grid_ends_near_five_and_t0_snaps_to_the_last_grid_point():
    schedule = FlowMatchSchedule(shift=5.0)
    # last grid sigma = warp(1/1000) = 5e-3 / (1 + 4e-3)
    last = 5e-3 / 1.004
    assert schedule.timesteps[-1].item() == pytest.approx(1000 * last, rel=1e-12)
    assert schedule.timesteps[-1].item() == pytest.approx(4.98, abs=5e-3)
    assert schedule.sigma(0.0).item() == pytest.approx(last, rel=1e-12)
    assert FlowMatchSchedule(shift=5.0, sigma_lookup="exact").sigma(0.0).item() == 0.0


def test_add_noise_and_flow_round_trip_per_frame_timesteps():
    schedule = FlowMatchSchedule(shift=8.0)
    x0 = torch.randn(2, 4, 3, 5, 6)
    noise = torch.randn_like(x0)
    t = torch.tensor([[999.0, 500.0, 20.0], [700.0, 700.0, 100.0]])
    x_t = schedule.add_noise(x0, noise, t)
    sigma = schedule.sigma(t).float()
    for b in range(2):
        for f in range(3):
            s = sigma[b, f]
            expected = (1 - s) * x0[b, :, f] + s * noise[b, :, f]
            torch.testing.assert_close(x_t[b, :, f], expected, rtol=0, atol=1e-6)
    flow = schedule.training_target(x0, noise)
    torch.testing.assert_close(schedule.flow_to_x0(flow, x_t, t), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(schedule.x0_to_flow(x0, x_t, t), flow, rtol=0, atol=1e-4)


def test_ode_states_sigmas_shift8_48_steps():
    # Keeping indices [0, 12, 24, 36, 48] of a 48-step shift-8 trajectory gives these sigmas
    base = torch.linspace(1, 0, 49, dtype=torch.float64)
    from reward_forcing.sampling import shift_sigma

    kept = shift_sigma(base[[0, 12, 24, 36, 48]], 8.0)
    # by hand: u = 0.75 -> 6/6.25, 0.5 -> 4/4.5, 0.25 -> 2/2.75
    assert kept.tolist() == pytest.approx([1.0, 0.96, 4 / 4.5, 2 / 2.75, 0.0], abs=1e-12)
