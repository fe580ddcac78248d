"""Causal Wan2.1 student: per-frame timesteps, block-causal attention, streaming through a KV cache.

Upstream counterpart: wan/modules/causal_model.py of Self-Forcing.

Same parameters and state-dict keys as WanModel, so teacher weights load unchanged. Three calls share the blocks:
- `forward`: a full sequence, block-causal over all frames (chunks of num_frame_per_block, optional local
  window); teacher forcing when clean_x is given ([clean || noisy] with shared RoPE positions, only the noisy half
  returned). Training.
- `stream_step`: one chunk, frames [start_frame, start_frame + F), through a KV cache (reward_forcing.cache), with
  autograd: each block attends to what its cache layer returns, with RoPE applied at read time (keys at frames
  0..N/L-1, queries from query_start_frame), so positions are window-relative. Training rollouts.
- `static_step`: the gradient-free step on a static cache (`new_cache(..., static=True)`): the cache's bookkeeping
  (eviction, EMA, the once-per-chunk RoPE of the attended prefix) runs first in Python (`static_step_inputs`),
  then this pure tensor function runs the DiT and writes the chunk's K/V into the cache's buffers in place. Once
  the window is full its shapes never change and it has no host synchronisation or value-dependent branch, so
  the StreamingGenerator (reward_forcing/inference/generator.py) can torch.compile it (fullgraph, CUDA graphs).
Each block computes its own cross-attention K/V (kept in its cache layer once per prompt) and touches no weight
outside itself, so the model shards block by block (reward_forcing/training/parallel.py).
"""
from functools import lru_cache, partial

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.cache import KVCache, write_live
from reward_forcing.models.attention import attention
from reward_forcing.models.rope import apply_rope
from reward_forcing.models.wan import WanModel


def frame_timesteps(t, batch: int, frames: int) -> torch.Tensor:
    """Scalar, [B] or per-frame [B, F] timesteps -> [B, F]."""
    t = torch.as_tensor(t)
    if t.ndim == 2:
        if tuple(t.shape) != (batch, frames):
            raise ValueError(f"per-frame timesteps must be [{batch}, {frames}], got {tuple(t.shape)}")
        return t
    if t.ndim > 1 or t.numel() not in (1, batch):
        raise ValueError(f"timesteps must be a scalar, [{batch}] or [{batch}, {frames}], got {tuple(t.shape)}")
    return t.reshape(-1, 1).expand(batch, frames)


@lru_cache(maxsize=32)
def attention_plan(frames: int, frame_tokens: int, block: int, window: int, teacher: bool):
    """Block-causal pattern (chunk k sees chunks 0..k) as, per query chunk, its token range and the key token
    ranges it sees.

    Within a chunk attention is bidirectional and a chunk sees whole earlier frames, so every row of the mask is
    a union of contiguous key ranges: attending range by range is exact, needs no N x N mask, and keeps the
    fused (flash) kernels usable. Teacher forcing: tokens [0, N) are the clean copy, [N, 2N) the noisy one; a
    noisy chunk sees the clean frames before it (inside the window) and itself."""
    def span(first_frame, end_frame, base=0):
        return base + first_frame * frame_tokens, base + end_frame * frame_tokens

    plan = []
    for first in range(0, frames, block):
        end = min(first + block, frames)
        start = 0 if window < 0 else max(0, first + block - window)
        plan.append((span(first, end), (span(start, end),)))
        if teacher:
            noisy = frames * frame_tokens
            keys = ((span(start, first),) if first > start else ()) + (span(first, end, noisy),)
            plan.append((span(first, end, noisy), keys))
    return tuple(plan)


def planned_attention(q, k, v, plan):
    out = torch.empty_like(q)
    for (q0, q1), key_ranges in plan:
        keys = torch.cat([k[:, a:b] for a, b in key_ranges], dim=1)
        values = torch.cat([v[:, a:b] for a, b in key_ranges], dim=1)
        out[:, q0:q1] = attention(q[:, q0:q1], keys, values)
    return out


class CausalWanModel(WanModel):
    def __init__(self, *args, num_frame_per_block=3, local_attn_size=-1, **kwargs):
        super().__init__(*args, **kwargs)
        if num_frame_per_block < 1:
            raise ConfigError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        if local_attn_size != -1 and local_attn_size < num_frame_per_block:
            raise ConfigError(f"local_attn_size {local_attn_size} must be -1 or >= num_frame_per_block "
                              f"{num_frame_per_block}")
        self.num_frame_per_block = num_frame_per_block
        self.local_attn_size = local_attn_size

    def new_cache(self, batch_size, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999,
                  static=False):
        """An empty KV cache for one video of this model (batch_size is checked by the cache on first write).
        static=True: buffers for the gradient-free in-place `static_step` (see the module docstring)."""
        del batch_size  # the cache allocates lazily from the first keys it receives
        return KVCache(len(self.blocks), window_frames=window_frames, sink_frames=sink_frames, sink_mode=sink_mode,
                       ema_alpha=ema_alpha, chunk_frames=self.num_frame_per_block, static=static)

    def forward(self, x, t, context, clean_x=None, aug_t=None):
        """Block-causal forward over frames 0..F-1: x [B, C, F, H, W]; t scalar, [B] or per-frame [B, F]; context
        [B, L <= text_len, text_dim]. Teacher forcing when clean_x (same shape as x) is given: the noisy frames
        see the clean ones before them, whose timesteps are aug_t (default 0); only the noisy half is returned."""
        batch, frames = x.shape[0], x.shape[2]
        t = frame_timesteps(t, batch, frames).to(x.device)
        tokens, grid = self.embed_video(x)
        frame_tokens = grid[1] * grid[2]
        ctx = self.embed_text(context)
        if clean_x is not None:
            if clean_x.shape != x.shape:
                raise ValueError(f"clean_x {tuple(clean_x.shape)} must match x {tuple(x.shape)}")
            clean_t = frame_timesteps(0 if aug_t is None else aug_t, batch, frames).to(t)
            tokens = torch.cat([self.embed_video(clean_x)[0], tokens], dim=1)
            t = torch.cat([clean_t, t], dim=1)
        e, e0 = self.embed_time(t)

        plan = attention_plan(frames, frame_tokens, self.num_frame_per_block, self.local_attn_size,
                              clean_x is not None)
        attend = partial(self._masked_attend, grid=grid, plan=plan)
        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, e0, ctx, attend)

        if clean_x is not None:  # keep the noisy half only (by count: a sequence-parallel rank holds a slice of it)
            tokens, e = tokens[:, tokens.shape[1] // 2:], e[:, frames:]
        return self.unpatchify(tokens, e, grid)

    def stream_step(self, x, t, context, cache, start_frame=0):
        """Chunk x [B, C, F, H, W] as frames [start_frame, start_frame + F) of the video in `cache` (new_cache),
        with autograd: each block writes its K/V to its cache layer and attends to what the layer returns. t:
        scalar, [B] or [B, F]; context [B, L <= text_len, text_dim]. No activation checkpointing here:
        recomputation would re-run the cache's side effects."""
        batch, frames = x.shape[0], x.shape[2]
        t = frame_timesteps(t, batch, frames).to(x.device)
        tokens, grid = self.embed_video(x)
        ctx = self.embed_text(context)
        e, e0 = self.embed_time(t)
        for block, layer in zip(self.blocks, cache.layers):
            attend = partial(self._cached_attend, layer=layer, grid=grid, start_frame=start_frame)
            tokens = block(tokens, e0, ctx, attend, layer)
        return self.unpatchify(tokens, e, grid)

    def _rope_halves(self, x, grid):
        """RoPE on a sequence of one or two copies of the grid (teacher forcing shares positions)."""
        n = grid[0] * grid[1] * grid[2]
        return torch.cat([self.rope(part, grid) for part in x.split(n, dim=1)], dim=1)

    def _masked_attend(self, q, k, v, grid, plan):
        return planned_attention(self._rope_halves(q, grid), self._rope_halves(k, grid), v, plan)

    def _cached_attend(self, q, k, v, layer, grid, start_frame):
        frame_tokens = grid[1] * grid[2]
        keys, values, query_start = layer.update(k, v, start_frame, frame_tokens)
        key_grid = (keys.shape[1] // frame_tokens, grid[1], grid[2])
        return attention(self.rope(q, grid, query_start), self.rope(keys, key_grid), values)

    # ---- the gradient-free step on a static cache ----
    def static_step_inputs(self, x, t, context, cache, start_frame=0):
        """The Python half of a gradient-free streaming call on a static cache (new_cache(static=True)): the cache's
        bookkeeping (eviction, EMA, the once-per-chunk RoPE of the attended prefix) and RoPE tables. Returns the
        arguments of `static_step` for chunk x at frames [start_frame, start_frame + F)."""
        batch, frames = x.shape[0], x.shape[2]
        t = frame_timesteps(t, batch, frames)
        if t.device != x.device:
            t = t.to(x.device)
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))
        frame_tokens = grid[1] * grid[2]

        def rope_keys(keys, key_frames):
            return self.rope(keys, (key_frames, grid[1], grid[2]))

        dtype, heads = self.patch_embedding.weight.dtype, self.num_heads
        slots = [layer.static.prepare(batch, heads, self.dim // heads, dtype, x.device, start_frame, grid[0],
                                      frame_tokens, rope_keys) for layer in cache.layers]
        cos, sin = self.rope_cos_sin(x.device, grid, slots[0].query_start)
        buffers = [(s.keys, s.values, s.live_keys) for s in slots]
        return x, t, context, cos, sin, buffers, cache.layers

    def static_step(self, x, t, context, cos, sin, buffers, layers):
        """One gradient-free DiT call on chunk x [B, C, F, H, W] at per-frame timesteps t [B, F], attending to the
        static cache buffers (keys, values, live pre-RoPE keys) per layer, into which it writes the chunk's K/V;
        cos/sin: the chunk's RoPE tables; layers: the cache layers, whose cross-attention K/V each block reads
        (computing them from context [B, L, text_dim] on a prompt's first call). Pure tensor code: fixed shapes
        once the window is full and the prompt's K/V are held, no host sync."""
        tokens, grid = self.embed_video(x)
        e, e0 = self.embed_time(t)
        ctx = self.embed_text(context) if any(layer.cross is None for layer in layers) else None
        for block, (keys, values, live_keys), layer in zip(self.blocks, buffers, layers):
            attend = partial(_write_and_attend, keys=keys, values=values, live_keys=live_keys, cos=cos, sin=sin)
            tokens = block(tokens, e0, ctx, attend, layer)
        return self.unpatchify(tokens, e, grid)


def _write_and_attend(q, k, v, keys, values, live_keys, cos, sin):
    """Self-attention of a chunk on a static cache: RoPE q and k at the chunk's positions, write k/v in place,
    attend over every buffered frame."""
    keys, values = write_live(keys, values, live_keys, k, apply_rope(k, cos, sin), v)
    return attention(apply_rope(q, cos, sin), keys, values)
