"""A stream that starts from clean latents: a first frame (image-to-video) against the cache-free teacher-forcing
oracle, and a continuation against the run that generated its prefix itself (same cache state, same bits)."""
import pytest
import torch

from reward_forcing.errors import ConfigError
from test_streaming_generator import HW, TINY, count_forwards, reference_video, switch_at, tiny_generator, tiny_model

WINDOW = dict(window_frames=9, sink_frames=3, sink_mode="ema")


def latent_frame(seed):
    return torch.randn(1, TINY["in_dim"], 1, *HW, generator=torch.Generator().manual_seed(seed))


def test_first_frame_start_equals_teacher_forcing_with_a_clean_frame_0():
    model = tiny_model()
    context, image = torch.randn(1, 5, TINY["text_dim"]), latent_frame(7)
    generator = tiny_generator(model)
    chunks = list(generator.stream(context, 9, HW, generator=torch.Generator().manual_seed(3), first_frame=image))
    video = torch.cat(chunks, dim=2)
    assert torch.equal(video[:, :, :1], image)  # the picture's latent is frame 0, untouched
    expected = reference_video(model, context, 9, seed=3, first_frame=image)
    torch.testing.assert_close(video, expected, atol=2e-5, rtol=1e-4)
    plain = torch.cat(list(generator.stream(context, 9, HW, generator=torch.Generator().manual_seed(3))), dim=2)
    assert (video[:, :, 1:] - plain[:, :, 1:]).abs().min() > 0  # every later frame follows the picture


def test_first_frame_goes_in_at_timestep_0_and_the_chunk_keeps_its_calls():
    generator = tiny_generator(tiny_model(local_attn_size=9), **WINDOW)
    seen = []
    flow = generator.flow

    def spy(cache, context, x, t, start_frame):
        seen.append((start_frame, t[0].tolist()))
        return flow(cache, context, x, t, start_frame)

    generator.flow = spy
    list(generator.stream(torch.randn(1, 5, 16), 6, HW, first_frame=latent_frame(1)))
    steps = [1000 * s for s in (1.0, 0.9375, 5 / 6, 0.625)]
    assert [start for start, _ in seen] == [0] * 5 + [3] * 5
    chunk_0 = [[0.0, t, t] for t in steps] + [[0.0] * 3]  # 4 steps with frame 0 at t = 0, then the context pass
    chunk_1 = [[t] * 3 for t in steps] + [[0.0] * 3]
    assert [t for _, t in seen] == [pytest.approx(t) for t in chunk_0 + chunk_1]


def test_switch_after_an_image_start_equals_teacher_forcing_under_the_new_prompt():
    model = tiny_model()
    a, b, image = torch.randn(1, 5, 16), torch.randn(1, 5, 16), latent_frame(2)
    gen = tiny_generator(model, switch_sink="recache")
    chunks = list(gen.stream(a, 9, HW, generator=torch.Generator().manual_seed(3), switch=switch_at(6, b),
                             first_frame=image))
    expected = reference_video(model, a, 9, seed=3, switch=(2, b), first_frame=image)
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=2e-5, rtol=1e-4)


def rng_states_between_chunks(generator, context, frames, seed):
    """The chunks of a plain stream, and the torch.Generator's state when each chunk is asked for."""
    rng = torch.Generator().manual_seed(seed)
    chunks, states = [], []
    stream = generator.stream(context, frames, HW, generator=rng)
    while True:
        states.append(rng.get_state())
        chunk = next(stream, None)
        if chunk is None:
            return chunks, states
        chunks.append(chunk)


def continuation(generator, context, prefix, frames, rng_state, switch=None):
    rng = torch.Generator()
    rng.set_state(rng_state)
    return list(generator.stream(context, frames, HW, generator=rng, prefix=prefix, switch=switch))


@pytest.mark.parametrize("prefix_chunks", [1, 5])
def test_continuation_equals_the_run_that_made_its_prefix_bit_for_bit(prefix_chunks):
    # Window 9 / sink 3 / EMA: a 5-chunk prefix has evicted into the sink twice before the new chunks start.
    generator = tiny_generator(tiny_model(local_attn_size=9), **WINDOW)
    context = torch.randn(1, 5, 16)
    chunks, states = rng_states_between_chunks(generator, context, 24, seed=4)
    prefix = torch.cat(chunks[:prefix_chunks], dim=2)
    calls = count_forwards(generator)
    new = continuation(generator, context, prefix, 24 - 3 * prefix_chunks, states[prefix_chunks])
    assert calls[:prefix_chunks] == [3 * c for c in range(prefix_chunks)]  # one context pass per prefix chunk
    assert len(new) == 8 - prefix_chunks
    assert all(torch.equal(a, b) for a, b in zip(new, chunks[prefix_chunks:]))
    other = continuation(generator, context, prefix.flip(3), 24 - 3 * prefix_chunks, states[prefix_chunks])
    assert (other[0] - new[0]).abs().max() > 1e-3  # the prefix is what the new chunks attend to


def test_continuation_switches_prompt_like_the_full_run():
    generator = tiny_generator(tiny_model(local_attn_size=9), **WINDOW, switch_sink="recache")
    a, b = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    rng = torch.Generator().manual_seed(2)
    full = list(generator.stream(a, 18, HW, generator=rng, switch=switch_at(12, b)))
    _, states = rng_states_between_chunks(generator, a, 9, seed=2)
    new = continuation(generator, a, torch.cat(full[:3], dim=2), 9, states[3], switch=switch_at(12, b))
    assert all(torch.equal(x, y) for x, y in zip(new, full[3:]))


def test_a_prefix_of_part_of_a_chunk_is_refused_before_any_call():
    generator = tiny_generator(tiny_model())
    calls = count_forwards(generator)
    with pytest.raises(ConfigError, match="prefix of 4 latent frames is not a positive multiple of the chunk size"):
        next(generator.stream(torch.randn(1, 5, 16), 3, HW, prefix=torch.zeros(1, 4, 4, *HW)))
    with pytest.raises(ValueError, match="not both"):
        next(generator.stream(torch.randn(1, 5, 16), 3, HW, prefix=torch.zeros(1, 4, 3, *HW),
                              first_frame=latent_frame(0)))
    assert calls == []


def test_compiled_continuation_and_image_start_equal_eager():
    """The compiled steady step serves a continuation as it serves a plain stream: bit-identical to the compiled
    run that made the prefix, and within the compiled-vs-eager tolerance of tests/test_fast_path.py."""
    generator = tiny_generator(tiny_model(local_attn_size=9), **WINDOW)
    context = torch.randn(1, 5, 16)
    eager, states = rng_states_between_chunks(generator, context, 18, seed=1)
    eager_new = continuation(generator, context, torch.cat(eager[:3], 2), 9, states[3])
    image = latent_frame(3)
    eager_image = list(generator.stream(context, 12, HW, generator=torch.Generator().manual_seed(1),
                                        first_frame=image))
    torch._dynamo.reset()
    generator.compile()
    compiled, states = rng_states_between_chunks(generator, context, 18, seed=1)
    compiled_new = continuation(generator, context, torch.cat(compiled[:3], 2), 9, states[3])
    compiled_image = list(generator.stream(context, 12, HW, generator=torch.Generator().manual_seed(1),
                                           first_frame=image))
    assert all(torch.equal(a, b) for a, b in zip(compiled_new, compiled[3:]))
    torch.testing.assert_close(torch.cat(compiled, 2), torch.cat(eager, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(compiled_new, 2), torch.cat(eager_new, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(compiled_image, 2), torch.cat(eager_image, 2), atol=1e-4, rtol=0)
    assert torch.equal(compiled_image[0][:, :, :1], image)
