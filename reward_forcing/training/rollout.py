"""Self-forcing rollout of the causal student (Self Forcing, arXiv 2506.08009, Algorithm 1), on the inference
sampler's schedule and cache.

Each chunk runs the denoising steps of the inference sampler up to a random exit step; only the exit step's
forward carries gradient, and its noisy input and re-noising are detached. Then a context pass refreshes the
chunk's cache slots, exactly as at inference (clean x0 at t = 0 unless `context_noise` > 0).

Gradient across chunks (`rollout_cache_grad`):
- `straight_through` (what trained the released Self Forcing and Reward Forcing checkpoints): a later chunk
  attends to the context-pass K/V of earlier frames while their gradient flows into the K/V that those frames'
  exit step computed, i.e. it attends to `k_ctx + (k_exit - k_exit.detach())`, through sink and window
  alike. Upstream gets this by writing the exit step's K/V into its cache buffer in place under autograd and
  overwriting the values in the no-grad context pass (pipeline/self_forcing_training.py with
  wan/modules/causal_model.py in JaydenLyh/Reward-Forcing). A sink frame's gradient goes to the exit step of
  the chunk that first wrote it; an EMA-Sink blend (`window` mode) changes its value only.
- `detached` (the Algorithm 1 of the paper): cached K/V are constants, so no gradient crosses chunks.
Both give identical forward values, with or without activation checkpointing.

Image-conditioned rollouts (`first_frame_prob`): the samples given a clean first frame keep it as frame 0 of chunk
0 at timestep 0 in every forward of that chunk, as the StreamingGenerator does with a picture at inference
(reward_forcing/inference/generator.py); their other frames are rolled out as always.

Cache modes: `full` attends like upstream training (the window slides but the sink stays the clean
first chunk: sink_mode static), `window` uses the configured sink policy (EMA-Sink fires on
eviction, as at inference).
"""
import torch
import torch.utils.checkpoint

from reward_forcing.inference.generator import StreamingGenerator, check_num_frames
from reward_forcing.rng import keyed_randint, keyed_randn

def training_sampler(model, cfg) -> StreamingGenerator:
    """The inference sampler configured for training rollouts (`rollout_cache` picks the sink policy)."""
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


class _ExitLayer:
    """One layer's cache as an exit-step forward sees it. The first update writes the real cache and keeps the
    (detached) context K/V it returned; a recomputation (activation checkpointing, during backward, when the
    cache has moved on) gets that same context with its own live K/V appended and writes nothing.

    live: None (detached), or {frame: (k, v)} of the exit-step K/V of earlier frames, which the attended
    context K/V take their gradient from (straight-through); this update adds its own chunk's frames to it."""

    def __init__(self, layer, live):
        self.layer, self.live, self.saved = layer, live, None

    @property
    def cross(self):  # the block keeps its cross-attention K/V in the real cache layer
        return self.layer.cross

    @cross.setter
    def cross(self, kv):
        self.layer.cross = kv

    def _first_update(self, k, v, start_frame: int, frame_tokens: int):
        n, frames = k.shape[1], k.shape[1] // frame_tokens
        keys, values, query_start = self.layer.update(k, v, start_frame, frame_tokens)
        old = self.layer.attended_frames[:len(self.layer.attended_frames) - frames]
        exits = None
        if self.live is not None:
            exits = [self.live[frame] for frame in old]
            for index in range(frames):
                tokens = slice(index * frame_tokens, (index + 1) * frame_tokens)
                self.live[start_frame + index] = (k[:, tokens], v[:, tokens])
            for frame in set(self.live) - set(self.layer.attended_frames):  # out of every later window
                del self.live[frame]
        return keys[:, :keys.shape[1] - n].detach(), values[:, :values.shape[1] - n].detach(), query_start, exits

    def update(self, k, v, start_frame: int, frame_tokens: int):
        if self.saved is None:
            self.saved = self._first_update(k, v, start_frame, frame_tokens)
        old_keys, old_values, query_start, exits = self.saved
        if exits:
            old_keys = _straight_through(old_keys, torch.cat([k_exit for k_exit, _ in exits], dim=1))
            old_values = _straight_through(old_values, torch.cat([v_exit for _, v_exit in exits], dim=1))
        return torch.cat([old_keys, k], dim=1), torch.cat([old_values, v], dim=1), query_start


def _straight_through(value: torch.Tensor, grad_path: torch.Tensor) -> torch.Tensor:
    """`value` forward, gradient into `grad_path` (same shape)."""
    return value + (grad_path - grad_path.detach())


class _ExitCache:
    """A KV cache view for one exit-step forward (see _ExitLayer). Under checkpointing the snapshot holds the
    attended context K/V of every layer (1.3B, 9 frames, bf16: about 2.6 GB per chunk), far less than the
    chunk's activations that checkpointing frees."""

    def __init__(self, cache, live):
        self.layers = [_ExitLayer(layer, None if live is None else live[i]) for i, layer in enumerate(cache.layers)]


def _exit_forward(sampler, cache, live, context, x, t, start, checkpoint: bool, first=None):
    if not torch.is_grad_enabled() or (live is None and not checkpoint):
        return _predict_x0(sampler, cache, context, x, t, start, first)  # the cache's own K/V are detached
    view = _ExitCache(cache, live)
    if not checkpoint:
        return _predict_x0(sampler, view, context, x, t, start, first)
    return torch.utils.checkpoint.checkpoint(_predict_x0, sampler, view, context, x, t, start, first,
                                             use_reentrant=False)


def rollout(sampler: StreamingGenerator, context: torch.Tensor, num_frames: int, latent_hw, exits: list[int],
            seed: int, key: tuple, sample_ids: list[int], dtype, context_noise: float = 0.0,
            with_grad: bool = True, checkpoint: bool = False, cache_grad: str = "detached",
            first_frame: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Generate [B, C, num_frames, h, w]; with_grad keeps each chunk's exit-step graph. checkpoint: keep only
    the exit step's inputs and recompute its activations during backward (one chunk at a time). cache_grad:
    `straight_through` or `detached` gradient across chunks (module docstring; the config's type checks it).
    first_frame: (latents [B, C, 1, h, w], mask [B] bool): the samples of `mask` start from their clean first
    frame (module docstring)."""
    chunk = sampler.chunk_frames
    check_num_frames(num_frames, chunk)
    model, schedule, timesteps = sampler.model, sampler.schedule, sampler.timesteps
    device, batch = context.device, context.shape[0]
    chunk_shape = (model.in_dim, chunk, *latent_hw)
    cache = sampler.new_cache(batch)
    live = [{} for _ in cache.layers] if cache_grad == "straight_through" else None
    chunks = []
    for index, start in enumerate(range(0, num_frames, chunk)):
        def noise(*step):
            return sample_noise(chunk_shape, seed, *key, index, *step, sample_ids=sample_ids, dtype=dtype,
                                device=device)

        first = first_frame if index == 0 else None
        x = _with_first_frame(noise("init"), first)
        with torch.no_grad():
            for step in range(exits[index]):
                x0 = _predict_x0(sampler, cache, context, x, timesteps[step], start, first)
                x = _with_first_frame(schedule.add_noise(x0, noise(step), _frame_t(x0, timesteps[step + 1])), first)
        with torch.set_grad_enabled(with_grad):
            x0 = _exit_forward(sampler, cache, live, context, x, timesteps[exits[index]], start, checkpoint, first)
            x0 = _with_first_frame(x0, first)
        with torch.no_grad():
            clean = x0.detach()
            if context_noise > 0:
                t = _frame_t(clean, context_noise)
                model.stream_step(schedule.add_noise(clean, noise("context"), t), t, context, cache, start)
            else:
                sampler.context_pass(cache, context, clean, start)
        chunks.append(x0)
    return torch.cat(chunks, dim=2)


def _frame_t(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0], x.shape[2]), float(t), device=x.device, dtype=torch.float32)


def _predict_x0(sampler, cache, context, x, t, start, first=None):
    t_frames = _frame_t(x, t)
    if first is not None:  # the held first frames go in at timestep 0
        t_frames[:, 0] = t_frames[:, 0].masked_fill(first[1].to(x.device), 0.0)
    flow = sampler.model.stream_step(x, t_frames, context, cache, start)
    return sampler.schedule.flow_to_x0(flow, x, t_frames)


def _with_first_frame(x: torch.Tensor, first) -> torch.Tensor:
    """x with frame 0 of the samples of first[1] replaced by their clean first frame first[0] (None: x)."""
    if first is None:
        return x
    latents, mask = first
    frame = torch.where(mask.to(x.device).view(-1, 1, 1, 1, 1), latents.to(x), x[:, :, :1])
    return torch.cat([frame, x[:, :, 1:]], dim=2)


def training_rollout(sampler: StreamingGenerator, cfg, context: torch.Tensor, latent_hw, seed: int, purpose: str,
                     step: int, micro: int, sample_ids: list[int], dtype, with_grad: bool,
                     first_frame=None) -> torch.Tensor:
    """A rollout of `num_training_frames` with the configured exit steps, context noise, checkpointing and gradient
    across chunks; every draw keyed by (seed, purpose, step, micro-batch, global sample index). first_frame: see
    rollout."""
    frames = int(cfg.num_training_frames)
    exits = exit_steps(cfg, len(sampler.timesteps), frames // sampler.chunk_frames, seed, purpose, step, micro)
    return rollout(sampler, context, frames, latent_hw, exits, seed, (purpose, step), sample_ids, dtype,
                   float(cfg.context_noise), with_grad=with_grad, checkpoint=bool(cfg.gradient_checkpointing),
                   cache_grad=str(cfg.rollout_cache_grad), first_frame=first_frame)
