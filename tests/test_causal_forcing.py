"""Causal Forcing (arXiv 2602.02214) on tiny random models: the teacher-forcing forward that trains the autoregressive
teacher, its many-step sampling through the student's cache, and the causal ODE pairs it writes — each against a
reference written with other calls of the model (a per-chunk loop, the cache-free teacher-forcing forward)."""
import pytest
import torch

from reward_forcing.inference.ar_teacher import ARTeacherSampler
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.sampling import euler_sigmas
from reward_forcing.testing.assets import randomise_
from reward_forcing.training.diffusion import sample_chunk_timesteps
from reward_forcing.training.ode_pairs import causal_trajectory

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=16, text_len=8, freq_dim=16)
CHUNK, FRAMES, HW = 3, 9, (4, 6)
STEPS, SHIFT, GUIDANCE = 4, 5.0, 3.0


def tiny_model(local_attn_size=-1):
    torch.manual_seed(0)
    model = randomise_(CausalWanModel(**TINY, num_frame_per_block=CHUNK, local_attn_size=local_attn_size))
    return model.eval().requires_grad_(False)


def latents(seed, frames=FRAMES):
    return torch.randn(1, TINY["in_dim"], frames, *HW, generator=torch.Generator().manual_seed(seed))


def text(seed):
    return torch.randn(1, 5, TINY["text_dim"], generator=torch.Generator().manual_seed(seed))


def chunk_of(x, c):
    return x[:, :, CHUNK * c:CHUNK * (c + 1)]


PER_CHUNK_T = torch.tensor([[900.0] * 3 + [500.0] * 3 + [120.0] * 3])


@torch.no_grad()
def test_under_teacher_forcing_a_chunk_sees_exactly_the_clean_frames_before_it_and_itself():
    model, context = tiny_model(), text(0)
    noisy, clean = latents(1), latents(2)
    out = model(noisy, PER_CHUNK_T, context, clean_x=clean)
    for c in range(FRAMES // CHUNK):
        first, end = CHUNK * c, CHUNK * (c + 1)
        for frame in range(end, FRAMES):  # any later frame, noisy or clean: chunk c's output is bit-identical
            for which in ("noisy", "clean"):
                changed_noisy, changed_clean = noisy.clone(), clean.clone()
                (changed_noisy if which == "noisy" else changed_clean)[:, :, frame] += 1.0
                again = model(changed_noisy, PER_CHUNK_T, context, clean_x=changed_clean)
                assert torch.equal(again[:, :, :end], out[:, :, :end]), (c, frame, which)
        for frame in range(first):
            # an earlier *noisy* frame is not seen (the clean copy stands in for it) ...
            changed = noisy.clone()
            changed[:, :, frame] += 1.0
            assert torch.equal(model(changed, PER_CHUNK_T, context, clean_x=clean)[:, :, first:end],
                               out[:, :, first:end])
            # ... an earlier clean frame is, and changes the chunk
            changed = clean.clone()
            changed[:, :, frame] += 1.0
            moved = model(noisy, PER_CHUNK_T, context, clean_x=changed)[:, :, first:end] - out[:, :, first:end]
            assert moved.abs().max() > 1e-3, (c, frame)
        # its own clean copy is not seen either: chunk c attends to its noisy self only
        changed = clean.clone()
        changed[:, :, first:end] += 1.0
        assert torch.equal(model(noisy, PER_CHUNK_T, context, clean_x=changed)[:, :, first:end],
                           out[:, :, first:end])


@pytest.mark.parametrize("window", [-1, 6])
@torch.no_grad()
def test_clean_context_mask_equals_a_per_chunk_loop(window):
    """One forward on [clean || noisy] equals, chunk by chunk, the plain block-causal forward of the clean frames
    before the chunk (at t = 0) followed by the noisy chunk: the sequence the chunk attends to when it streams."""
    model, context = tiny_model(window), text(0)
    noisy, clean = latents(1), latents(2)
    out = model(noisy, PER_CHUNK_T, context, clean_x=clean)
    for c in range(FRAMES // CHUNK):
        first, end = CHUNK * c, CHUNK * (c + 1)
        sequence = torch.cat([clean[:, :, :first], noisy[:, :, first:end]], dim=2)
        t = torch.cat([torch.zeros(1, first), PER_CHUNK_T[:, first:end]], dim=1)
        reference = model(sequence, t, context)[:, :, first:end]
        torch.testing.assert_close(out[:, :, first:end], reference, atol=1e-5, rtol=1e-5)


def test_training_timesteps_are_one_draw_per_chunk_keyed_per_sample_and_chunk():
    t = sample_chunk_timesteps(seed=3, step=2, sample_ids=[4, 5], shift=5.0, frames=9, chunk=3)
    assert t.shape == (2, 9) and ((t >= 0) & (t <= 1000)).all()
    for row in t:
        assert all(torch.equal(chunk, chunk[:1].expand(3)) for chunk in row.split(3))
        assert len(set(row.tolist())) > 1  # chunks are noised at their own levels (3 distinct draws here)
    assert torch.equal(t[1], sample_chunk_timesteps(3, 2, [5], 5.0, 9, 3)[0])  # a sample's draws are its own
    assert torch.equal(t[:, :6], sample_chunk_timesteps(3, 2, [4, 5], 5.0, 6, 3))  # a chunk's draw is its own


# --- the AR teacher's sampling, written out with the cache-free teacher-forcing forward -----------------------

def reference_chunk(model, cond, uncond, clean, noise, c, keep=()):
    """Chunk c integrated from `noise` by the guided Euler ODE, attending to the clean frames of `clean` before it
    through the teacher-forcing forward (no cache): (end state, states at `keep`)."""
    sigmas = euler_sigmas(STEPS, SHIFT).tolist()
    x, states = noise, [noise] if 0 in keep else []
    for k in range(STEPS):
        noisy = torch.zeros_like(clean)
        noisy[:, :, CHUNK * c:CHUNK * (c + 1)] = x
        t = torch.full((1, clean.shape[2]), 1000 * sigmas[k])
        flow_c = chunk_of(model(noisy, t, cond, clean_x=clean), c)
        flow_u = chunk_of(model(noisy, t, uncond, clean_x=clean), c)
        x = x + (flow_u + GUIDANCE * (flow_c - flow_u)) * (sigmas[k + 1] - sigmas[k])
        if k + 1 in keep:
            states.append(x)
    return x, states


@torch.no_grad()
def reference_ar_teacher(model, cond, uncond, noise):
    clean = torch.zeros_like(noise)
    for c in range(noise.shape[2] // CHUNK):
        clean[:, :, CHUNK * c:CHUNK * (c + 1)] = reference_chunk(model, cond, uncond, clean, chunk_of(noise, c), c)[0]
    return clean


def sampler(model, uncond, window=None):
    return ARTeacherSampler(model, euler_sigmas(STEPS, SHIFT), CHUNK, guidance_scale=GUIDANCE, uncond=uncond,
                            window_frames=window)


@pytest.mark.parametrize("window", [-1, 6])
def test_ar_teacher_streaming_equals_the_teacher_forcing_reference(window):
    """StreamingGenerator's loop (cache, context passes, static in-place step) with the teacher's Euler steps and CFG
    samples what the teacher-forcing forward it was trained with integrates (a window without sink: the same frames)."""
    model, cond, uncond, noise = tiny_model(window), text(0), text(9), latents(4)
    chunks = list(sampler(model, uncond, None if window == -1 else window).stream(cond, FRAMES, HW, noise=noise))
    assert [tuple(c.shape) for c in chunks] == [(1, 4, 3, *HW)] * 3
    expected = reference_ar_teacher(model, cond, uncond, noise)
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=1e-4, rtol=1e-4)
    # guidance is real: without the unconditional branch the video differs
    plain = ARTeacherSampler(model, euler_sigmas(STEPS, SHIFT), CHUNK, window_frames=None if window == -1 else window)
    assert (torch.cat(list(plain.stream(cond, FRAMES, HW, noise=noise)), dim=2) - expected).abs().max() > 1e-3


def test_a_causal_pair_chunk_equals_rerunning_the_teacher_from_its_stored_clean_context_and_noise():
    model, cond, uncond, noise = tiny_model(), text(0), text(9), latents(5)
    keep = [0, 1, 3, 4]
    pair = causal_trajectory(sampler(model, uncond), noise, cond, keep)
    assert pair.shape == (len(keep), 4, FRAMES, *HW)
    torch.testing.assert_close(pair[0], noise[0])
    # the pair's video is the AR teacher's streamed sample from the same noise
    streamed = torch.cat(list(sampler(model, uncond).stream(cond, FRAMES, HW, noise=noise)), dim=2)
    torch.testing.assert_close(pair[-1], streamed[0], atol=1e-6, rtol=1e-6)
    stored_clean, stored_noise = pair[-1:], pair[:1]
    with torch.no_grad():
        for c in range(FRAMES // CHUNK):
            # context: the stored clean chunks before c; later frames are garbage, which chunk c must not see
            context = stored_clean.clone()
            context[:, :, CHUNK * (c + 1):] = torch.randn_like(context[:, :, CHUNK * (c + 1):])
            _, states = reference_chunk(model, cond, uncond, context, chunk_of(stored_noise, c), c, keep)
            torch.testing.assert_close(chunk_of(pair, c), torch.cat(states), atol=1e-4, rtol=1e-4)
