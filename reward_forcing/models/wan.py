"""Bidirectional Wan2.1 text-to-video DiT with the original Wan2.1 state-dict keys (wan/modules/model.py of
Wan-Video/Wan2.1).

dtype policy (as Wan2.1's model.py): weights may be fp32 under bf16 autocast or plain bf16. The time embedding, the
modulation arithmetic, the residual adds, the norms and the head run in fp32 ("fp32 islands"); the linear
layers and attention run in whatever autocast / the weights choose. In fp32 everything is fp32.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
from einops import rearrange

from reward_forcing.errors import ConfigError
from reward_forcing.models.attention import attention
from reward_forcing.models.rope import apply_rope, rope_cos_sin, rope_grid, rope_tables

# Positions per RoPE axis, as in Wan2.1 (diffusers' rope_max_seq_len); not a model size.
ROPE_MAX_POSITIONS = 1024
# fp32 cos/sin tables kept per (device, grid, frame offset); a streaming window needs a handful.
ROPE_CACHE_ENTRIES = 32

CONFIG_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len",
               "freq_dim", "patch_size", "eps", "qk_norm", "cross_attn_norm", "window_size", "model_type")


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] of t * 10000^(-i/half), computed in fp64 like the original, returned fp32: [..., dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32; no dispatch at all when it already is (the fp32 islands cost nothing in fp32 runs)."""
    return x if x.dtype == torch.float32 else x.float()


def cast_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x in like's dtype, without a dispatch when it already is."""
    return x if x.dtype == like.dtype else x.to(like.dtype)


def fp32_scalar(value: float):
    """A 0-dim fp32 CPU tensor: as an operand it acts exactly like the Python number (also next to CUDA tensors)
    but is not re-wrapped into a new tensor on every eager call. Traced graphs take the number itself."""
    return value if torch.compiler.is_compiling() else _scalar_tensor(value)


@functools.lru_cache(maxsize=None)
def _scalar_tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = fp32(x)
        # = xf.pow(2).mean(-1, keepdim=True) + eps, op for op (mean is sum then div_), without scalar wrapping
        mean_square = (xf * xf).sum(-1, keepdim=True).div_(fp32_scalar(float(xf.shape[-1])))
        return cast_like(xf * torch.rsqrt(mean_square.add_(fp32_scalar(self.eps))), x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype."""

    def forward(self, x):
        weight = None if self.weight is None else fp32(self.weight)
        bias = None if self.bias is None else fp32(self.bias)
        return cast_like(nn.functional.layer_norm(fp32(x), self.normalized_shape, weight, bias, self.eps), x)


class Attention(nn.Module):
    """Projections of self- or cross-attention; q/k RMSNorm over the full dim before the head split."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1))

    def query(self, x):
        return self.heads(self.norm_q(self.q(x)))

    def key_value(self, x):
        """Keys (post-RMSNorm, pre-RoPE) and values, [B, L, H, D]."""
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def out(self, y):
        return self.o(y.flatten(2))


def modulate(x, shift, scale):
    """x [B, N, D] with N = F * L tokens; shift/scale [B, F, D] (one row per frame). fp32 result."""
    b, n, d = x.shape
    frames = shift.shape[1]
    xf = fp32(x).view(b, frames, n // frames, d)
    return (xf * (scale.unsqueeze(2) + fp32_scalar(1.0)) + shift.unsqueeze(2)).view(b, n, d)


class WanBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads, qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, num_heads, qk_norm, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, context, self_attend, cache=None):
        """x [B, N, D] residual stream; e0 [B, F, 6, D]; context: the embedded prompt [B, text_len, D];
        self_attend(q, k, v) -> [B, N, H, D] applies RoPE and the attention pattern; cache: this block's layer of a
        streaming KV cache (reward_forcing.cache.LayerKVCache), which keeps its cross-attention K/V, or None."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (fp32(self.modulation) + fp32(e0)).unbind(2)

        h = cast_like(modulate(self.norm1(x), shift_a, scale_a), x)
        q = self.self_attn.query(h)
        k, v = self.self_attn.key_value(h)
        x = residual(x, self.self_attn.out(self_attend(q, k, v)), gate_a)

        h = self.norm3(x)
        k, v = self.cross_key_value(context, cache)
        x = cast_like(fp32(x) + fp32(self.cross_attn.out(attention(self.cross_attn.query(h), k, v))), x)

        h = cast_like(modulate(self.norm2(x), shift_f, scale_f), x)
        return residual(x, self.ffn(h), gate_f)

    def cross_key_value(self, context, cache=None):
        """Cross-attention (k, v) of the embedded prompt. With a cache they are computed once per prompt and kept in
        cache.cross (context may then be None); under autograd they are recomputed, same values, so that
        gradients reach the k/v projections."""
        if cache is None:
            return self.cross_attn.key_value(context)
        if cache.cross is None or torch.is_grad_enabled():
            k, v = self.cross_attn.key_value(context)
            cache.cross = (k.detach(), v.detach())
            return k, v
        return cache.cross


def residual(x, y, gate):
    """x + y * gate in fp32, gate [B, F, D] per frame.

    The sum is the last op, so the result is a new tensor, never a view: FSDP2 hooks a block's output for
    its backward all-gather, and an in-place op on a returned view would silently drop that hook."""
    b, n, d = x.shape
    frames = gate.shape[1]
    gated = (fp32(y).view(b, frames, -1, d) * gate.unsqueeze(2)).view(b, n, d)
    return cast_like(fp32(x) + gated, x)


class Head(nn.Module):
    def __init__(self, dim, out_features, eps):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        """x [B, N, D]; e [B, F, D] (the time embedding, not e0)."""
        shift, scale = (fp32(self.modulation).unsqueeze(0) + fp32(e).unsqueeze(2)).unbind(2)
        return self.head(cast_like(modulate(self.norm(x), shift, scale), self.head.weight))


class WanModel(nn.Module):
    def __init__(self, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16, text_dim=4096,
                 text_len=512, freq_dim=256, patch_size=(1, 2, 2), eps=1e-6, qk_norm=True, cross_attn_norm=True,
                 window_size=(-1, -1), model_type="t2v"):
        super().__init__()
        if model_type != "t2v":
            raise ConfigError(f"model_type {model_type!r} is not supported (only 't2v')")
        if tuple(window_size) != (-1, -1):
            raise ConfigError(f"window_size {tuple(window_size)} is not supported (only (-1, -1), global attention)")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ConfigError(f"dim {dim} must split into {num_heads} heads of even size")
        self.dim, self.num_heads, self.text_len, self.freq_dim = dim, num_heads, text_len, freq_dim
        self.in_dim, self.out_dim, self.patch_size = in_dim, out_dim, tuple(patch_size)
        self.gradient_checkpointing = False

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps)
                                    for _ in range(num_layers))
        self.head = Head(dim, out_dim * math.prod(self.patch_size), eps)
        # Plain attributes, not buffers: module.to(bf16) must not cast the fp64-built tables (as Wan2.1 builds them).
        self._rope = {}
        self._rope_cos_sin = {}

    @classmethod
    def from_config(cls, config: dict, **extra):
        """Build from a Wan config.json dict; bookkeeping keys (`_class_name`, ...) are ignored."""
        unknown = [k for k in config if not k.startswith("_") and k not in CONFIG_KEYS]
        if unknown:
            raise ConfigError(f"unknown Wan config key(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in config.items() if k in CONFIG_KEYS}, **extra)

    # ---- shared pieces, also used by the causal model ----
    def rope_tables(self, device):
        if device not in self._rope:
            tables = rope_tables(self.dim // self.num_heads, ROPE_MAX_POSITIONS)
            self._rope[device] = [t.to(device) for t in tables]
        return self._rope[device]

    def rope_cos_sin(self, device, grid_size, frame_offset=0):
        """fp32 (cos, sin) tables for tokens of frames frame_offset.. of the (frames, h, w) grid, cached."""
        key = (torch.device(device), *grid_size, frame_offset)
        if key not in self._rope_cos_sin:
            if len(self._rope_cos_sin) >= ROPE_CACHE_ENTRIES:  # drop the oldest (unbounded caches grow the grid)
                del self._rope_cos_sin[next(iter(self._rope_cos_sin))]
            grid = rope_grid(self.rope_tables(torch.device("cpu")), *grid_size, frame_offset)
            self._rope_cos_sin[key] = tuple(t.to(device) for t in rope_cos_sin(grid))
        return self._rope_cos_sin[key]

    def rope(self, x, grid_size, frame_offset=0):
        """Apply RoPE to x [B, N, H, D] whose tokens are frames frame_offset.. of the (frames, h, w) grid."""
        return apply_rope(x, *self.rope_cos_sin(x.device, grid_size, frame_offset))

    def embed_video(self, x):
        """[B, C, F, H, W] -> tokens [B, N, D] in the residual-stream dtype and the token grid (f, h, w)."""
        if x.ndim != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected latents [B, {self.in_dim}, F, H, W], got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not a multiple of the patch {self.patch_size}")
        weight = self.patch_embedding.weight
        tokens = self.patch_embedding(cast_like(x, weight))
        grid = tuple(tokens.shape[2:])
        # contiguous once here, or every op of the residual stream inherits the transposed layout
        return cast_like(rearrange(tokens, "b d f h w -> b (f h w) d"), weight).contiguous(), grid

    def embed_time(self, t):
        """t [B, F] -> e [B, F, D] and e0 [B, F, 6, D], fp32 (autocast off)."""
        weight = self.time_embedding[0].weight
        with torch.autocast(weight.device.type, enabled=False):
            e = fp32(self.time_embedding(cast_like(sinusoidal_embedding(t, self.freq_dim), weight)))
            e0 = fp32(self.time_projection(cast_like(e, weight))).unflatten(-1, (6, self.dim))
        return e, e0

    def embed_text(self, context):
        """[B, L <= text_len, text_dim] -> [B, text_len, D]; zero rows are appended before the MLP (as Wan2.1)."""
        if context.ndim != 3 or context.shape[1] > self.text_len:
            raise ValueError(f"expected context [B, L <= {self.text_len}, text_dim], got {tuple(context.shape)}")
        context = nn.functional.pad(context, (0, 0, 0, self.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def unpatchify(self, x, e, grid):
        """Head then [B, N, prod(patch) * out_dim] -> [B, out_dim, F, H, W]."""
        weight = self.head.head.weight
        with torch.autocast(weight.device.type, enabled=False):
            x = self.head(x, e)
        (f, h, w), (pt, ph, pw) = grid, self.patch_size
        return rearrange(x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def run_block(self, i, x, e0, context, self_attend):
        """Block i without a cache, activation-checkpointed when gradient_checkpointing is on and grad is needed."""
        block = self.blocks[i]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, e0, context, self_attend, use_reentrant=False)
        return block(x, e0, context, self_attend)

    def forward(self, x, t, context):
        """x [B, C, F, H, W], t [B], context [B, L <= text_len, text_dim] -> flow [B, out_dim, F, H, W].

        Samples of one batch share their shape, so no token padding is needed (the original pads to seq_len
        and masks the padded keys, which is the same computation)."""
        tokens, grid = self.embed_video(x)
        e, e0 = self.embed_time(torch.as_tensor(t, device=x.device).reshape(-1, 1).expand(x.shape[0], 1))
        ctx = self.embed_text(context)

        def self_attend(q, k, v):
            return attention(self.rope(q, grid), self.rope(k, grid), v)

        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, e0, ctx, self_attend)
        return self.unpatchify(tokens, e, grid)


# ---- conversion to / from diffusers' WanTransformer3DModel (diffusers' convert_wan_to_diffusers.py) ----
_BLOCK_RENAMES = [  # (original, diffusers), applied as substring replacements inside blocks.{i}.
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_", "attn1.norm_"),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_", "attn2.norm_"),
    ("norm3.", "norm2."), ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."), ("modulation", "scale_shift_table"),
]
_TOP_RENAMES = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"), ("head.head.", "proj_out."),
]


def _rename(key, renames):
    head, sep, rest = key.partition(".")
    if head == "blocks":
        index, _, name = rest.partition(".")
        for old, new in renames[0]:
            if name.startswith(old):
                return f"blocks.{index}.{new}{name[len(old):]}"
        return key
    for old, new in renames[1]:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def wan_to_diffusers_state_dict(sd: dict) -> dict:
    """Original Wan2.1 keys -> diffusers WanTransformer3DModel keys (norm3 becomes norm2)."""
    return {_rename(k, (_BLOCK_RENAMES, _TOP_RENAMES)): v for k, v in sd.items()}


def diffusers_to_wan_state_dict(sd: dict) -> dict:
    """diffusers WanTransformer3DModel keys -> original Wan2.1 keys (diffusers' norm2 becomes norm3)."""
    swap = lambda pairs: [(new, old) for old, new in pairs]  # noqa: E731
    return {_rename(k, (swap(_BLOCK_RENAMES), swap(_TOP_RENAMES))): v for k, v in sd.items()}


def diffusers_config(model_or_config) -> dict:
    """WanTransformer3DModel config for a WanModel or a Wan config.json dict (text_len has no counterpart:
    pass the context already zero-padded to text_len)."""
    if isinstance(model_or_config, WanModel):
        m = model_or_config
        cfg = dict(dim=m.dim, ffn_dim=m.blocks[0].ffn[0].out_features, num_heads=m.num_heads,
                   num_layers=len(m.blocks), in_dim=m.in_dim, out_dim=m.out_dim,
                   text_dim=m.text_embedding[0].in_features, freq_dim=m.freq_dim, patch_size=m.patch_size,
                   eps=m.head.norm.eps, qk_norm=isinstance(m.blocks[0].self_attn.norm_q, RMSNorm),
                   cross_attn_norm=isinstance(m.blocks[0].norm3, nn.LayerNorm))
    else:
        import inspect
        defaults = {k: p.default for k, p in inspect.signature(WanModel.__init__).parameters.items() if k != "self"}
        cfg = {**defaults, **{k: v for k, v in model_or_config.items() if k in CONFIG_KEYS}}
    return {
        "patch_size": tuple(cfg["patch_size"]), "num_attention_heads": cfg["num_heads"],
        "attention_head_dim": cfg["dim"] // cfg["num_heads"], "in_channels": cfg["in_dim"],
        "out_channels": cfg["out_dim"], "text_dim": cfg["text_dim"], "freq_dim": cfg["freq_dim"],
        "ffn_dim": cfg["ffn_dim"], "num_layers": cfg["num_layers"], "cross_attn_norm": cfg["cross_attn_norm"],
        "qk_norm": "rms_norm_across_heads" if cfg["qk_norm"] else None, "eps": cfg["eps"],
        "rope_max_seq_len": ROPE_MAX_POSITIONS,
    }
