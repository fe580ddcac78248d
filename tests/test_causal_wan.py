"""CausalWanModel: masks vs the block-causal formula, streaming vs full, cache vs teacher forcing,
per-frame timesteps vs diffusers' per-token timesteps. fp32, all parameters randomised, tiny config."""
import pytest
import torch
from diffusers import WanTransformer3DModel

from reward_forcing.models import CausalWanModel, WanModel, diffusers_config, wan_to_diffusers_state_dict
from reward_forcing.models.attention import attention
from reward_forcing.models.causal_wan import attention_plan, planned_attention
from test_wan_parity import TINY, Fp64Sinusoid, randomise

B, H, W = 1, 4, 4  # latent 4x4 -> 2x2 tokens per frame
L = (H // 2) * (W // 2)


def causal(**extra):
    model = CausalWanModel(**TINY, **extra).eval()
    randomise(model)
    return model


def inputs(frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, TINY["in_dim"], frames, H, W, generator=gen)
    context = torch.randn(B, 7, TINY["text_dim"], generator=gen)
    return x, context


def formula_mask(frames, block, window, teacher):
    """The block-causal rule, token by token: q may see kv iff kv < (k+1)bL (and kv >= (k+1)bL - wL with a window);
    teacher forcing: noisy block i sees noisy block i and clean blocks < i."""
    n = frames * L
    q = torch.arange(n).view(-1, 1)
    kv = torch.arange(n).view(1, -1)
    end = (q // (block * L) + 1) * block * L
    causal_ok = (kv < end) & ((kv >= end - window * L) if window > 0 else True)
    if not teacher:
        return causal_ok
    same_block = (kv // (block * L)) == (q // (block * L))
    clean_before = causal_ok & (kv < end - block * L)
    top = torch.cat([causal_ok, torch.zeros(n, n, dtype=torch.bool)], dim=1)
    bottom = torch.cat([clean_before, same_block & (kv < n)], dim=1)
    return torch.cat([top, bottom], dim=0)


@pytest.mark.parametrize("frames,block,window,teacher", [
    (7, 3, -1, False), (8, 2, 4, False), (7, 3, -1, True), (9, 3, 6, True), (5, 1, 2, False)])
def test_attention_plan_matches_mask_formula(frames, block, window, teacher):
    n = frames * L * (2 if teacher else 1)
    q, k, v = (torch.randn(2, n, 2, 8) for _ in range(3))
    want = attention(q, k, v, mask=formula_mask(frames, block, window, teacher))
    got = planned_attention(q, k, v, attention_plan(frames, L, block, window, teacher))
    assert (got - want).abs().max() <= 1e-6


def test_single_chunk_equals_bidirectional():
    """Chunk 0 through an empty cache with uniform t is the bidirectional forward on those frames."""
    model = causal(num_frame_per_block=3)
    teacher = WanModel(**TINY).eval()
    teacher.load_state_dict(model.state_dict(), strict=True)
    x, context = inputs(3)
    t = torch.tensor([637.0])
    with torch.no_grad():
        want = teacher(x, t, context)
        got_cache = model.stream_step(x, t, context, model.new_cache(B), start_frame=0)
        got_full = model(x, t.view(1, 1).expand(B, 3), context)
    assert (got_cache - want).abs().max() <= 1e-5
    assert (got_full - want).abs().max() <= 1e-5


def test_streaming_equals_block_causal_forward():
    """Unbounded window, no sink: chunkwise streaming through the cache equals one block-causal forward."""
    model = causal(num_frame_per_block=2)
    x, context = inputs(7)
    t = torch.tensor([[900.0, 900.0, 500.0, 500.0, 100.0, 100.0, 20.0]])
    with torch.no_grad():
        full = model(x, t, context)
        cache = model.new_cache(B)
        chunks = [model.stream_step(x[:, :, s:s + 2], t[:, s:s + 2], context, cache, s) for s in range(0, 7, 2)]
    streamed = torch.cat(chunks, dim=2)
    assert (streamed - full).abs().max() <= 1e-5
    # causality is real: later frames depend on earlier ones
    x2 = x.clone()
    x2[:, :, 0] += 1
    with torch.no_grad():
        moved = model(x2, t, context)
    assert (moved[:, :, 2:] - full[:, :, 2:]).abs().max() > 1e-3


def test_window_limits_context():
    """local_attn_size = 4 frames = 2 chunks of 2: each layer reaches one chunk further back, so with 2 layers a
    change in frame 0 (chunk 0) reaches chunk 2 but never chunk 3."""
    model = causal(num_frame_per_block=2, local_attn_size=4)
    assert TINY["num_layers"] == 2
    x, context = inputs(8)
    x2 = x.clone()
    x2[:, :, 0] += 1
    with torch.no_grad():
        a, b = model(x, 300.0, context), model(x2, 300.0, context)
    assert (a[:, :, 6:] - b[:, :, 6:]).abs().max() == 0
    assert (a[:, :, 4:6] - b[:, :, 4:6]).abs().max() > 1e-4


def sink_window_mask(frames, chunk, window, sink):
    """[F, F] frame mask of streaming with a window of `window` frames (sink included) and `sink` sink frames:
    the queries of the chunk ending at frame e see the sink frames [0, sink) and the last window - sink frames
    before e, nothing later."""
    q = torch.arange(frames).view(-1, 1)
    kv = torch.arange(frames).view(1, -1)
    end = (q // chunk + 1) * chunk
    return (kv < end) & ((kv < sink) | (kv >= end - (window - sink)))


def masked_reference(model, x, t, context, mask, chunk):
    """Block-causal forward over all frames with an explicit frame mask. For each query chunk the visible frames
    are numbered 0, 1, ... in temporal order (the sink first) and keys and queries are roped at those numbers,
    the cache's window-relative positions; attention is a plain masked softmax."""
    tokens, grid = model.embed_video(x)
    frames, L = grid[0], grid[1] * grid[2]
    e, e0 = model.embed_time(t)
    ctx = model.embed_text(context)
    frame_of_token = torch.arange(frames).repeat_interleave(L)

    def rope_at(z, positions):  # z [B, F*L, H, D], one RoPE frame position per frame
        return torch.cat([model.rope(z[:, f * L:(f + 1) * L], (1, grid[1], grid[2]), int(p))
                          for f, p in enumerate(positions)], dim=1)

    def attend(q, k, v):
        out = torch.empty_like(q)
        for first in range(0, frames, chunk):
            visible = mask[first]
            positions = (visible.cumsum(0) - 1).clamp(min=0)  # rank among the visible frames
            keys, queries = rope_at(k, positions), rope_at(q, positions)[:, first * L:(first + chunk) * L]
            scores = torch.einsum("bqhd,bkhd->bhqk", queries.double(), keys.double()) / q.shape[-1] ** 0.5
            scores = scores.masked_fill(~visible[frame_of_token].view(1, 1, 1, -1), float("-inf"))
            out[:, first * L:(first + chunk) * L] = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1),
                                                                 v.double()).to(q.dtype)
        return out

    for i in range(len(model.blocks)):
        tokens = model.run_block(i, tokens, e0, ctx, attend)
    return model.unpatchify(tokens, e, grid)


@pytest.mark.parametrize("window,sink", [(4, 0), (6, 2), (5, 1)])
def test_streaming_after_eviction_equals_the_sink_window_mask(window, sink):
    """Bug caught: queries (or keys) roped at the wrong frame position once the window has evicted frames, a window
    that keeps the wrong frames, or a static sink that moves. 7 chunks of 2 frames evict 4-5 times; each chunk
    goes through the cache once (per-frame t), and the result equals one masked forward over all 14 frames."""
    chunk, frames = 2, 14
    model = causal(num_frame_per_block=chunk)
    x, context = inputs(frames, seed=3)
    t = torch.linspace(990.0, 30.0, frames).view(1, frames)
    mask = sink_window_mask(frames, chunk, window, sink)
    with torch.no_grad():
        want = masked_reference(model, x, t, context, mask, chunk)
        cache = model.new_cache(B, window_frames=window, sink_frames=sink, sink_mode="static" if sink else "none")
        got = torch.cat([model.stream_step(x[:, :, s:s + chunk], t[:, s:s + chunk], context, cache, s)
                         for s in range(0, frames, chunk)], dim=2)
        unbounded = model(x, t, context)
    assert cache.layers[0].num_evictions >= 4
    assert (got - want).abs().max() <= 1e-5
    # the window is real: once frames are evicted the output differs from unbounded block-causal attention
    assert (got[:, :, window:] - unbounded[:, :, window:]).abs().max() > 1e-3


def test_cache_with_context_passes_equals_teacher_forcing():
    """<= 9 frames, window 9 / sink 3 (no eviction): each chunk denoised through the cache, then a clean
    context pass at t = 0 rewrites its slots; this equals the teacher-forcing forward with aug_t = 0."""
    model = causal(num_frame_per_block=3, local_attn_size=9)
    noisy, context = inputs(9, seed=1)
    clean, _ = inputs(9, seed=2)
    t = torch.tensor([[800.0] * 3 + [450.0] * 3 + [60.0] * 3])
    with torch.no_grad():
        want = model(noisy, t, context, clean_x=clean, aug_t=0)
        cache = model.new_cache(B, window_frames=9, sink_frames=3, sink_mode="ema")
        outs = []
        for s in range(0, 9, 3):
            outs.append(model.stream_step(noisy[:, :, s:s + 3], t[:, s:s + 3], context, cache, s))
            model.stream_step(clean[:, :, s:s + 3], 0.0, context, cache, s)
    got = torch.cat(outs, dim=2)
    assert (got - want).abs().max() <= 1e-5
    # the clean half matters: a different aug_t changes the noisy output after chunk 0
    with torch.no_grad():
        other = model(noisy, t, context, clean_x=clean, aug_t=300.0)
    assert (other[:, :, 3:] - want[:, :, 3:]).abs().max() > 1e-3


def test_per_frame_timesteps_match_diffusers_per_token():
    """Inside one chunk attention is bidirectional, so per-frame t must equal diffusers' per-token timesteps
    (its Wan2.2 [B, N] path) with each frame's t repeated over its tokens."""
    model = causal(num_frame_per_block=3)
    ref = WanTransformer3DModel(**diffusers_config(model)).eval()
    ref.load_state_dict(wan_to_diffusers_state_dict(model.state_dict()), strict=True)
    ref.condition_embedder.timesteps_proj = Fp64Sinusoid(TINY["freq_dim"])
    x, context = inputs(3)
    t = torch.tensor([[999.0, 500.0, 3.0]])
    padded = torch.nn.functional.pad(context, (0, 0, 0, TINY["text_len"] - context.shape[1]))
    with torch.no_grad():
        got = model(x, t, context)
        want = ref(x, t.repeat_interleave(L, dim=1), padded, return_dict=False)[0]
        uniform = model(x, torch.tensor([500.0]), context)
    assert (got - want).abs().max() <= 1e-5
    assert (got - uniform).abs().max() > 1e-2  # frames with different t get different modulation


def test_per_frame_t_respects_causality():
    """Changing the timesteps of a later chunk leaves earlier chunks untouched."""
    model = causal(num_frame_per_block=2)
    x, context = inputs(4)
    with torch.no_grad():
        a = model(x, torch.tensor([[700.0, 700.0, 700.0, 700.0]]), context)
        b = model(x, torch.tensor([[700.0, 700.0, 50.0, 50.0]]), context)
    assert (a[:, :, :2] - b[:, :, :2]).abs().max() == 0
    assert (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-2


def test_gradient_checkpointing_same_gradients():
    model = causal(num_frame_per_block=2).train()
    x, context = inputs(4)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(x, torch.tensor([[600.0, 600.0, 200.0, 200.0]]), context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


def test_cross_kv_computed_once_per_prompt():
    model = causal()
    x, context = inputs(3)
    cache = model.new_cache(B)
    with torch.no_grad():
        model.stream_step(x, 500.0, context, cache)
        first = cache.cross[0][0].clone()
        model.stream_step(x, 500.0, context * 0, cache, start_frame=0)  # cached prompt is reused
    assert torch.equal(cache.cross[0][0], first)
    assert len(cache.layers) == TINY["num_layers"]
