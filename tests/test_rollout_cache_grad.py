"""`rollout_cache_grad`: the straight-through gradient across chunks that upstream's in-place cache writes produce,
against an explicit construction of that cache, and the detached one (Self Forcing, arXiv 2506.08009, Alg. 1)."""
from pathlib import Path

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.training.rollout import rollout, training_sampler

CONFIGS = Path(__file__).parents[1] / "configs"
HW = (2, 2)
FRAMES = 12  # four 3-frame chunks


class _InPlaceLayer:
    """Upstream's training cache (wan/modules/causal_model.py of JaydenLyh/Reward-Forcing), written independently:
    one buffer holding every frame, each write a slice assignment (recorded by autograd when grad is on, so the
    no-grad context pass overwrites the values but not the graph), read back as the sink plus the window."""

    def __init__(self, sink_frames, window_frames):
        self.sink, self.window, self.k, self.v = sink_frames, window_frames, None, None
        self.cross = None  # the block's cross-attention K/V of the prompt

    def update(self, k, v, start_frame, frame_tokens):
        L, frames = frame_tokens, k.shape[1] // frame_tokens
        end = start_frame + frames
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], FRAMES * L, *k.shape[2:])
            self.v = torch.zeros_like(self.k)
        self.k[:, start_frame * L:end * L] = k
        self.v[:, start_frame * L:end * L] = v
        sink = min(self.sink, end)
        first = sink if self.window is None else max(self.sink, end - (self.window - self.sink))
        keys = torch.cat([self.k[:, :sink * L], self.k[:, first * L:end * L]], dim=1)
        values = torch.cat([self.v[:, :sink * L], self.v[:, first * L:end * L]], dim=1)
        return keys, values, sink + end - first - frames


class _InPlaceCache:
    static = False  # no in-place buffers: every call takes the model's stream_step

    def __init__(self, num_layers, sink_frames, window_frames):
        self.layers = [_InPlaceLayer(sink_frames, window_frames) for _ in range(num_layers)]


PRESETS = {  # sink + sliding window (the Reward Forcing student), and full causal context (Self Forcing)
    "sink_window": ["local_attn_size=9", "sink_size=3", "sink_mode=ema"],
    "full_context": ["local_attn_size=-1", "sink_size=0", "sink_mode=none"],
}


def _gradients(preset, cache_grad, exit_step, checkpoint=False, in_place=False):
    cfg = load_config(CONFIGS / "tiny_train.yaml", PRESETS[preset] + ["rollout_cache=full"])
    torch.manual_seed(0)
    model = CausalWanModel(dim=16, ffn_dim=24, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=8,
                           text_len=4, freq_dim=16, num_frame_per_block=3, local_attn_size=cfg.local_attn_size)
    context = torch.randn(2, 4, 8)
    sampler = training_sampler(model, cfg)
    if in_place:
        sampler.new_cache = lambda batch: _InPlaceCache(len(model.blocks), sampler.sink_frames, sampler.window_frames)
    x = rollout(sampler, context, FRAMES, HW, [exit_step] * 4, 3, ("g", 0), [0, 1], torch.float32,
                with_grad=True, checkpoint=checkpoint, cache_grad=cache_grad)
    (x * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return x.detach(), grad


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("exit_step", [0, 3])
def test_straight_through_equals_upstreams_in_place_cache(preset, exit_step):
    # upstream's estimator: detached rollout code, but a cache whose in-place writes keep the exit step's graph
    x_ref, reference = _gradients(preset, "detached", exit_step, in_place=True)
    for checkpoint in (False, True):
        x, grad = _gradients(preset, "straight_through", exit_step, checkpoint=checkpoint)
        assert torch.equal(x, x_ref)
        assert _relative(grad, reference) <= 1e-6, (checkpoint, _relative(grad, reference))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_detached_forward_is_identical_gradient_differs(preset):
    x_st, straight = _gradients(preset, "straight_through", 1)
    x_det, detached = _gradients(preset, "detached", 1)
    assert torch.equal(x_st, x_det)
    assert _relative(detached, straight) > 0.01
    _, checkpointed = _gradients(preset, "detached", 1, checkpoint=True)
    assert _relative(checkpointed, detached) <= 1e-6


def test_window_mode_straight_through_survives_checkpointing():
    # window mode evicts into the EMA sink between a chunk's forward and its recomputation during backward
    grads = {}
    for checkpoint in (False, True):
        cfg = load_config(CONFIGS / "tiny_train.yaml", ["rollout_cache=window", "compression_alpha=0.5"])
        torch.manual_seed(0)
        model = CausalWanModel(dim=16, ffn_dim=24, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=8,
                               text_len=4, freq_dim=16, num_frame_per_block=3, local_attn_size=cfg.local_attn_size)
        x = rollout(training_sampler(model, cfg), torch.randn(2, 4, 8), FRAMES, HW, [1, 2, 0, 3], 3, ("g", 0),
                    [0, 1], torch.float32, with_grad=True, checkpoint=checkpoint, cache_grad="straight_through")
        (x * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
        grads[checkpoint] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert _relative(grads[True], grads[False]) <= 1e-6
