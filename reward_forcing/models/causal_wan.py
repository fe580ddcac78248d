"""Causal Wan2.1 student: per-frame timesteps, block-causal attention, streaming through a KV cache.

Upstream counterpart: wan/modules/causal_model.py of Self-Forcing.

Same parameters and state-dict keys as WanModel, so teacher weights load unchanged. Three self-attention
patterns share the blocks:
- no cache: block-causal over all frames (chunks of num_frame_per_block, optional local window);
- teacher forcing (clean_x given): [clean || noisy] with shared RoPE positions, only the noisy half returned;
- cache: frames [start_frame, start_frame + F) attend to what reward_forcing.cache returns, with RoPE applied at
  read time (keys at frames 0..N/L-1, queries from query_start_frame), so positions are window-relative.

A static cache (`new_cache(..., static=True)`) without autograd takes the streaming step (`static_step`): the
cache's bookkeeping (eviction, EMA, the once-per-chunk RoPE of the attended prefix) runs first in Python, then
one pure tensor function runs the DiT and writes the chunk's K/V into the cache's buffers in place. Once the
window is full its shapes never change and it has no host synchronisation or value-dependent branch, so
`compile_streaming()` can hand it to torch.compile(fullgraph=True) (and CUDA graphs with "reduce-overhead");
the chunks that fill the window (fewer attended frames) run the same function eagerly.
"""
from functools import lru_cache, partial

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.cache import write_live
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
        self.compiled_step = None  # set by compile_streaming()

    def new_cache(self, batch_size, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999,
                  static=False):
        """An empty KV cache for one video of this model (batch_size is checked by the cache on first write).
        static=True: gradient-free calls write in place into fixed buffers (see the module docstring)."""
        from reward_forcing.cache import KVCache

        del batch_size  # the cache allocates lazily from the first keys it receives
        return KVCache(len(self.blocks), window_frames=window_frames, sink_frames=sink_frames, sink_mode=sink_mode,
                       ema_alpha=ema_alpha, chunk_frames=self.num_frame_per_block, static=static)

    def compile_streaming(self, mode=None):
        """torch.compile the steady-state streaming step (fullgraph, static shapes); mode as torch.compile's
        (None = default, "reduce-overhead" = CUDA graphs on GPU). Returns self."""
        self.compiled_step = torch.compile(self.static_step, fullgraph=True, dynamic=False, mode=mode)
        return self

    def forward(self, x, t, context, cache=None, start_frame=0, clean_x=None, aug_t=None):
        """x [B, C, F, H, W]; t scalar, [B] or per-frame [B, F]; context [B, L <= text_len, text_dim].

        cache=None: block-causal forward over frames 0..F-1 (teacher forcing when clean_x, same shape as x, is
        given; its timesteps are aug_t, default 0). With a cache: frames [start_frame, start_frame + F)."""
        if cache is not None and clean_x is not None:
            raise ValueError("teacher forcing (clean_x) and a KV cache cannot be combined")
        if (getattr(cache, "static", False) and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type)):
            return self._static_forward(x, t, context, cache, start_frame)
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

        if cache is None:
            plan = attention_plan(frames, frame_tokens, self.num_frame_per_block, self.local_attn_size,
                                  clean_x is not None)
            attend = partial(self._masked_attend, grid=grid, plan=plan)
            for i in range(len(self.blocks)):
                tokens = self.run_block(i, tokens, e0, ctx, attend)
        else:  # no activation checkpointing here: recomputation would re-run the cache's side effects
            for i, block in enumerate(self.blocks):
                attend = partial(self._cached_attend, layer=cache.layers[i], grid=grid, start_frame=start_frame)
                tokens = block(tokens, e0, ctx, attend, self._cross_kv(cache, i, ctx))

        if clean_x is not None:  # keep the noisy half only
            tokens, e = tokens[:, frames * frame_tokens:], e[:, frames:]
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

    # ---- the streaming step on a static cache ----
    def _static_forward(self, x, t, context, cache, start_frame):
        batch, frames = x.shape[0], x.shape[2]
        t = frame_timesteps(t, batch, frames)
        if t.device != x.device:
            t = t.to(x.device)
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))
        frame_tokens = grid[1] * grid[2]

        def rope_keys(keys, key_frames):
            return self.rope(keys, (key_frames, grid[1], grid[2]))

        dtype, heads = self.patch_embedding.weight.dtype, self.num_heads
        slots = [layer.prepare(batch, heads, self.dim // heads, dtype, x.device, start_frame, grid[0], frame_tokens,
                               rope_keys) for layer in cache.layers]
        if any(kv is None for kv in cache.cross):
            ctx = self.embed_text(context)
            cache.cross = [block.cross_attn.key_value(ctx) for block in self.blocks]
        cos, sin = self.rope_cos_sin(x.device, grid, slots[0].query_start)
        buffers = [(s.keys, s.values, s.pending_keys) for s in slots]
        full = slots[0].keys.shape[1] == cache.window_frames * frame_tokens
        if not full or self.compiled_step is None:
            return self.static_step(x, t, cos, sin, buffers, cache.cross)
        for tensor in [buf for layer in buffers for buf in layer] + [kv for pair in cache.cross for kv in pair]:
            # written in place / reused every call: CUDA graphs may keep their addresses instead of copying them
            torch._dynamo.mark_static_address(tensor, guard=False)
        return self.compiled_step(x, t, cos, sin, buffers, cache.cross)

    def static_step(self, x, t, cos, sin, buffers, cross_kv):
        """One gradient-free DiT call on chunk x [B, C, F, H, W] at per-frame timesteps t [B, F], attending to the
        static cache buffers (keys, values, live pre-RoPE keys) per layer, into which it writes the chunk's K/V;
        cos/sin: the chunk's RoPE tables; cross_kv: the prompt's cross-attention (k, v) per layer. Pure tensor
        code: fixed shapes once the window is full, no host sync."""
        tokens, grid = self.embed_video(x)
        e, e0 = self.embed_time(t)
        for block, (keys, values, live_keys), kv in zip(self.blocks, buffers, cross_kv):
            attend = partial(_write_and_attend, keys=keys, values=values, live_keys=live_keys, cos=cos, sin=sin)
            tokens = block(tokens, e0, None, attend, kv)
        return self.unpatchify(tokens, e, grid)

    def _cross_kv(self, cache, i, ctx):
        """Cross-attention K/V from the cache, computed once per prompt. Under autograd they are recomputed so
        that gradients reach the k/v projections (same values)."""
        if cache.cross[i] is None or torch.is_grad_enabled():
            k, v = self.blocks[i].cross_attn.key_value(ctx)
            cache.cross[i] = (k.detach(), v.detach())
            return k, v
        return cache.cross[i]


def _write_and_attend(q, k, v, keys, values, live_keys, cos, sin):
    """Self-attention of a chunk on a static cache: RoPE q and k at the chunk's positions, write k/v in place,
    attend over every buffered frame."""
    keys, values = write_live(keys, values, live_keys, k, apply_rope(k, cos, sin), v)
    return attention(apply_rope(q, cos, sin), keys, values)
