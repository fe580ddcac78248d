"""Self-forcing rollout of the causal student (SPEC §9.2), on the inference sampler's schedule and cache.

Each chunk runs the denoising steps of the inference sampler up to a random exit step; only the exit
step's forward carries gradient, and every input to it (noisy latent, cached K/V, re-noising) is
detached, so no gradient crosses chunks or steps. Then a context pass refreshes the chunk's cache
slots, exactly as at inference (clean x0 at t = 0 unless `context_noise` > 0).

Cache modes: `full` attends like upstream training (the window slides but the sink stays the clean
first chunk: sink_mode static), `window` uses the configured sink policy (EMA-Sink fires on
eviction, as at inference).
"""
import torch

from reward_forcing.errors import ConfigError
from reward_forcing.inference.generator import StreamingGenerator, check_num_frames
from reward_forcing.training.rng import keyed_randint, keyed_randn

CACHE_MODES = ("full", "window")


def training_sampler(model, cfg) -> StreamingGenerator:
    """The inference sampler configured for training rollouts (`rollout_cache` picks the sink policy)."""
    if cfg.rollout_cache not in CACHE_MODES:
        raise ConfigError(f"rollout_cache must be one of {', '.join(CACHE_MODES)}; got '{cfg.rollout_cache}'")
    sampler = StreamingGenerator.from_config(model, cfg)
    if cfg.rollout_cache == "full":
        sampler.sink_mode = "static" if sampler.sink_frames > 0 else "none"
    return sampler


def exit_steps(cfg, num_steps: int, num_chunks: int, *key) -> list[int]:
    """Exit step per chunk, drawn from `key` only, so every rank draws the same (FSDP needs equal forward counts)."""
    if cfg.last_step_only:
        return [num_steps - 1] * num_chunks
    if cfg.same_step_across_blocks:
        return [keyed_randint(num_steps, *key, "exit")] * num_chunks
    return [keyed_randint(num_steps, *key, "exit", chunk) for chunk in range(num_chunks)]


def sample_noise(shape, seed, *key, sample_ids, dtype, device) -> torch.Tensor:
    """Noise [B, ...] whose row b depends only on (seed, key, sample_ids[b]), not on the batch layout."""
    return torch.stack([keyed_randn(shape, seed, *key, i, dtype=dtype, device=device) for i in sample_ids])


def rollout(sampler: StreamingGenerator, context: torch.Tensor, num_frames: int, latent_hw, exits: list[int],
            seed: int, key: tuple, sample_ids: list[int], dtype, context_noise: float = 0.0,
            with_grad: bool = True) -> torch.Tensor:
    """Generate [B, C, num_frames, h, w]; with_grad keeps each chunk's exit-step graph."""
    chunk = sampler.chunk_frames
    check_num_frames(num_frames, chunk)
    model, schedule, timesteps = sampler.model, sampler.schedule, sampler.timesteps
    device, batch = context.device, context.shape[0]
    chunk_shape = (model.in_dim, chunk, *latent_hw)
    cache = sampler.new_cache(batch)
    chunks = []
    for index, start in enumerate(range(0, num_frames, chunk)):
        def noise(*step):
            return sample_noise(chunk_shape, seed, *key, index, *step, sample_ids=sample_ids, dtype=dtype,
                                device=device)

        x = noise("init")
        with torch.no_grad():
            for step in range(exits[index]):
                x0 = _predict_x0(sampler, cache, context, x, timesteps[step], start)
                x = schedule.add_noise(x0, noise(step), _frame_t(x0, timesteps[step + 1]))
        with torch.set_grad_enabled(with_grad):
            x0 = _predict_x0(sampler, cache, context, x, timesteps[exits[index]], start)
        with torch.no_grad():
            clean = x0.detach()
            if context_noise > 0:
                t = _frame_t(clean, context_noise)
                model(schedule.add_noise(clean, noise("context"), t), t, context, cache=cache, start_frame=start)
            else:
                sampler.context_pass(cache, context, clean, start)
        chunks.append(x0)
    return torch.cat(chunks, dim=2)


def _frame_t(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0], x.shape[2]), float(t), device=x.device, dtype=torch.float32)


def _predict_x0(sampler, cache, context, x, t, start):
    t_frames = _frame_t(x, t)
    flow = sampler.model(x, t_frames, context, cache=cache, start_frame=start)
    return sampler.schedule.flow_to_x0(flow, x, t_frames)
