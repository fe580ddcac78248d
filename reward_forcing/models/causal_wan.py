"""Causal Wan2.1 student (SPEC §2): per-frame timesteps, block-causal attention, streaming through a KV cache.

Same parameters and state-dict keys as WanModel, so teacher weights load unchanged. Three self-attention
patterns share the blocks:
- no cache: block-causal over all frames (chunks of num_frame_per_block, optional local window);
- teacher forcing (clean_x given): [clean || noisy] with shared RoPE positions, only the noisy half returned;
- cache: frames [start_frame, start_frame + F) attend to what reward_forcing.cache returns, with RoPE applied at
  read time (keys at frames 0..N/L-1, queries from query_start_frame), so positions are window-relative.
"""
from functools import lru_cache, partial

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.models.attention import attention
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
    """Block-causal pattern (SPEC §2.2) as, per query chunk, its token range and the key token ranges it sees.

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

    def new_cache(self, batch_size, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999):
        """An empty KV cache for one video of this model (batch_size is checked by the cache on first write)."""
        from reward_forcing.cache import KVCache

        del batch_size  # the cache allocates lazily from the first keys it receives
        return KVCache(len(self.blocks), window_frames=window_frames, sink_frames=sink_frames, sink_mode=sink_mode,
                       ema_alpha=ema_alpha, chunk_frames=self.num_frame_per_block)

    def forward(self, x, t, context, cache=None, start_frame=0, clean_x=None, aug_t=None):
        """x [B, C, F, H, W]; t scalar, [B] or per-frame [B, F]; context [B, L <= text_len, text_dim].

        cache=None: block-causal forward over frames 0..F-1 (teacher forcing when clean_x, same shape as x, is
        given; its timesteps are aug_t, default 0). With a cache: frames [start_frame, start_frame + F)."""
        if cache is not None and clean_x is not None:
            raise ValueError("teacher forcing (clean_x) and a KV cache cannot be combined")
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

    def _cross_kv(self, cache, i, ctx):
        """Cross-attention K/V from the cache, computed once per prompt. Under autograd they are recomputed so
        that gradients reach the k/v projections (same values)."""
        if cache.cross[i] is None or torch.is_grad_enabled():
            k, v = self.blocks[i].cross_attn.key_value(ctx)
            cache.cross[i] = (k.detach(), v.detach())
            return k, v
        return cache.cross[i]
