"""The in-place streaming step (static cache buffers) against the concatenating cache path, and its compiled form
against eager: same outputs, one graph, no recompiles once the window is full."""
import torch

from test_streaming_generator import HW, tiny_generator, tiny_model

WINDOW = dict(window_frames=9, sink_frames=3, sink_mode="ema")


def run(generator, context, chunks, cache, grad_steps=(), seed=1):
    """The generator's sampler loop written out on a given cache; denoising steps in grad_steps run with
    autograd on (so they take the model's stream_step, the concatenating `update` path of the cache)."""
    rng = torch.Generator().manual_seed(seed)
    shape = (1, generator.model.in_dim, 3, *HW)
    out = []
    for chunk in range(chunks):
        x, start = torch.randn(shape, generator=rng), 3 * chunk
        for step, t in enumerate(generator.timesteps):
            with torch.set_grad_enabled(step in grad_steps):
                x0 = generator.predict_x0(cache, context, x, t, start).detach()
            if step + 1 < len(generator.timesteps):
                x = generator.schedule.add_noise(x0, torch.randn(shape, generator=rng), x0.new_full((1, 3), 1.0)
                                                 * generator.timesteps[step + 1])
        with torch.no_grad():
            generator.context_pass(cache, context, x0, start)
        out.append(x0)
    return torch.cat(out, dim=2)


def test_static_buffers_equal_the_concatenating_cache_over_evictions():
    model = tiny_model(local_attn_size=9)
    generator = tiny_generator(model, **WINDOW)
    context = torch.randn(1, 5, 16)
    reference = run(generator, context, 8, generator.new_cache(1, static=False))
    static_cache = generator.new_cache(1, static=True)
    static = run(generator, context, 8, static_cache)
    torch.testing.assert_close(static, reference, atol=1e-6, rtol=1e-6)
    layer = static_cache.layers[0]
    assert layer.num_ema_updates == 5 and list(layer.attended_frames) == [0, 1, 2] + list(range(18, 24))
    # a rollout mixes both paths inside a chunk (gradient-free steps, then one step with autograd)
    mixed = run(generator, context, 8, generator.new_cache(1, static=True), grad_steps=(2,))
    torch.testing.assert_close(mixed, reference, atol=1e-6, rtol=1e-6)


def test_stream_uses_fixed_buffers_once_the_window_is_full():
    model = tiny_model(local_attn_size=9)
    generator = tiny_generator(model, **WINDOW)
    seen = []
    original = model.static_step

    def spy(x, t, context, cos, sin, buffers, layers):
        seen.append([tuple(buf.data_ptr() for buf in layer) + (tuple(layer[0].shape),) for layer in buffers])
        return original(x, t, context, cos, sin, buffers, layers)

    model.static_step = spy
    with torch.no_grad():
        for _ in generator.stream(torch.randn(1, 5, 16), 3 * 6, HW):
            pass
    steady = seen[3 * 5:]  # chunks 0..2 fill the window (3, 6, 9 frames attended)
    assert len(seen) == 30 and all(call == steady[0] for call in steady)
    assert steady[0][0][-1] == (1, 9 * (HW[0] // 2) * (HW[1] // 2), 2, 16)


def test_compiled_step_one_graph_no_recompiles_equals_eager():
    """fullgraph torch.compile of the steady step: 40 chunks at window 9 / sink 3 (EMA) compile one graph at the
    first full-window chunk and never again (dynamo's counters), and match eager within 1e-4 (fp32)."""
    from torch._dynamo.utils import counters

    model = tiny_model(local_attn_size=9)
    generator = tiny_generator(model, **WINDOW)
    context = torch.randn(1, 5, 16)
    eager = list(generator.stream(context, 3 * 40, HW, generator=torch.Generator().manual_seed(1)))
    torch._dynamo.reset()
    counters.clear()
    generator.compile()
    compiled, graphs = [], []
    for chunk in generator.stream(context, 3 * 40, HW, generator=torch.Generator().manual_seed(1)):
        compiled.append(chunk)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[:2] == [0, 0]  # chunks 0, 1 attend to 3, 6 frames: eager
    assert graphs[2:] == [1] * 38  # compiled once at the first full window (9 frames), never again
    torch.testing.assert_close(torch.cat(compiled, 2), torch.cat(eager, 2), atol=1e-4, rtol=0)
