"""Upstream Reward Forcing's causal DiT, imported at run time from a checkout of JaydenLyh/Reward-Forcing and driven
through this project's StreamingGenerator, so that scripts/benchmark.py can time it beside ours on the same weights,
inputs and sampling loop. Nothing of upstream is copied into this project: the user points at a checkout.

What is used of the checkout: wan/modules/causal_model.py (CausalWanModel, its per-layer KV-cache dicts with the
EMA sink) and wan/modules/model.py, attention.py, which it imports. Their package __init__ files are not run
(wan/__init__.py imports upstream's text-to-video pipelines, T5 and VAE, which the DiT does not need). The cache
dicts are laid out as upstream's pipeline/causal_inference.py allocates them, and each call passes
current_start = start_frame x tokens per frame, as that pipeline does.

Attention: upstream's self-attention takes flash-attn if installed, else SDPA; its cross-attention requires
flash-attn. Both are routed through this project's reward_forcing.models.attention (flash-attn where installed,
else PyTorch SDPA), so the two models time the same attention kernel and differ only in everything around it.
"""
import importlib
import math
import sys
import types
from pathlib import Path

import torch

from reward_forcing.errors import ConfigError, UserError
from reward_forcing.models.attention import attention

UPSTREAM_URL = "https://github.com/JaydenLyh/Reward-Forcing"
CAUSAL_MODEL = Path("wan") / "modules" / "causal_model.py"


def _same_kernel(q, k, v, k_lens=None):
    """Upstream's attention(q, k, v) and flash_attention(q, k, v, k_lens) on [B, L, H, D]; streaming never passes
    per-sample lengths (upstream's context_lens is None)."""
    if k_lens is not None:
        raise ValueError("per-sample key lengths are not used by upstream's streaming forward")
    return attention(q, k, v)


def import_causal_model(repo):
    """upstream's wan.modules.causal_model module from the checkout `repo` (the folder holding wan/)."""
    repo = Path(repo).resolve()
    if not (repo / CAUSAL_MODEL).is_file():
        raise UserError(f"--upstream_repo {repo}: no {CAUSAL_MODEL} there (expected a checkout of {UPSTREAM_URL})")
    loaded = sys.modules.get("wan.modules.causal_model")
    if loaded is not None:
        if Path(loaded.__file__).resolve() != repo / CAUSAL_MODEL:
            raise UserError(f"--upstream_repo {repo}: another upstream checkout is already imported "
                            f"({loaded.__file__})")
        return loaded
    for name, folder in (("wan", repo / "wan"), ("wan.modules", repo / "wan" / "modules")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    try:
        module = importlib.import_module("wan.modules.causal_model")
    except ImportError as err:
        raise UserError(f"--upstream_repo {repo}: importing upstream's causal model failed: {err}") from None
    module.attention = _same_kernel
    sys.modules["wan.modules.model"].flash_attention = _same_kernel
    return module


def upstream_sizes(ours):
    """Upstream CausalWanModel constructor arguments for the architecture of our model `ours` (read from its
    modules; both use the original Wan2.1 parameter names, so the state dicts correspond key for key)."""
    block = ours.blocks[0]
    patch = tuple(ours.patch_size)
    return dict(model_type="t2v", patch_size=patch, text_len=ours.text_len, in_dim=ours.in_dim, dim=ours.dim,
                ffn_dim=block.ffn[0].out_features, freq_dim=ours.freq_dim,
                text_dim=ours.text_embedding[0].in_features,
                out_dim=ours.head.head.out_features // math.prod(patch), num_heads=ours.num_heads,
                num_layers=len(ours.blocks), qk_norm=not isinstance(block.self_attn.norm_q, torch.nn.Identity),
                cross_attn_norm=not isinstance(block.norm3, torch.nn.Identity), eps=block.norm1.eps)


class UpstreamCache:
    """Upstream's per-layer self-attention cache dicts (k, v, global_end_index, local_end_index; window x tokens per
    frame slots) and cross-attention cache dicts, allocated at the first call once the frame size is known."""

    static = False  # upstream writes its cache in place itself: StreamingGenerator calls stream_step only

    def __init__(self, num_layers, window_frames):
        self.num_layers = num_layers
        self.window_frames = window_frames
        self.kv = None
        self.cross = [{"k": None, "v": None, "is_init": False} for _ in range(num_layers)]

    def allocate(self, batch, frame_tokens, heads, head_dim, device, dtype):
        slots = self.window_frames * frame_tokens
        self.kv = [{"k": torch.zeros(batch, slots, heads, head_dim, device=device, dtype=dtype),
                    "v": torch.zeros(batch, slots, heads, head_dim, device=device, dtype=dtype),
                    "global_end_index": torch.zeros(1, dtype=torch.long, device=device),
                    "local_end_index": torch.zeros(1, dtype=torch.long, device=device)}
                   for _ in range(self.num_layers)]


class UpstreamStreamingModel(torch.nn.Module):
    """Upstream's CausalWanModel behind the interface StreamingGenerator drives (in_dim, new_cache, and
    stream_step(x [B, C, F, H, W], t [B, F], context [B, L, text_dim], cache, start_frame) -> flow)."""

    def __init__(self, module, ours, cfg):
        super().__init__()
        window, sink = int(cfg.local_attn_size), int(cfg.sink_size)
        if window <= 0 or sink <= 0 or cfg.sink_mode != "ema":
            raise ConfigError("upstream's causal model streams through a window with an EMA sink: it needs "
                              f"local_attn_size > 0, sink_size > 0, sink_mode=ema (got {window}, {sink}, "
                              f"{cfg.sink_mode})")
        self.net = module.CausalWanModel(**upstream_sizes(ours), local_attn_size=window, sink_size=sink)
        try:
            self.net.load_state_dict(ours.state_dict(), strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[:2]
            raise UserError(f"upstream's CausalWanModel does not take this model's weights: {' '.join(first)}") \
                from None
        self.net.num_frame_per_block = int(cfg.num_frame_per_block)  # as upstream's inference pipeline sets it
        for block in self.net.blocks:
            block.self_attn.compression_alpha = float(cfg.compression_alpha)  # upstream's default is 0.999
        self.in_dim = ours.in_dim
        self.patch_size = tuple(ours.patch_size)

    def new_cache(self, batch_size, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999,
                  static=False):
        """An empty upstream cache (upstream's cache is always written in place, so `static` changes nothing)."""
        del batch_size, static
        expected = (self.net.local_attn_size, self.net.blocks[0].self_attn.sink_size, "ema",
                    self.net.blocks[0].self_attn.compression_alpha)
        if (window_frames, sink_frames, sink_mode, ema_alpha) != expected:
            raise ConfigError(f"upstream's model was built for window, sink, sink_mode, alpha = {expected}, got "
                              f"{(window_frames, sink_frames, sink_mode, ema_alpha)}")
        return UpstreamCache(len(self.net.blocks), window_frames)

    def stream_step(self, x, t, context, cache, start_frame=0):
        batch, _, frames, height, width = x.shape
        frame_tokens = (height // self.patch_size[1]) * (width // self.patch_size[2])
        if cache.kv is None:
            heads = self.net.num_heads
            cache.allocate(batch, frame_tokens, heads, self.net.dim // heads, x.device, x.dtype)
        return self.net(list(x), t, list(context), seq_len=frames * frame_tokens, kv_cache=cache.kv,
                        crossattn_cache=cache.cross, current_start=start_frame * frame_tokens)


def load_upstream_model(repo, ours, cfg, device, dtype):
    """Upstream's causal DiT from checkout `repo`, at the size of our model `ours` and with its weights, on
    `device` in `dtype` (built directly on the device: its constructor initialises every weight)."""
    module = import_causal_model(repo)
    with torch.device(device):
        model = UpstreamStreamingModel(module, ours, cfg)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
