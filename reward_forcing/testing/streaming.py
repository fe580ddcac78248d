"""A tiny causal Wan model and StreamingGenerator, and the oracle the streaming tests compare the generator with
(tests/test_streaming_generator.py, test_conditioned_stream.py, test_fast_path.py): the sampler written out with
the model's cache-free teacher-forcing forward."""
import torch

from reward_forcing.inference.generator import StreamingGenerator
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.sampling import FlowMatchSchedule
from reward_forcing.testing.assets import perturb_parameters_

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=16, text_len=8, freq_dim=16)
CHUNK, HW = 3, (4, 6)
# sigma = 5u / (1 + 4u) for u = 1, 0.75, 0.5, 0.25 (shift 5), as timesteps
SIGMAS = [1.0, 0.9375, 5 / 6, 0.625]


def tiny_model(local_attn_size=-1):
    """The TINY causal model in chunks of CHUNK frames, every parameter perturbed (seed 0), frozen for inference."""
    torch.manual_seed(0)
    model = perturb_parameters_(CausalWanModel(**TINY, num_frame_per_block=CHUNK, local_attn_size=local_attn_size))
    return model.eval().requires_grad_(False)


def tiny_generator(model, **cache):
    """A StreamingGenerator over `model` with the SIGMAS schedule; `cache` holds its window and sink settings."""
    return StreamingGenerator(model, FlowMatchSchedule(5.0), [1000 * s for s in SIGMAS], CHUNK, **cache)


def count_forwards(generator, seen_t=None):
    """start_frame of every DiT call the generator makes (StreamingGenerator.flow), and its t in seen_t."""
    calls, flow = [], generator.flow

    def spy(cache, context, x, t, start_frame):
        calls.append(start_frame)
        if seen_t is not None:
            seen_t.append(t[0, 0].item())
        return flow(cache, context, x, t, start_frame)

    generator.flow = spy
    return calls


def reference_video(model, context, frames, seed, switch=None, first_frame=None):
    """The sampler written out with teacher forcing: noisy chunk c attends to itself and the clean chunks < c.

    switch=(chunk, new_context): from that chunk on the whole forward, clean history included, sees new_context.
    first_frame [1, C, 1, h, w]: chunk 0's frame 0 is this clean latent at timestep 0 in every forward, and in the
    result (image-to-video)."""
    rng = torch.Generator().manual_seed(seed)
    shape = (1, TINY["in_dim"], CHUNK, *HW)
    clean = torch.zeros(1, TINY["in_dim"], frames, *HW)
    for c in range(frames // CHUNK):
        if switch is not None and c == switch[0]:
            context = switch[1]
        x = torch.randn(shape, generator=rng)
        for i, sigma in enumerate(SIGMAS):
            t = torch.full((1, frames), 1000 * sigma)
            if c == 0 and first_frame is not None:
                x[:, :, :1], t[:, 0] = first_frame, 0.0
            noisy = torch.zeros_like(clean)
            noisy[:, :, CHUNK * c:CHUNK * (c + 1)] = x
            flow = model(noisy, t, context, clean_x=clean)[:, :, CHUNK * c:CHUNK * (c + 1)]
            x0 = x - sigma * flow
            if i + 1 < len(SIGMAS):
                x = (1 - SIGMAS[i + 1]) * x0 + SIGMAS[i + 1] * torch.randn(shape, generator=rng)
        if c == 0 and first_frame is not None:
            x0[:, :, :1] = first_frame
        clean[:, :, CHUNK * c:CHUNK * (c + 1)] = x0
    return clean


def switch_at(frame, context):
    """StreamingGenerator.stream's `switch`: the new context for the chunk that starts at latent frame `frame`."""
    return lambda start: context if start == frame else None
