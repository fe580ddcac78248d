"""Many-step sampling of an autoregressive diffusion model: the Causal Forcing teacher (arXiv 2602.02214 §4; upstream's
pipeline/causal_diffusion_inference.py and utils/ode_generation.py in thu-ml/Causal-Forcing).

The teacher is the causal student's architecture trained by diffusion with teacher forcing
(reward_forcing/training/diffusion.py, `causal: true`): a chunk is denoised while attending to the clean chunks before
it. It samples as the student streams — chunk by chunk through the same KV cache, each chunk followed by the context
pass that writes its clean K/V — but a chunk is integrated by the guided Euler ODE over many steps
(reward_forcing/sampling.py `euler_ode`) instead of the student's few x0 predictions with fresh noise in between.
Classifier-free guidance runs the conditional and the unconditional branch as one batch of two through one cache, so
the unconditional branch too attends to the clean chunks under its own prompt (upstream keeps two caches).
"""
import torch

from reward_forcing.inference.generator import StreamingGenerator
from reward_forcing.sampling import FlowMatchSchedule, classifier_free_guidance, euler_ode, euler_sigmas


class ARTeacherSampler(StreamingGenerator):
    """A StreamingGenerator whose chunks are solved by the guided Euler ODE on `sigmas` (1 .. 0).

    uncond: the unconditional text embedding [1, L, text_dim] (guidance off when None); guidance_scale s gives
    u + s (c - u), Wan's form. Cache arguments as StreamingGenerator's."""

    def __init__(self, model, sigmas, chunk_frames: int, guidance_scale: float = 1.0, uncond=None, **cache):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        # sigma = t / 1000 exactly: the Euler grid is the teacher's own, not the student's 1000-point training grid
        super().__init__(model, FlowMatchSchedule(1.0, sigma_lookup="exact"), (1000 * sigmas[:-1]).tolist(),
                         chunk_frames, **cache)
        self.sigmas = sigmas
        self.guidance_scale = float(guidance_scale)
        self.uncond = uncond

    @classmethod
    def from_config(cls, model, cfg, uncond=None) -> "ARTeacherSampler":
        """The pair-generation sampler: `ode_num_steps` Euler steps at `ode_shift`, CFG `ode_guidance_scale` against
        `uncond`, the streaming student's chunk and cache settings."""
        return cls(model, euler_sigmas(cfg.ode_num_steps, cfg.ode_shift), guidance_scale=cfg.ode_guidance_scale,
                   uncond=uncond, **cls.cache_settings(cfg))

    def flow(self, cache, context, x, t, start_frame):
        """The guided flow of chunk x; both branches write their K/V into `cache` (a batch of 2B)."""
        if self.uncond is None:
            return super().flow(cache, context, x, t, start_frame)
        uncond = self.uncond.to(device=context.device, dtype=context.dtype).expand(context.shape[0], -1, -1)
        both = super().flow(cache, torch.cat([context, uncond]), torch.cat([x, x]), torch.cat([t, t]), start_frame)
        cond, unconditional = both.float().chunk(2)
        return classifier_free_guidance(cond, unconditional, self.guidance_scale - 1).to(x.dtype)

    def chunk_trajectory(self, cache, context, x: torch.Tensor, start_frame: int, keep=()):
        """Chunk x (pure noise) for frames [start_frame, start_frame + f) integrated through `cache`: (the clean
        chunk, its states at the Euler step indices `keep`)."""
        def flow(state, t):
            return self.flow(cache, context, state, self._timestep(state, t), start_frame)

        return euler_ode(flow, x, self.sigmas, keep)

    def denoise_chunk(self, cache, context, x: torch.Tensor, start_frame: int, generator=None) -> torch.Tensor:
        return self.chunk_trajectory(cache, context, x, start_frame)[0]
