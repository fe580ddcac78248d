"""`first_frame_prob`: rollouts and ODE regression that start from a clean first frame of the data, the way an
image-conditioned student is trained. The rollout is held against the inference sampler that starts from a picture
(itself held against teacher forcing in tests/test_conditioned_stream.py)."""
from pathlib import Path

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.training import distill
from reward_forcing.training.loop import Run
from reward_forcing.training.ode import student_inputs
from reward_forcing.training.ode_data import write_lmdb
from reward_forcing.training.parallel import init_distributed, shutdown
from reward_forcing.training.rollout import rollout, sample_noise, training_sampler
from test_training_rollout import HW, _initial_noise, _setup

ROOT = Path(__file__).parents[1]


def _stream_with_rollout_noise(sampler, context, first_frame, ids, steps, chunks):
    """StreamingGenerator.stream from `first_frame`, fed the rollout's initial and per-step noise."""
    shape = (sampler.model.in_dim, sampler.chunk_frames, *HW)
    step_noise = iter([sample_noise(shape, 3, "g", 0, c, s, sample_ids=ids, dtype=torch.float32, device="cpu")
                       for c in range(chunks) for s in range(steps - 1)])
    sampler._noise = lambda *args, **kwargs: next(step_noise)
    noise = _initial_noise(sampler, 3 * chunks, ("g", 0), ids)
    return torch.cat(list(sampler.stream(context, 3 * chunks, HW, noise=noise, first_frame=first_frame)), dim=2)


def test_rollout_from_a_first_frame_equals_the_sampler_started_from_it():
    cfg, model, context = _setup("rollout_cache=window", "compression_alpha=0.7")
    sampler = training_sampler(model, cfg)
    steps, ids = len(sampler.timesteps), [5, 6]
    first = torch.randn(2, model.in_dim, 1, *HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        held = rollout(sampler, context, 9, HW, [steps - 1] * 3, 3, ("g", 0), ids, torch.float32, with_grad=False,
                       first_frame=(first, torch.tensor([True, False])))
        plain = rollout(sampler, context, 9, HW, [steps - 1] * 3, 3, ("g", 0), ids, torch.float32, with_grad=False)
        reference = _stream_with_rollout_noise(sampler, context, first, ids, steps, 3)
    torch.testing.assert_close(held[:1], reference[:1], atol=1e-6, rtol=1e-6)  # sample 0 starts from its frame
    assert torch.equal(held[0, :, :1], first[0])
    torch.testing.assert_close(held[1:], plain[1:], atol=1e-6, rtol=1e-6)  # sample 1 is rolled out as always
    assert (held[0, :, 1:] - plain[0, :, 1:]).abs().min() > 0


def test_a_held_first_frame_gets_no_gradient_and_goes_in_at_t_0():
    cfg, model, context = _setup("rollout_cache=full")
    sampler = training_sampler(model, cfg)
    seen = []
    step = model.stream_step

    def spy(x, t, context, cache, start_frame=0):
        seen.append((start_frame, t.clone()))
        return step(x, t, context, cache, start_frame)

    model.stream_step = spy
    first = torch.randn(2, model.in_dim, 1, *HW)
    x = rollout(sampler, context, 6, HW, [1, 1], 3, ("g", 1), [0, 1], torch.float32, with_grad=True,
                first_frame=(first, torch.tensor([True, False])))
    chunk_0 = [t for start, t in seen if start == 0]
    assert all(t[0, 0] == 0 and t[0, 1] == t[1, 0] for t in chunk_0)  # held sample: frame 0 at t = 0
    assert all(t[1, 0] == t[1, 1] for t in chunk_0[:-1])  # the other sample's denoising steps: one t
    grads = torch.autograd.grad(x[0, :, 0].sum(), list(model.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(x[1, :, 0].sum(), list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.any() for g in grads)


def test_ode_inputs_hold_frame_0_clean_with_probability_first_frame_prob():
    labels = [1000.0, 500.0, 0.0]
    latent = torch.randn(4, 3, 2, 6, 2, 2)
    noisy, t = student_inputs(latent, labels, 3, torch.Generator().manual_seed(0))
    held_noisy, held_t = student_inputs(latent, labels, 3, torch.Generator().manual_seed(0), first_frame_prob=1.0)
    assert torch.equal(held_t[:, 0], torch.zeros(4)) and torch.equal(held_t[:, 1:], t[:, 1:])
    assert torch.equal(held_noisy[:, :, 0], latent[:, -1, :, 0]) and torch.equal(held_noisy[:, :, 1:], noisy[:, :, 1:])
    _, t = student_inputs(torch.zeros(4000, 3, 1, 3, 1, 1), [1000.0, 999.0, 0.0], 3, torch.Generator().manual_seed(2),
                          first_frame_prob=0.25)
    # frame 0 is clean for the held samples (1/4) and for those whose chunk drew the clean state (1/3 of the rest)
    clean = (t[:, 0] == 0).float().mean().item()
    assert abs(clean - (0.25 + 0.75 / 3)) < 4 * (0.5 * 0.5 / 4000) ** 0.5


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_training_assets):
    root = write_training_assets(tmp_path_factory.mktemp("first_frame"))
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml")
    latents = torch.randn(3, 2, 16, 9, 4, 4).half().float()  # [N, K, C, F, h, w] of the 32x32 tiny preset
    write_lmdb(root / "pairs", ["a red blob", "a green blob", "a blue blob"], latents)
    return root, cfg, latents


def distiller_config(root, *overrides):
    return load_config(ROOT / "configs" / "tiny_train.yaml", [
        f"checkpoint_dir={root}", f"prompt_path={root / 'prompts.txt'}", "seed=7", "batch_size=2",
        "distill_loss=dmd", *overrides])


def test_distillation_rollouts_start_from_the_pairs_first_frames(assets, tmp_path):
    root, _, latents = assets
    info = init_distributed()
    try:
        d = distill.Distiller(Run.open(distiller_config(root, "first_frame_prob=1.0", f"data_path={root / 'pairs'}"),
                                       tmp_path, info))
        ids, prompts, _, x = d._rolled_out("generator", 0, 0, with_grad=False)
        pairs = {text: latents[i] for i, text in enumerate(["a red blob", "a green blob", "a blue blob"])}
        assert set(prompts) <= set(pairs) and len(ids) == 2
        for b, prompt in enumerate(prompts):
            assert torch.equal(x[b, :, 0], pairs[prompt][-1][:, 0])  # the clean state's frame 0
        again = d._rolled_out("generator", 0, 0, with_grad=False)
        assert again[1] == prompts and torch.equal(again[3], x)  # keyed: the same draws on a re-run
        plain = distill.Distiller(Run.open(distiller_config(root), tmp_path / "plain", info))
        assert plain.pairs is None and not set(plain._rolled_out("generator", 0, 0, with_grad=False)[1]) & set(pairs)
    finally:
        shutdown()


@pytest.mark.parametrize("overrides, message", [
    (["first_frame_prob=0.5"], "first_frame_prob > 0 takes its first frames from ODE pairs: set data_path"),
    (["first_frame_prob=1.5", "data_path=x"], "first_frame_prob is a probability, got 1.5"),
])
def test_first_frame_prob_needs_pairs_and_a_probability(assets, overrides, message):
    with pytest.raises(ConfigError, match=message):
        distill.Distiller.check(distiller_config(assets[0], *overrides))
