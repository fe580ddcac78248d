"""StreamingGenerator: text embeddings in, clean latent chunks out.

Upstream counterpart: pipeline/causal_inference.py of Self-Forcing.

Per chunk: a few denoising steps on the warped schedule (predict x0, re-noise it with fresh noise
at the next step), then one context pass on the clean chunk at t = 0 that only refreshes the KV
cache. The cache keeps a fixed window plus a sink, so memory and time per chunk do not grow with
the video's length. Works from text embeddings alone (no text encoder, no VAE), so benchmarks and
training drive the same loop as the CLI.

The prompt may change at any chunk boundary (`switch_prompt`), as in LongLive's interactive pipeline
(NVlabs/LongLive pipeline/interactive_causal_inference.py): the cross-attention K/V follow the new
prompt and the held window frames are re-encoded under it; `switch_sink` decides the sink's fate.

A video may start from clean latents instead of noise (reward_forcing/inference/conditioning.py makes them):
- `first_frame` (image-to-video): chunk 0 keeps it as its first frame at per-frame timestep 0 while its other
  frames are denoised, as CausVid's per-frame timesteps allow zero-shot (arXiv 2412.07772); later chunks as always.
- `prefix` (continuation): whole chunks run through context passes, chunk by chunk, so sink and window hold them
  exactly as if this generator had made them; the new chunks follow.
"""
from collections.abc import Callable, Iterator
from itertools import count

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.sampling import FlowMatchSchedule, warped_steps


def denoising_timesteps(cfg) -> list[float]:
    steps = [float(s) for s in cfg.denoising_step_list]
    return warped_steps(steps, cfg.timestep_shift) if cfg.warp_denoising_step else steps


def vae_strides(cfg) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE described by cfg.vae."""
    return 2 ** sum(bool(d) for d in cfg.vae.temperal_downsample), 2 ** (len(cfg.vae.dim_mult) - 1)


def latent_size(cfg, patch_size) -> tuple[int, int]:
    """Latent (height, width) for the configured pixel size; it must tile into whole patches."""
    _, stride = vae_strides(cfg)
    multiple_h, multiple_w = stride * patch_size[1], stride * patch_size[2]
    if cfg.height % multiple_h or cfg.width % multiple_w or cfg.height <= 0 or cfg.width <= 0:
        raise ConfigError(
            f"height={cfg.height} width={cfg.width} must be positive multiples of {multiple_h}x{multiple_w} pixels"
        )
    return cfg.height // stride, cfg.width // stride


SWITCH_SINK = ("keep", "recache")


def check_num_frames(num_frames: int, chunk_frames: int) -> None:
    if num_frames <= 0 or num_frames % chunk_frames:
        raise ConfigError(
            f"num_output_frames={num_frames} latent frames must be a positive multiple of the chunk size "
            f"num_frame_per_block={chunk_frames}"
        )


def pixel_frames(cfg, latent_frames: int) -> int:
    """Decoded frames for `latent_frames` latents: the first latent gives one frame, each later one gives stride."""
    temporal, _ = vae_strides(cfg)
    return 1 + temporal * (latent_frames - 1)


class StreamingGenerator:
    def __init__(self, model, schedule: FlowMatchSchedule, timesteps, chunk_frames: int, window_frames=None,
                 sink_frames: int = 0, sink_mode: str = "none", ema_alpha: float = 0.999, switch_sink: str = "keep"):
        if chunk_frames <= 0:
            raise ConfigError(f"num_frame_per_block must be positive, got {chunk_frames}")
        if not timesteps:
            raise ConfigError("denoising_step_list is empty")
        if switch_sink not in SWITCH_SINK:
            raise ConfigError(f"switch_sink must be one of {', '.join(SWITCH_SINK)}, got {switch_sink!r}")
        self.model = model
        self.schedule = schedule
        self.timesteps = [float(t) for t in timesteps]
        self.chunk_frames = chunk_frames
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sink_mode = sink_mode
        self.ema_alpha = ema_alpha
        self.switch_sink = switch_sink
        self.compiled_step = None  # set by compile()

    @staticmethod
    def cache_settings(cfg) -> dict:
        """The chunking and cache arguments of the constructor, from the streaming-student keys of a config."""
        return dict(chunk_frames=int(cfg.num_frame_per_block),
                    window_frames=None if cfg.local_attn_size == -1 else int(cfg.local_attn_size),
                    sink_frames=int(cfg.sink_size), sink_mode=str(cfg.sink_mode),
                    ema_alpha=float(cfg.compression_alpha), switch_sink=str(cfg.switch_sink))

    @classmethod
    def from_config(cls, model, cfg) -> "StreamingGenerator":
        return cls(model, FlowMatchSchedule(cfg.timestep_shift, sigma_lookup=cfg.sigma_lookup),
                   denoising_timesteps(cfg), **cls.cache_settings(cfg))

    def compile(self, mode=None) -> "StreamingGenerator":
        """torch.compile the model's in-place streaming step (CausalWanModel.static_step: fullgraph, static
        shapes) for this generator's streams; mode as torch.compile's (None = default, "reduce-overhead" = CUDA
        graphs on GPU). It runs once the cache is steady (KVCache.steady). Returns self."""
        self.compiled_step = torch.compile(self.model.static_step, fullgraph=True, dynamic=False, mode=mode)
        return self

    @property
    def forwards_per_chunk(self) -> int:
        return len(self.timesteps) + 1  # the denoising steps plus the context pass

    def new_cache(self, batch_size: int, static: bool = False):
        """static=True: the in-place streaming buffers (gradient-free calls only; see reward_forcing.cache)."""
        return self.model.new_cache(batch_size, window_frames=self.window_frames, sink_frames=self.sink_frames,
                                    sink_mode=self.sink_mode, ema_alpha=self.ema_alpha, static=static)

    @staticmethod
    def _noise(shape, device, dtype, generator) -> torch.Tensor:
        # Drawn in fp32 on the generator's device, so bf16 and fp32 runs share their noise.
        source = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device, dtype)

    def _timestep(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full((x.shape[0], x.shape[2]), t, device=x.device, dtype=torch.float32)

    def flow(self, cache, context, x: torch.Tensor, t: torch.Tensor, start_frame: int) -> torch.Tensor:
        """One DiT call on chunk x (frames from start_frame) at per-frame timesteps t [B, F] through `cache`.

        Gradient-free calls on a static cache take the model's in-place step (compiled once the cache is steady,
        after `compile`); every other call (autograd, or autocast, whose K/V dtype is not the buffers') takes the
        model's streaming step, which reads and writes the same cache."""
        in_place = cache.static and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
        if not in_place:
            return self.model.stream_step(x, t, context, cache, start_frame)
        inputs = self.model.static_step_inputs(x, t, context, cache, start_frame)
        if self.compiled_step is None or not cache.steady:
            return self.model.static_step(*inputs)
        for tensor in cache.in_place_tensors():
            # written in place / reused every call: CUDA graphs may keep their addresses instead of copying them
            torch._dynamo.mark_static_address(tensor, guard=False)
        return self.compiled_step(*inputs)

    def predict_x0(self, cache, context, x: torch.Tensor, t: float, start_frame: int,
                   clean_frames: int = 0) -> torch.Tensor:
        """One DiT call on chunk x at timestep t, converted from flow to the clean-latent estimate; the first
        `clean_frames` frames are clean and go in at timestep 0."""
        t_frames = self._timestep(x, t)
        t_frames[:, :clean_frames] = 0.0
        return self.schedule.flow_to_x0(self.flow(cache, context, x, t_frames, start_frame), x, t_frames)

    def denoise_chunk(self, cache, context, x: torch.Tensor, start_frame: int, generator=None,
                      first_frame: torch.Tensor | None = None) -> torch.Tensor:
        """Pure noise x [B, C, f, h, w] for frames [start_frame, start_frame + f) -> predicted clean chunk.

        first_frame: clean latents [B, C, k, h, w] that replace the chunk's first k frames at every step (at
        timestep 0) and in the result, while the other frames are denoised (image-to-video)."""
        held = 0 if first_frame is None else first_frame.shape[2]
        for i, t in enumerate(self.timesteps):
            x = _hold(x, first_frame)
            x0 = self.predict_x0(cache, context, x, t, start_frame, held)
            if i + 1 < len(self.timesteps):
                noise = self._noise(x0.shape, x0.device, x0.dtype, generator)
                x = self.schedule.add_noise(x0, noise, self._timestep(x0, self.timesteps[i + 1]))
        return _hold(x0, first_frame)

    def context_pass(self, cache, context, x0: torch.Tensor, start_frame: int) -> None:
        """Rewrite the chunk's cache slots with clean (t = 0) keys/values; the output is not needed."""
        self.flow(cache, context, x0, self._timestep(x0, 0.0), start_frame)

    def switch_prompt(self, cache, context: torch.Tensor, held: dict[int, torch.Tensor], next_frame: int) -> None:
        """Continue the video at chunk boundary `next_frame` under `context`.

        Cross-attention K/V are recomputed from `context` at the next call; the held window frames (clean
        latents `held[start]` of the chunks from cache.first_rewritable_chunk on) are re-encoded under it by
        context passes, oldest first, each attending to the sink and the re-encoded frames before it. The sink
        is kept (`switch_sink: keep`) or rebuilt from the video's first chunk `held[0]` under the new prompt
        (`recache`; an EMA sink thereby drops what it had blended in).
        """
        cache.reset_cross()
        if next_frame == 0:
            return
        if self.switch_sink == "recache" and self.sink_frames:
            fresh = self.new_cache(context.shape[0])
            self.context_pass(fresh, context, held[0], 0)
            for layer, new in zip(cache.layers, fresh.layers):
                for stored, value in zip(layer.sink, new.sink):
                    stored.copy_(value)
        first = cache.layers[0].first_rewritable_chunk(self.chunk_frames)
        cache.rewind(first)
        for start in range(first, next_frame, self.chunk_frames):
            self.context_pass(cache, context, held[start], start)

    def replay(self, cache, context, prefix: torch.Tensor, held: dict | None = None, dtype=None) -> int:
        """Continuation: write clean latents `prefix` [B, C, P, h, w] (P a multiple of the chunk) into `cache` by
        context passes, chunk by chunk from frame 0, as a stream that generated them leaves it; with `held`, keep
        what a later switch_prompt re-encodes. Returns P, the first frame to generate."""
        frames = prefix.shape[2]
        if frames == 0 or frames % self.chunk_frames:
            raise ConfigError(f"a prefix of {frames} latent frames is not a positive multiple of the chunk size "
                              f"num_frame_per_block={self.chunk_frames}")
        for start in range(0, frames, self.chunk_frames):
            x0 = prefix[:, :, start:start + self.chunk_frames].to(device=context.device, dtype=dtype or context.dtype)
            self.context_pass(cache, context, x0, start)
            if held is not None:
                self._keep_for_switch(held, start, x0, cache)
        return frames

    def _keep_for_switch(self, held: dict, start: int, x0: torch.Tensor, cache) -> None:
        """Hold the clean chunks a later switch_prompt may re-encode: the first one and those still in the window."""
        held[start] = x0
        oldest = cache.layers[0].first_rewritable_chunk(self.chunk_frames)
        for old in [s for s in held if 0 < s < oldest]:
            del held[old]

    @torch.no_grad()
    def stream(self, context: torch.Tensor, num_frames: int | None, latent_hw: tuple[int, int], generator=None,
               noise: torch.Tensor | None = None, dtype=None,
               switch: Callable[[int], torch.Tensor | None] | None = None, first_frame: torch.Tensor | None = None,
               prefix: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield clean latent chunks [B, C, chunk, h, w] for a video of `num_frames` latent frames.

        context: text embeddings [B, L, text_dim]. Noise is drawn chunk by chunk from `generator`
        (or sliced from `noise` [B, C, F, h, w]), so nothing proportional to the length is held.
        switch(start_frame), asked before every chunk, returns new text embeddings to continue under
        (see switch_prompt) or None. num_frames=None streams until the caller stops iterating.
        first_frame: clean latents [B, C, 1, h, w] that chunk 0 starts from (image-to-video, see denoise_chunk).
        prefix: clean latents [B, C, P, h, w] the video continues (see replay): the yielded chunks are the new
        ones, frames P.. of the video (switch and cache positions count from the prefix's first frame; `noise`
        covers the new frames only).
        """
        if first_frame is not None and prefix is not None:
            raise ValueError("a video starts from a first frame or continues a prefix, not both")
        if num_frames is not None:
            check_num_frames(num_frames, self.chunk_frames)
        elif noise is not None:
            raise ValueError("an endless stream (num_frames=None) draws its noise from `generator`")
        batch = context.shape[0]
        dtype = dtype or context.dtype
        shape = (batch, self.model.in_dim, self.chunk_frames, *latent_hw)
        cache = self.new_cache(batch, static=True)
        held = {}
        first = 0
        if prefix is not None:
            first = self.replay(cache, context, prefix, held if switch is not None else None, dtype)
        starts = count(first, self.chunk_frames) if num_frames is None else range(first, first + num_frames,
                                                                                   self.chunk_frames)
        for start in starts:
            new_context = switch(start) if switch is not None else None
            if new_context is not None:
                context = new_context
                self.switch_prompt(cache, context, held, start)
            if noise is not None:
                x = noise[:, :, start - first:start - first + self.chunk_frames].to(device=context.device, dtype=dtype)
            else:
                x = self._noise(shape, context.device, dtype, generator)
            picture = {"first_frame": first_frame} if start == 0 and first_frame is not None else {}
            x0 = self.denoise_chunk(cache, context, x, start, generator, **picture)  # subclasses may not take one
            self.context_pass(cache, context, x0, start)
            if switch is not None:
                self._keep_for_switch(held, start, x0, cache)
            yield x0


def _hold(x: torch.Tensor, clean: torch.Tensor | None) -> torch.Tensor:
    """x with its first frames replaced by the clean latents `clean` (None: x as it is)."""
    if clean is None:
        return x
    return torch.cat([clean.to(device=x.device, dtype=x.dtype), x[:, :, clean.shape[2]:]], dim=2)
