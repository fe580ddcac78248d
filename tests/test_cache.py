"""Streaming KV cache: hand-computed timelines, the EMA closed form, errors, gradients."""
import pytest
import torch

from reward_forcing.cache import KVCache, LayerKVCache
from reward_forcing.errors import ConfigError

L, H, D = 2, 1, 2  # tokens per frame, heads, head dim (tiny)


def frame_ids(start, frames, offset=0.0, dtype=torch.float32):
    """[1, frames*L, H, D] where every token of absolute frame f holds f + offset."""
    ids = torch.arange(start, start + frames, dtype=torch.float32) + offset
    return ids.repeat_interleave(L).view(1, frames * L, 1, 1).expand(1, frames * L, H, D).to(dtype).contiguous()


def frames_of(tensor):
    """Per-frame value of a [1, N, H, D] tensor written by frame_ids (all tokens of a frame are equal)."""
    per_frame = tensor.float().view(tensor.shape[1] // L, L * H * D)
    assert torch.equal(per_frame.min(1).values, per_frame.max(1).values)
    return per_frame[:, 0].tolist()


def run_chunk(layer, chunk, chunk_frames=3, calls=4):
    """Denoising steps + context pass: `calls` writes of one chunk; the final (context) write holds frame ids."""
    start = chunk * chunk_frames
    for step in range(calls - 1):
        noisy = frame_ids(start, chunk_frames, offset=1000.0 + step)
        keys, values, q0 = layer.update(noisy, -noisy, start, L)
        assert frames_of(keys)[q0:] == frames_of(noisy)
    clean = frame_ids(start, chunk_frames)
    return layer.update(clean, -clean, start, L)


SINK = [0, 1, 2]
# Chunk = sink = 3 frames: absolute frames attended, query start, frames evicted on the chunk's first call.
INFERENCE_WINDOW_9 = [
    (SINK, 0, []),
    (SINK + [3, 4, 5], 3, []),
    (SINK + [3, 4, 5, 6, 7, 8], 6, []),
    (SINK + [6, 7, 8, 9, 10, 11], 6, [3, 4, 5]),
    (SINK + [9, 10, 11, 12, 13, 14], 6, [6, 7, 8]),
    (SINK + [12, 13, 14, 15, 16, 17], 6, [9, 10, 11]),
]
# Training rollout in a 21-frame buffer: window slots [6,12)/[9,15)/[12,18)/[15,21) are absolute frames.
TRAINING_ROLLOUT = [SINK, SINK + [3, 4, 5], SINK + list(range(3, 9)), SINK + list(range(6, 12)),
                    SINK + list(range(9, 15)), SINK + list(range(12, 18)), SINK + list(range(15, 21))]


def test_inference_timeline_window9_sink3_matches_section_2_5():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema", ema_alpha=0.999)
    for chunk, (attended, query_start, evicted) in enumerate(INFERENCE_WINDOW_9):
        start = chunk * 3
        first = frame_ids(start, 3, offset=500.0)
        keys, values, q0 = layer.update(first, -first, start, L)
        assert list(layer.attended_frames) == attended
        assert list(layer.evicted_frames) == evicted
        assert keys.shape[1] // L == len(attended) == [3, 6, 9, 9, 9, 9][chunk]
        assert q0 == query_start == [0, 3, 6, 6, 6, 6][chunk]
        assert layer.num_ema_updates == max(0, chunk - 2)  # fires from chunk 3, on the first call
        for _ in range(3):  # further steps and the context pass re-write and never evict
            keys, values, q0 = run_chunk(layer, chunk, calls=1)
            assert list(layer.evicted_frames) == [] and layer.num_ema_updates == max(0, chunk - 2)
            assert list(layer.attended_frames) == attended and q0 == query_start
        # window part of the returned keys/values = the stored clean frames, in temporal order
        assert frames_of(keys)[3:] == attended[3:]
        assert frames_of(values)[3:] == [-f for f in attended[3:]]
    assert layer.num_evictions == 3


def test_training_rollout_static_sink_attends_the_same_frames():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="static")
    for chunk, attended in enumerate(TRAINING_ROLLOUT):
        keys, values, q0 = run_chunk(layer, chunk)
        assert list(layer.attended_frames) == attended
        assert frames_of(keys) == [float(f) for f in attended]  # the static sink is clean chunk 0, frozen
        assert frames_of(values) == [-float(f) for f in attended]
        assert q0 == [0, 3, 6, 6, 6, 6, 6][chunk]
    assert layer.num_ema_updates == 0 and layer.num_evictions == 4


def test_sink0_sliding_window_never_gives_negative_query_positions():
    layer = LayerKVCache(window_frames=9, sink_frames=0, sink_mode="none")
    expected_q0 = [0, 3, 6, 6, 6, 6]
    for chunk in range(6):
        keys, _, q0 = run_chunk(layer, chunk)
        end = 3 * chunk + 3
        assert q0 == expected_q0[chunk]
        assert frames_of(keys) == [float(f) for f in range(max(0, end - 9), end)]


def test_unbounded_window_keeps_absolute_positions_for_40_chunks():
    for sink_frames, sink_mode in [(0, "none"), (3, "static")]:
        layer = LayerKVCache(window_frames=None, sink_frames=sink_frames, sink_mode=sink_mode)
        for chunk in range(40):
            keys, _, q0 = run_chunk(layer, chunk, calls=2)
            assert q0 == 3 * chunk
        assert frames_of(keys) == [float(f) for f in range(120)]
        assert layer.num_evictions == 0 and layer.evicted_frames == ()


@pytest.mark.parametrize("window, sink, mode, chunk_frames", [(8, 0, "none", 3), (7, 2, "static", 3), (9, 3, "static", 2)])
def test_ring_wraparound_returns_frames_in_temporal_order(window, sink, mode, chunk_frames):
    layer = LayerKVCache(window_frames=window, sink_frames=sink, sink_mode=mode)
    for chunk in range(12):
        keys, _, q0 = run_chunk(layer, chunk, chunk_frames=chunk_frames, calls=2)
        end = chunk_frames * (chunk + 1)
        expected = list(range(min(sink, end))) + list(range(max(sink, end - (window - sink)), end))
        assert frames_of(keys) == [float(f) for f in expected]
        assert q0 == len(expected) - chunk_frames


def test_ema_evicts_the_oldest_non_sink_frames():
    """Bugs caught: evicting the newest frames instead of the oldest; alpha and 1 - alpha exchanged (alpha 0.75 is
    asymmetric and exact in binary, so the hand values below are exact)."""
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema", ema_alpha=0.75)
    for chunk in range(5):
        keys, _, _ = run_chunk(layer, chunk)
    # by hand: chunk 3 blends frames 3,4,5 -> 0.75*[0,1,2] + 0.25*[3,4,5]; chunk 4 blends frames 6,7,8.
    # Evicting the newest frames instead (pre-4317f5a) would give 0.75*[0,1,2] + 0.25*[6,7,8] first.
    after3 = [0.75, 1.75, 2.75]
    after4 = [2.0625, 3.0625, 4.0625]  # 0.75 * after3 + 0.25 * [6, 7, 8]
    assert frames_of(layer.sink[0]) == after4
    assert frames_of(keys)[:3] == after4
    assert frames_of(layer.sink[1]) == [-x for x in after4]


def test_ema_sink_matches_closed_form_from_written_values():
    alpha, chunks = 0.8, 9
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema", ema_alpha=alpha)
    final_k, final_v = [], []
    for chunk in range(chunks):
        for _ in range(3):  # noisy steps: must not leak into the sink
            k, v = torch.randn(1, 3 * L, H, D), torch.randn(1, 3 * L, H, D)
            layer.update(k, v, 3 * chunk, L)
        k, v = torch.randn(1, 3 * L, H, D), torch.randn(1, 3 * L, H, D)
        keys, values, _ = layer.update(k, v, 3 * chunk, L)
        final_k.append(k)
        final_v.append(v)
    n = chunks - 3  # evictions: chunks 3..8 evict chunks 1..6
    for written, stored, returned in [(final_k, layer.sink[0], keys), (final_v, layer.sink[1], values)]:
        expected = alpha ** n * written[0].double()
        for j in range(n):
            expected += (1 - alpha) * alpha ** (n - 1 - j) * written[1 + j].double()
        torch.testing.assert_close(stored.double(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(returned[:, :3 * L].double(), expected, rtol=1e-6, atol=1e-6)
    assert layer.num_ema_updates == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("latent_frames, evictions, retention", [(21, 4, 0.996), (120, 37, 0.964)])
def test_sink_retention_after_n_evictions(dtype, latent_frames, evictions, retention):
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema", ema_alpha=0.999)
    ones = torch.ones(1, 3 * L, H, D, dtype=dtype)
    layer.update(ones, ones, 0, L)  # S0 = 1, every evicted frame 0: sink = alpha^n exactly
    for chunk in range(1, latent_frames // 3):
        zeros = torch.zeros_like(ones)
        layer.update(zeros, zeros, 3 * chunk, L)
    assert layer.num_ema_updates == evictions
    assert layer.sink[0].float().mean().item() == pytest.approx(0.999 ** evictions, rel=1e-6)
    assert round(0.999 ** evictions, 3) == retention
    keys, _, _ = layer.update(zeros, zeros, 3 * (latent_frames // 3 - 1), L)
    assert keys.dtype == dtype  # the fp32 sink accumulator is read back in the caller's dtype
    # bf16 cannot step 1.0 by 1e-3: an in-place bf16 EMA would stay at 1.0 (retention 1.0, not 0.964)
    assert keys[:, :3 * L].float().mean().item() == pytest.approx(retention, abs=2e-3)


def test_static_sink_never_changes_after_eviction():
    layer = LayerKVCache(window_frames=6, sink_frames=3, sink_mode="static")
    run_chunk(layer, 0)
    sink_k, sink_v = (t.clone() for t in layer.sink)
    for chunk in range(1, 8):
        keys, values, _ = run_chunk(layer, chunk)
        assert torch.equal(keys[:, :3 * L], sink_k) and torch.equal(values[:, :3 * L], sink_v)
    assert torch.equal(layer.sink[0], sink_k) and layer.num_evictions == 6


def test_gradient_reaches_only_the_current_chunk():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema")
    k0 = torch.randn(1, 3 * L, H, D, requires_grad=True)
    layer.update(k0, k0 * 2, 0, L)
    k1 = torch.randn(1, 3 * L, H, D, requires_grad=True)
    v1 = torch.randn(1, 3 * L, H, D, requires_grad=True)
    keys, values, q0 = layer.update(k1, v1, 3, L)
    weights = torch.arange(keys.numel(), dtype=torch.float32).view_as(keys)
    ((keys + values) * weights).sum().backward()
    torch.testing.assert_close(k1.grad, weights[:, q0 * L:])
    torch.testing.assert_close(v1.grad, weights[:, q0 * L:])
    assert k0.grad is None
    assert not any(t.requires_grad for t in layer.sink + layer._store)
    # the returned tensor is a snapshot: later writes do not change what the gradient step saw
    before = keys.detach().clone()
    layer.update(torch.zeros(1, 3 * L, H, D), torch.zeros(1, 3 * L, H, D), 3, L)
    assert torch.equal(keys.detach(), before)


def test_windowed_memory_is_constant_in_video_length():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema")
    run_chunk(layer, 0, calls=1)
    pointers = [t.data_ptr() for t in layer.sink + layer._store]
    size = layer.nbytes
    for chunk in range(1, 40):
        run_chunk(layer, chunk, calls=2)
    assert layer.nbytes == size and [t.data_ptr() for t in layer.sink + layer._store] == pointers


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(window_frames=3, sink_frames=3, sink_mode="static"), "must exceed sink_frames"),
    (dict(window_frames=-1), "window_frames must be an integer >= 1"),
    (dict(window_frames=9, sink_frames=-1), "sink_frames must be an integer >= 0"),
    (dict(window_frames=9, sink_frames=3, sink_mode="rolling"), "unknown sink_mode"),
    (dict(window_frames=9, sink_frames=3, sink_mode="none"), "needs sink_frames 0"),
    (dict(window_frames=9, sink_frames=0, sink_mode="ema"), "needs sink_frames >= 1"),
    (dict(window_frames=9, sink_frames=3, sink_mode="ema", ema_alpha=1.5), "ema_alpha must be a number in [0, 1]"),
    (dict(window_frames=9, sink_frames=3, sink_mode="ema", chunk_frames=2), "chunk frames == sink frames"),
    (dict(window_frames=5, sink_frames=3, sink_mode="static", chunk_frames=3), "does not fit a window"),
    (dict(window_frames=9, sink_frames=3, sink_mode="static", chunk_frames=0), "chunk_frames must be"),
])
def test_bad_configs_raise_one_line_config_error(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        KVCache(2, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_ema_with_chunk_not_equal_sink_fails_at_first_eviction():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema")
    for chunk in range(4):  # 2-frame chunks: frames [0, 8) fit sink + 6-frame window
        run_chunk(layer, chunk, chunk_frames=2, calls=1)
    with pytest.raises(ConfigError, match="1 frames evicted, sink has 3"):
        layer.update(frame_ids(8, 2), frame_ids(8, 2), 8, L)


def test_out_of_order_writes_are_rejected():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="static")
    with pytest.raises(ValueError, match="neither the next chunk"):
        layer.update(frame_ids(3, 3), frame_ids(3, 3), 3, L)  # a fresh cache starts at frame 0
    run_chunk(layer, 0)
    run_chunk(layer, 1)
    with pytest.raises(ValueError, match="neither the next chunk"):
        layer.update(frame_ids(0, 3), frame_ids(0, 3), 0, L)  # not the last chunk
    with pytest.raises(ValueError, match="neither the next chunk"):
        layer.update(frame_ids(9, 3), frame_ids(9, 3), 9, L)  # skips frames 6..8
    with pytest.raises(ValueError, match="whole number"):
        layer.update(torch.zeros(1, 5, H, D), torch.zeros(1, 5, H, D), 6, L)
    with pytest.raises(ValueError, match="does not match the cache's first call"):
        layer.update(frame_ids(6, 3, dtype=torch.float64), frame_ids(6, 3, dtype=torch.float64), 6, L)
    with pytest.raises(ValueError, match="does not match the cache's first call"):
        layer.update(frame_ids(6, 3).expand(2, -1, -1, -1), frame_ids(6, 3).expand(2, -1, -1, -1), 6, L)


def test_kvcache_layers_reset_and_cross():
    cache = KVCache(3, window_frames=9, sink_frames=3, sink_mode="ema", chunk_frames=3)
    assert len(cache.layers) == 3 and cache.cross == [None, None, None]
    for layer in cache.layers:
        run_chunk(layer, 0, calls=1)
        run_chunk(layer, 1, calls=1)
    cache.layers[0].cross = (torch.ones(1, 4, H, D), torch.ones(1, 4, H, D))
    cache.reset_cross()
    assert cache.cross == [None, None, None] and cache.layers[0].next_frame == 6
    cache.layers[1].cross = (torch.ones(1, 4, H, D), torch.ones(1, 4, H, D))
    cache.reset()
    assert cache.cross == [None, None, None]
    assert all(layer.next_frame == 0 and layer.sink is None and layer.nbytes == 0 for layer in cache.layers)
    keys, _, q0 = cache.layers[0].update(frame_ids(0, 3), frame_ids(0, 3), 0, L)  # new video from frame 0
    assert q0 == 0 and frames_of(keys) == [0.0, 1.0, 2.0]


def test_rewind_re_encodes_the_held_window_in_place_keeping_the_sink():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="ema", ema_alpha=0.5)
    for chunk in range(5):  # frames [0, 15): sink blended twice (see the eviction test), ring holds [9, 15)
        run_chunk(layer, chunk, calls=1)
    sink = [3.75, 4.75, 5.75]  # 0.5 * (0.5*[0,1,2] + 0.5*[3,4,5]) + 0.5 * [6,7,8]
    assert layer.first_rewritable_chunk(3) == 9
    layer.rewind(9)
    keys, _, q0 = layer.update(frame_ids(9, 3, offset=100.0), frame_ids(9, 3, offset=100.0), 9, L)
    # the first re-encoded chunk sees only the sink and itself: held frames 12..14 are still the old ones
    assert frames_of(keys) == sink + [109.0, 110.0, 111.0] and q0 == 3
    assert layer.evicted_frames == () and layer.num_ema_updates == 2
    keys, _, q0 = layer.update(frame_ids(12, 3, offset=100.0), frame_ids(12, 3, offset=100.0), 12, L)
    assert frames_of(keys) == sink + [109.0, 110.0, 111.0, 112.0, 113.0, 114.0] and q0 == 6
    keys, _, _ = run_chunk(layer, 5, calls=1)  # streaming on evicts the re-encoded frames 9..11 into the sink
    sink = [0.5 * s + 0.5 * e for s, e in zip(sink, [109.0, 110.0, 111.0])]
    assert list(layer.evicted_frames) == [9, 10, 11] and layer.num_ema_updates == 3
    assert frames_of(keys) == sink + [112.0, 113.0, 114.0, 15.0, 16.0, 17.0]


def test_rewind_before_any_eviction_rewrites_the_first_chunk_but_not_its_sink_frames():
    layer = LayerKVCache(window_frames=9, sink_frames=1, sink_mode="static")
    run_chunk(layer, 0, calls=1)
    assert layer.first_rewritable_chunk(3) == 0
    layer.rewind(0)
    keys, _, q0 = layer.update(frame_ids(0, 3, offset=100.0), frame_ids(0, 3, offset=100.0), 0, L)
    assert frames_of(keys) == [100.0, 101.0, 102.0] and q0 == 0  # the chunk attends to its own new keys
    keys, _, _ = run_chunk(layer, 1, calls=1)
    assert frames_of(keys) == [0.0, 101.0, 102.0, 3.0, 4.0, 5.0]  # stored sink frame 0 kept


@pytest.mark.parametrize("window, sink, chunks, first", [(11, 1, 5, 6), (10, 1, 5, 6), (9, 3, 1, 3), (9, 3, 2, 3),
                                                        (9, 3, 3, 3), (9, 3, 4, 6), (None, 3, 6, 3), (None, 0, 4, 0)])
def test_first_rewritable_chunk_is_the_oldest_fully_held_chunk(window, sink, chunks, first):
    layer = LayerKVCache(window_frames=window, sink_frames=sink, sink_mode="static" if sink else "none")
    for chunk in range(chunks):
        run_chunk(layer, chunk, calls=1)
    assert layer.first_rewritable_chunk(3) == first


def test_rewind_refuses_frames_the_cache_no_longer_holds():
    layer = LayerKVCache(window_frames=9, sink_frames=3, sink_mode="static")
    for chunk in range(5):
        run_chunk(layer, chunk, calls=1)
    for frame in (6, 16):  # evicted; not written yet
        with pytest.raises(ValueError, match=r"cannot rewind to frame .* holds frames \[9, 15\)"):
            layer.rewind(frame)
