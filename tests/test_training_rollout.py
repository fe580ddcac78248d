"""Self-forcing rollout: train/test parity with the inference sampler, the cache switch, exit steps, gradients."""
from pathlib import Path

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.testing.closed_forms import grid_sigma
from reward_forcing.training.rollout import exit_steps, rollout, sample_noise, training_sampler

CONFIGS = Path(__file__).parents[1] / "configs"
HW = (4, 4)


def _setup(*overrides):
    cfg = load_config(CONFIGS / "tiny_train.yaml", list(overrides))
    torch.manual_seed(0)
    model = CausalWanModel(dim=32, ffn_dim=48, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=8,
                           text_len=4, freq_dim=16, num_frame_per_block=3, local_attn_size=cfg.local_attn_size)
    context = torch.randn(2, 4, 8)
    return cfg, model, context


def _on_stream_step(model, record):
    """record(x, t, flow) after every streaming step of the model (each DiT call of a rollout)."""
    step = model.stream_step

    def spy(x, t, context, cache, start_frame=0):
        flow = step(x, t, context, cache, start_frame)
        record(x, t, flow)
        return flow

    model.stream_step = spy


def _initial_noise(sampler, frames, key, ids):
    shape = (sampler.model.in_dim, sampler.chunk_frames, *HW)
    return torch.cat([sample_noise(shape, 3, *key, c, "init", sample_ids=ids, dtype=torch.float32, device="cpu")
                      for c in range(frames // sampler.chunk_frames)], dim=2)


@pytest.mark.parametrize("mode", ["full", "window"])
def test_last_step_rollout_equals_the_inference_sampler(mode):
    # a one-step schedule has no re-noising, so the two loops see identical noise
    cfg, model, context = _setup(f"rollout_cache={mode}", "denoising_step_list=[1000]")
    sampler = training_sampler(model, cfg)
    assert sampler.sink_mode == ("static" if mode == "full" else "ema")
    with torch.no_grad():
        x = rollout(sampler, context, 9, HW, [0, 0, 0], 3, ("g", 0), [5, 6], torch.float32, with_grad=False)
        reference = torch.cat(list(sampler.stream(context, 9, HW, noise=_initial_noise(sampler, 9, ("g", 0), [5, 6]))),
                              dim=2)
    assert torch.equal(x, reference)


@pytest.mark.parametrize("mode", ["full", "window"])
def test_four_step_rollout_equals_the_inference_sampler_with_the_same_step_noise(mode):
    """Bug caught: the rollout re-noising the wrong tensor between denoising steps (x instead of x0), at the wrong
    timestep, or with noise of another step / chunk. The reference is StreamingGenerator.stream fed the same
    initial noise and, between steps, the same per-step noise in the order it draws them (chunk by chunk)."""
    cfg, model, context = _setup(f"rollout_cache={mode}", "compression_alpha=0.7")
    sampler = training_sampler(model, cfg)
    steps, chunks, ids = len(sampler.timesteps), 3, [5, 6]
    assert steps == 4
    with torch.no_grad():
        x = rollout(sampler, context, 9, HW, [steps - 1] * chunks, 3, ("g", 0), ids, torch.float32, with_grad=False)
        shape = (model.in_dim, sampler.chunk_frames, *HW)
        step_noise = iter([sample_noise(shape, 3, "g", 0, c, s, sample_ids=ids, dtype=torch.float32, device="cpu")
                           for c in range(chunks) for s in range(steps - 1)])
        sampler._noise = lambda *args, **kwargs: next(step_noise)  # the sampler's per-step draw
        reference = torch.cat(list(sampler.stream(context, 9, HW, noise=_initial_noise(sampler, 9, ("g", 0), ids))),
                              dim=2)
    assert next(step_noise, None) is None  # the sampler consumed exactly the rollout's re-noising draws
    assert torch.equal(x, reference)


def test_context_noise_noises_the_context_pass():
    """Bug caught: `context_noise` ignored (the context pass always sees the clean chunk at t = 0). With
    context_noise c the pass after each chunk runs at t = c on (1 - sigma(c)) x0 + sigma(c) eps, eps ~ N(0, 1),
    which changes the cache and so every later chunk, never the first."""
    cfg, model, context = _setup("denoising_step_list=[1000]")
    sampler = training_sampler(model, cfg)
    calls = []
    _on_stream_step(model, lambda x, t, out: calls.append((x.clone(), t.clone(), out.clone())))
    outs = {}
    for c in (0.0, 300.0):
        calls.clear()
        with torch.no_grad():
            outs[c] = rollout(sampler, context, 9, HW, [0, 0, 0], 3, ("g", 0), [0, 1], torch.float32,
                              context_noise=c, with_grad=False)
        assert len(calls) == 6  # per chunk: one denoising step, one context pass
        for chunk in range(3):
            x0 = outs[c][:, :, 3 * chunk:3 * chunk + 3].double()
            x_in, t_in, _ = calls[2 * chunk + 1]
            assert torch.equal(t_in, torch.full_like(t_in, c))
            if c == 0:
                assert torch.equal(x_in.double(), x0)
                continue
            sigma = float(grid_sigma(c, cfg.timestep_shift))
            eps = (x_in.double() - (1 - sigma) * x0) / sigma
            assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1) < 0.2
    assert torch.equal(outs[0.0][:, :, :3], outs[300.0][:, :, :3])
    assert (outs[0.0][:, :, 3:] - outs[300.0][:, :, 3:]).abs().max() > 1e-3


def test_window_cache_runs_the_ema_sink_full_does_not():
    # window 6 frames, sink 3: the third chunk evicts; only `window` then blends the evicted chunk into the sink
    outs = {}
    for mode in ("full", "window"):
        cfg, model, context = _setup(f"rollout_cache={mode}", "denoising_step_list=[1000]", "compression_alpha=0.7")
        outs[mode] = rollout(training_sampler(model, cfg), context, 9, HW, [0, 0, 0], 3, ("g", 0), [0, 1],
                             torch.float32, with_grad=False)
    assert torch.equal(outs["full"][:, :, :6], outs["window"][:, :, :6])
    assert not torch.allclose(outs["full"][:, :, 6:], outs["window"][:, :, 6:])


def test_exit_steps_shared_per_chunk_keyed_and_last_only():
    cfg, _, _ = _setup()
    draws = [exit_steps(cfg, 4, 3, 9, "generator", step, 0) for step in range(20)]
    assert all(len(set(d)) == 1 for d in draws) and {d[0] for d in draws} == {0, 1, 2, 3}
    assert draws == [exit_steps(cfg, 4, 3, 9, "generator", step, 0) for step in range(20)]  # same key, same exit
    per_chunk, _, _ = _setup("same_step_across_blocks=false")
    assert any(len(set(exit_steps(per_chunk, 4, 3, 9, "g", s, 0))) > 1 for s in range(20))
    last, _, _ = _setup("last_step_only=true")
    assert exit_steps(last, 4, 3, 9, "g", 0, 0) == [3, 3, 3]


def test_noise_depends_on_the_sample_not_the_batch_layout():
    both = sample_noise((2, 3), 1, "k", sample_ids=[4, 5], dtype=torch.float32, device="cpu")
    alone = sample_noise((2, 3), 1, "k", sample_ids=[5], dtype=torch.float32, device="cpu")
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])


def test_gradient_only_through_the_exit_forward():
    cfg, model, context = _setup("denoising_step_list=[1000, 750, 500, 250]")
    sampler = training_sampler(model, cfg)
    calls = []
    _on_stream_step(model, lambda x, t, out: calls.append(out.requires_grad))
    x = rollout(sampler, context, 9, HW, [2, 2, 2], 3, ("g", 0), [0, 1], torch.float32, with_grad=True)
    # per chunk: 2 no-grad steps, the exit step with grad, the no-grad context pass
    assert calls == [False, False, True, False] * 3
    assert x.requires_grad
    x.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    calls.clear()
    assert not rollout(sampler, context, 9, HW, [1, 1, 1], 3, ("g", 0), [0, 1], torch.float32,
                       with_grad=False).requires_grad
    assert calls == [False, False, False] * 3


@pytest.mark.parametrize("mode", ["full", "window"])
def test_checkpointed_exit_forward_gives_the_same_gradients(mode):
    # the recomputation runs after later chunks changed the cache (and, in window mode, evicted into the sink)
    grads = {}
    for checkpoint in (False, True):
        cfg, model, context = _setup(f"rollout_cache={mode}", "compression_alpha=0.7")
        calls = []
        _on_stream_step(model, lambda x, t, out: calls.append(out.requires_grad))
        x = rollout(training_sampler(model, cfg), context, 9, HW, [1, 2, 0], 3, ("g", 0), [0, 1], torch.float32,
                    with_grad=True, checkpoint=checkpoint)
        (x * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
        grads[checkpoint] = {n: p.grad.clone() for n, p in model.named_parameters()}
        # 1 + 2 + 0 no-grad steps, 3 exit forwards, 3 context passes, and 3 recomputations when checkpointing
        assert len(calls) == 3 + 3 + 3 + (3 if checkpoint else 0)
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, rtol=1e-5, atol=1e-7), name
