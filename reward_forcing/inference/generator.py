"""StreamingGenerator: text embeddings in, clean latent chunks out (SPEC §4).

Per chunk: a few denoising steps on the warped schedule (predict x0, re-noise it with fresh noise
at the next step), then one context pass on the clean chunk at t = 0 that only refreshes the KV
cache. The cache keeps a fixed window plus a sink, so memory and time per chunk do not grow with
the video's length. Works from text embeddings alone (no text encoder, no VAE), so benchmarks and
training drive the same loop as the CLI.
"""
from collections.abc import Iterator

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
                 sink_frames: int = 0, sink_mode: str = "none", ema_alpha: float = 0.999):
        if chunk_frames <= 0:
            raise ConfigError(f"num_frame_per_block must be positive, got {chunk_frames}")
        if not timesteps:
            raise ConfigError("denoising_step_list is empty")
        self.model = model
        self.schedule = schedule
        self.timesteps = [float(t) for t in timesteps]
        self.chunk_frames = chunk_frames
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sink_mode = sink_mode
        self.ema_alpha = ema_alpha

    @classmethod
    def from_config(cls, model, cfg) -> "StreamingGenerator":
        window = None if cfg.local_attn_size == -1 else int(cfg.local_attn_size)
        return cls(
            model,
            FlowMatchSchedule(cfg.timestep_shift, sigma_lookup=cfg.sigma_lookup),
            denoising_timesteps(cfg),
            chunk_frames=int(cfg.num_frame_per_block),
            window_frames=window,
            sink_frames=int(cfg.sink_size),
            sink_mode=str(cfg.sink_mode),
            ema_alpha=float(cfg.compression_alpha),
        )

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

    def predict_x0(self, cache, context, x: torch.Tensor, t: float, start_frame: int) -> torch.Tensor:
        """One DiT call on chunk x at timestep t (all frames), converted from flow to the clean-latent estimate."""
        t_frames = self._timestep(x, t)
        flow = self.model(x, t_frames, context, cache=cache, start_frame=start_frame)
        return self.schedule.flow_to_x0(flow, x, t_frames)

    def denoise_chunk(self, cache, context, x: torch.Tensor, start_frame: int, generator=None) -> torch.Tensor:
        """Pure noise x [B, C, f, h, w] for frames [start_frame, start_frame + f) -> predicted clean chunk."""
        for i, t in enumerate(self.timesteps):
            x0 = self.predict_x0(cache, context, x, t, start_frame)
            if i + 1 < len(self.timesteps):
                noise = self._noise(x0.shape, x0.device, x0.dtype, generator)
                x = self.schedule.add_noise(x0, noise, self._timestep(x0, self.timesteps[i + 1]))
        return x0

    def context_pass(self, cache, context, x0: torch.Tensor, start_frame: int) -> None:
        """Rewrite the chunk's cache slots with clean (t = 0) keys/values; the output is not needed."""
        self.model(x0, self._timestep(x0, 0.0), context, cache=cache, start_frame=start_frame)

    @torch.no_grad()
    def stream(self, context: torch.Tensor, num_frames: int, latent_hw: tuple[int, int], generator=None,
               noise: torch.Tensor | None = None, dtype=None) -> Iterator[torch.Tensor]:
        """Yield clean latent chunks [B, C, chunk, h, w] for a video of `num_frames` latent frames.

        context: text embeddings [B, L, text_dim]. Noise is drawn chunk by chunk from `generator`
        (or sliced from `noise` [B, C, F, h, w]), so nothing proportional to the length is held.
        """
        check_num_frames(num_frames, self.chunk_frames)
        batch = context.shape[0]
        dtype = dtype or context.dtype
        shape = (batch, self.model.in_dim, self.chunk_frames, *latent_hw)
        cache = self.new_cache(batch, static=True)
        for start in range(0, num_frames, self.chunk_frames):
            if noise is not None:
                x = noise[:, :, start:start + self.chunk_frames].to(device=context.device, dtype=dtype)
            else:
                x = self._noise(shape, context.device, dtype, generator)
            x0 = self.denoise_chunk(cache, context, x, start, generator)
            self.context_pass(cache, context, x0, start)
            yield x0
