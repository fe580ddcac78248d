"""StreamingGenerator against an independent oracle: the model's cache-free teacher-forcing forward."""
import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.inference.generator import StreamingGenerator, latent_size, pixel_frames
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.sampling import FlowMatchSchedule
from reward_forcing.testing.assets import randomise_

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=16, text_len=8, freq_dim=16)
CHUNK, HW = 3, (4, 6)
# sigma = 5u / (1 + 4u) for u = 1, 0.75, 0.5, 0.25 (shift 5), as timesteps
SIGMAS = [1.0, 0.9375, 5 / 6, 0.625]


def tiny_model(local_attn_size=-1):
    torch.manual_seed(0)
    model = randomise_(CausalWanModel(**TINY, num_frame_per_block=CHUNK, local_attn_size=local_attn_size))
    return model.eval().requires_grad_(False)


def tiny_generator(model, **cache):
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


def test_stream_equals_teacher_forcing_reference():
    model = tiny_model()
    context = torch.randn(1, 5, TINY["text_dim"])
    generator = tiny_generator(model)
    chunks = list(generator.stream(context, 9, HW, generator=torch.Generator().manual_seed(3)))
    assert [tuple(c.shape) for c in chunks] == [(1, 4, 3, 4, 6)] * 3
    expected = reference_video(model, context, 9, seed=3)
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=2e-5, rtol=1e-4)


def test_five_forwards_per_chunk_with_the_warped_timesteps():
    model = tiny_model(local_attn_size=9)
    seen_t = []
    generator = tiny_generator(model, window_frames=9, sink_frames=3, sink_mode="ema")
    starts = count_forwards(generator, seen_t)
    assert generator.forwards_per_chunk == 5
    n = sum(1 for _ in generator.stream(torch.randn(1, 5, 16), 15, HW))
    assert n == 5 and len(starts) == 25
    assert starts == [3 * c for c in range(5) for _ in range(5)]
    assert seen_t[:5] == pytest.approx([1000, 937.5, 833.333333, 625, 0])


def test_given_noise_is_used_chunk_by_chunk():
    model = tiny_model()
    context = torch.randn(1, 5, 16)
    noise = torch.randn(1, 4, 6, *HW)
    gen = tiny_generator(model)
    a = torch.cat(list(gen.stream(context, 6, HW, generator=torch.Generator().manual_seed(1), noise=noise)), 2)
    b = torch.cat(list(gen.stream(context, 6, HW, generator=torch.Generator().manual_seed(1), noise=noise)), 2)
    c = torch.cat(list(gen.stream(context, 6, HW, generator=torch.Generator().manual_seed(1),
                                  noise=noise.flip(2))), 2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3


def test_length_must_be_a_multiple_of_the_chunk():
    generator = tiny_generator(tiny_model())
    calls = count_forwards(generator)
    with pytest.raises(ConfigError, match="num_output_frames=10 .* multiple of the chunk size num_frame_per_block=3"):
        next(generator.stream(torch.randn(1, 5, 16), 10, HW))
    assert calls == []


def test_sizes_follow_the_config():
    cfg = load_config()
    assert latent_size(cfg, (1, 2, 2)) == (60, 104)  # 480x832 / 8
    assert [pixel_frames(cfg, t) for t in (1, 21, 120)] == [1, 81, 477]
    with pytest.raises(ConfigError, match="multiples of 16x16"):
        latent_size(load_config(overrides=["height=250"]), (1, 2, 2))
    assert latent_size(load_config(overrides=["height=256", "width=384"]), (1, 2, 2)) == (32, 48)


def test_from_config_reads_the_streaming_keys():
    cfg = load_config(overrides=["sink_mode=static", "local_attn_size=-1", "sink_size=0", "sink_mode=none"])
    gen = StreamingGenerator.from_config(tiny_model(), cfg)
    assert (gen.window_frames, gen.sink_frames, gen.sink_mode, gen.chunk_frames) == (None, 0, "none", 3)
    assert gen.timesteps == pytest.approx([1000 * s for s in SIGMAS])


def switch_at(frame, context):
    return lambda start: context if start == frame else None


def test_switch_equals_teacher_forcing_under_the_new_prompt():
    # Unbounded window, no sink: a switch re-encodes every earlier frame, so the chunks after it are the
    # teacher-forcing sampler whose clean history is seen under the new prompt (LongLive's re-cache).
    model = tiny_model()
    a, b = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    gen = tiny_generator(model)
    chunks = list(gen.stream(a, 12, HW, generator=torch.Generator().manual_seed(3), switch=switch_at(6, b)))
    expected = reference_video(model, a, 12, seed=3, switch=(2, b))
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=2e-5, rtol=1e-4)
    plain = torch.cat(list(gen.stream(a, 12, HW, generator=torch.Generator().manual_seed(3))), dim=2)
    torch.testing.assert_close(torch.cat(chunks, dim=2)[:, :, :6], plain[:, :, :6], atol=0, rtol=0)
    assert (torch.cat(chunks, dim=2)[:, :, 6:] - plain[:, :, 6:]).abs().min() > 0


@pytest.mark.parametrize("policy", ["keep", "recache"])
def test_switch_after_evictions_continues_from_the_re_encoded_window(policy):
    # One denoising step, so the given noise is all the randomness. Oracle: a fresh cache fed the sink chunk
    # (old prompt if kept) and the held window chunks at consecutive positions under the new prompt, then the
    # next chunk. Window 9, sink 3, switch at 12: the held window is frames [6, 12).
    model = tiny_model(local_attn_size=9)
    gen = StreamingGenerator(model, FlowMatchSchedule(5.0), [1000.0], CHUNK, window_frames=9, sink_frames=3,
                             sink_mode="static", switch_sink=policy)
    a, b = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    noise = torch.randn(1, 4, 15, *HW)
    calls = count_forwards(gen)
    out = torch.cat(list(gen.stream(a, 15, HW, noise=noise, switch=switch_at(12, b))), dim=2)
    # 2 calls per chunk, plus the re-encode of frames 6..11 (and of the sink chunk under recache)
    assert calls[8:] == ([0] if policy == "recache" else []) + [6, 9, 12, 12]
    fresh = gen.new_cache(1)
    gen.context_pass(fresh, a if policy == "keep" else b, out[:, :, 0:3], 0)
    fresh.reset_cross()
    gen.context_pass(fresh, b, out[:, :, 6:9], 3)
    gen.context_pass(fresh, b, out[:, :, 9:12], 6)
    expected = gen.denoise_chunk(fresh, b, noise[:, :, 12:15], 9)
    torch.testing.assert_close(out[:, :, 12:15], expected, atol=1e-5, rtol=1e-4)
    unswitched = torch.cat(list(gen.stream(a, 15, HW, noise=noise)), dim=2)
    assert torch.equal(out[:, :, :12], unswitched[:, :, :12])


def test_sink_policy_decides_what_the_next_chunk_sees():
    # Switch at frame 3 with window 9: nothing was evicted, the sink chunk is the only history. Re-caching it
    # too equals teacher forcing under the new prompt (the local window spans the whole 9 frames).
    model = tiny_model(local_attn_size=9)
    a, b = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    runs = {}
    for policy in ("keep", "recache"):
        gen = tiny_generator(model, window_frames=9, sink_frames=3, sink_mode="ema", switch_sink=policy)
        runs[policy] = torch.cat(list(gen.stream(a, 9, HW, generator=torch.Generator().manual_seed(5),
                                                 switch=switch_at(3, b))), dim=2)
    expected = reference_video(model, a, 9, seed=5, switch=(1, b))
    torch.testing.assert_close(runs["recache"], expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(runs["keep"][:, :, :3], runs["recache"][:, :, :3])
    assert (runs["keep"][:, :, 3:] - runs["recache"][:, :, 3:]).abs().max() > 1e-3


def test_endless_stream_and_bad_switch_policy():
    gen = tiny_generator(tiny_model())
    stream = gen.stream(torch.randn(1, 5, 16), None, HW, generator=torch.Generator().manual_seed(0))
    assert sum(1 for _, _ in zip(range(7), stream)) == 7
    with pytest.raises(ConfigError, match="switch_sink must be one of keep, recache, got 'drop'"):
        tiny_generator(tiny_model(), switch_sink="drop")
    cfg = load_config(overrides=["switch_sink=recache"])
    assert StreamingGenerator.from_config(tiny_model(), cfg).switch_sink == "recache"
