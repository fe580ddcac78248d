"""Streaming KV cache for the causal student: attention sink + sliding window, at frame granularity
(the EMA-Sink of Reward Forcing, arXiv 2512.04678).

Each layer stores the first `sink_frames` frames in a sink buffer and the later frames in a window store:
a fixed ring of `window_frames - sink_frames` frames when windowed (constant memory), or a growing buffer
when unbounded. Keys are stored pre-RoPE, so the caller ropes the returned keys at window-relative frame
positions 0..N/L-1 and the EMA blends position-free keys, so the sink stays position-consistent however long the video.

Two ways to read the cache, one stored state:
- `update(k, v, ...)` returns freshly concatenated (sink, window, live chunk) K/V each call; only the live chunk
  carries gradient and the result is a snapshot (training rollouts, teacher-forcing checks).
- `static=True` caches add `prepare(...)` for gradient-free streaming: per layer one buffer of RoPE'd keys and
  one of values, in temporal order, written in place. The attended prefix (sink + older window frames) is
  RoPE'd once per chunk when the chunk starts; every call then writes only its own chunk into the tail
  (`write_live`), so no K/V is concatenated or re-rotated per call and, once the window is full, every
  call sees the same buffers with the same shapes (what torch.compile / CUDA graphs need).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reward_forcing.errors import ConfigError

SINK_MODES = ("none", "static", "ema")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate_cache_config(window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999, chunk_frames=None):
    """Raise a one-line ConfigError for an invalid window/sink/EMA combination."""
    _check_int("sink_frames", sink_frames, 0)
    if window_frames is not None:
        _check_int("window_frames", window_frames, 1)
        if window_frames <= sink_frames:
            raise ConfigError(f"window_frames ({window_frames}) must exceed sink_frames ({sink_frames}): "
                              "the window counts the sink frames too")
    if sink_mode not in SINK_MODES:
        raise ConfigError(f"unknown sink_mode {sink_mode!r}; expected one of {', '.join(SINK_MODES)}")
    if sink_mode == "none" and sink_frames != 0:
        raise ConfigError(f"sink_mode 'none' needs sink_frames 0, got {sink_frames}")
    if sink_mode != "none" and sink_frames == 0:
        raise ConfigError(f"sink_mode {sink_mode!r} needs sink_frames >= 1 (use sink_mode 'none' for no sink)")
    if isinstance(ema_alpha, bool) or not isinstance(ema_alpha, (int, float)) or not 0.0 <= ema_alpha <= 1.0:
        raise ConfigError(f"ema_alpha must be a number in [0, 1], got {ema_alpha!r}")
    if chunk_frames is not None:
        _check_int("chunk_frames", chunk_frames, 1)
        _check_chunk(chunk_frames, window_frames, sink_frames, sink_mode)


def _check_chunk(chunk_frames, window_frames, sink_frames, sink_mode):
    if window_frames is None:
        return
    if sink_frames + chunk_frames > window_frames:
        raise ConfigError(f"a chunk of {chunk_frames} frames does not fit a window of {window_frames} frames "
                          f"next to {sink_frames} sink frames")
    if sink_mode == "ema" and chunk_frames != sink_frames:
        raise ConfigError(f"sink_mode 'ema' needs chunk frames == sink frames (each eviction replaces one sink), "
                          f"got chunk {chunk_frames} and sink {sink_frames}")


class LayerKVCache:
    """Self-attention K/V of one block for one video. See `update`."""

    def __init__(self, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999):
        validate_cache_config(window_frames, sink_frames, sink_mode, ema_alpha)
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sink_mode = sink_mode
        self.ema_alpha = float(ema_alpha)
        self.reset()

    def reset(self):
        """Forget everything; buffers are re-allocated lazily from the next call's shapes."""
        self.frame_tokens = None
        self._sink = None        # (k, v) [B, sink_frames*L, H, D]; float32 in ema mode (see _allocate)
        self._store = None       # (k, v) [B, frames*L, H, D] of the non-sink frames
        self.next_frame = 0      # absolute index past the last written frame
        self.last_start = None   # start frame of the chunk written last (re-calls overwrite it)
        self.last_frames = 0
        self.attended_frames = ()    # absolute frames the last update returned, in order
        self.evicted_frames = ()     # absolute frames evicted by the last update
        self.num_evictions = 0       # updates that evicted at least one frame
        self.num_ema_updates = 0     # sink blends (ema mode)
        self._rewrite_end = 0        # after rewind(): frames before this are re-encodes of stored frames
        self._floor = 0              # after rewind(): the first non-sink frame that may be attended
        self.num_appends = 0         # calls that started a new chunk (the attended prefix changes only then)
        self._attend = None          # static mode: (keys, values) [B, window_frames*L, H, D], temporal order
        self._prefix_key = None      # (start_frame, num_appends) the buffers' prefix was built for
        self._live_keys = None       # static mode: pre-RoPE keys of the newest write [B, chunk*L, H, D]
        self._pending = None         # static mode: (start, frames, values, keep_sink) of it, not yet stored

    # -- layout ---------------------------------------------------------------------------------------------
    @property
    def _ring_frames(self):
        """Non-sink frames kept when windowed; None when unbounded."""
        return None if self.window_frames is None else self.window_frames - self.sink_frames

    def _slot(self, frame):
        slot = frame - self.sink_frames
        return slot if self._ring_frames is None else slot % self._ring_frames

    def _frame_view(self, frame):
        """(k, v) views of one stored frame."""
        L = self.frame_tokens
        if frame < self.sink_frames:
            buffers, index = self._sink, frame
        else:
            buffers, index = self._store, self._slot(frame)
        return tuple(buf[:, index * L:(index + 1) * L] for buf in buffers)

    def _window_start(self, end):
        """First non-sink frame attended when the newest written frame is end - 1."""
        if self._ring_frames is None:
            return max(self.sink_frames, self._floor)
        return max(self.sink_frames, self._floor, end - self._ring_frames)

    def _oldest_stored(self):
        """First non-sink frame still held (every frame from it up to next_frame is stored)."""
        if self._ring_frames is None:
            return self.sink_frames
        return max(self.sink_frames, self.next_frame - self._ring_frames)

    def first_rewritable_chunk(self, chunk_frames: int) -> int:
        """Start of the oldest chunk (chunks begin at multiples of chunk_frames) whose non-sink frames are all
        still held, skipping chunks that are all sink; next_frame when there is none."""
        oldest = self._oldest_stored()
        start = 0
        while start < self.next_frame and (start + chunk_frames <= self.sink_frames
                                           or max(start, self.sink_frames) < oldest):
            start += chunk_frames
        return min(start, self.next_frame)

    def rewind(self, frame: int) -> None:
        """Re-encode the held frames [frame, next_frame), e.g. under a new prompt (LongLive's prompt switch,
        NVlabs/LongLive pipeline/interactive_causal_inference.py `_recache_after_switch`).

        The next writes start again at `frame` and go forward chunk by chunk: each overwrites its frames' slots
        in place and evicts nothing, the sink is left as it is, and they attend to the sink and to the re-encoded
        frames only (the held frames before `frame` are stale). Writing past the old next_frame streams on as usual.
        """
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise ValueError(f"rewind frame must be a Python int, got {type(frame).__name__}")
        if not max(frame, self.sink_frames) >= self._oldest_stored() or frame > self.next_frame or frame < 0:
            raise ValueError(f"cannot rewind to frame {frame}: the cache holds frames [{self._oldest_stored()}, "
                             f"{self.next_frame}) besides the sink")
        self._flush_pending()
        self._rewrite_end = max(self._rewrite_end, self.next_frame)
        self._floor = frame
        self.next_frame = frame
        self.last_start, self.last_frames = None, 0

    @property
    def sink(self):
        """(k, v) of the sink frames as stored (detached), or None before the first call."""
        self._flush_pending()  # a caller may read or overwrite the sink: make it current first
        return self._sink

    @property
    def nbytes(self):
        """Bytes held by the cache buffers."""
        buffers = (self._sink or ()) + (self._store or ()) + (self._attend or ())
        if self._live_keys is not None:
            buffers += (self._live_keys,)
        return sum(buf.numel() * buf.element_size() for buf in buffers)

    # -- allocation -----------------------------------------------------------------------------------------
    def _allocate(self, batch, heads, head_dim, dtype, device, frame_tokens):
        self.frame_tokens = frame_tokens
        # The EMA moves the sink by (1 - alpha) ~ 1e-3 per eviction, below bf16 resolution: accumulate in fp32.
        sink_dtype = torch.float32 if self.sink_mode == "ema" else dtype
        sink_tokens = self.sink_frames * frame_tokens
        shape = (batch, sink_tokens, heads, head_dim)
        self._sink = tuple(torch.zeros(shape, dtype=sink_dtype, device=device) for _ in "kv")
        store_frames = self._ring_frames if self._ring_frames is not None else 0
        shape = (batch, store_frames * frame_tokens, heads, head_dim)
        self._store = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")

    def _grow(self, end):
        """Unbounded mode: make room for non-sink frames up to `end` (capacity doubles, so O(log) copies)."""
        needed = (end - self.sink_frames) * self.frame_tokens
        current = self._store[0].shape[1]
        if needed <= current:
            return
        size = max(needed, 2 * current)
        grown = []
        for buf in self._store:
            new = buf.new_zeros(buf.shape[0], size, *buf.shape[2:])
            new[:, :current] = buf
            grown.append(new)
        self._store = tuple(grown)

    # -- the call -------------------------------------------------------------------------------------------
    def _check_call(self, k, v, start_frame, frame_tokens):
        if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k and v must both be [B, n, H, D] of one dtype, got {tuple(k.shape)} {k.dtype} "
                             f"and {tuple(v.shape)} {v.dtype}")
        return self._check_write(k.shape, k.dtype, k.device, start_frame, frame_tokens)

    def _check_write(self, shape, dtype, device, start_frame, frame_tokens):
        """Checks of a write of K/V of `shape` [B, n, H, D]; returns (frames, appending)."""
        if isinstance(frame_tokens, bool) or not isinstance(frame_tokens, int) or frame_tokens < 1:
            raise ValueError(f"frame_tokens must be a positive int, got {frame_tokens!r}")
        if shape[1] == 0 or shape[1] % frame_tokens:
            raise ValueError(f"{shape[1]} tokens is not a positive whole number of {frame_tokens}-token frames")
        if isinstance(start_frame, bool) or not isinstance(start_frame, int):
            raise ValueError(f"start_frame must be a Python int, got {type(start_frame).__name__}")
        frames = shape[1] // frame_tokens
        appending = start_frame == self.next_frame
        rewriting = start_frame == self.last_start and frames == self.last_frames
        if not (appending or rewriting):
            raise ValueError(f"cache write of frames [{start_frame}, {start_frame + frames}) is neither the next "
                             f"chunk (frame {self.next_frame}) nor a rewrite of the last chunk "
                             f"(frames [{self.last_start}, {self.last_start}+{self.last_frames}))")
        if self._sink is not None:
            ref = self._store[0]
            if (frame_tokens != self.frame_tokens or shape[0] != ref.shape[0] or shape[2:] != ref.shape[2:]
                    or dtype != ref.dtype or device != ref.device):
                raise ValueError(f"cache call with k {tuple(shape)} {dtype} {device}, {frame_tokens} tokens/frame "
                                 f"does not match the cache's first call ({tuple(ref.shape)} {ref.dtype} {ref.device}, "
                                 f"{self.frame_tokens} tokens/frame); call reset() for a new video")
        if self.window_frames is not None:
            # ema's chunk == sink rule is checked at eviction, where it matters (a first chunk may differ)
            _check_chunk(frames, self.window_frames, self.sink_frames, "none")
        return frames, appending

    def _evict(self, start, end):
        """Drop the oldest non-sink frames that a new chunk [start, end) pushes out of the window."""
        evicted = tuple(range(self._window_start(start), self._window_start(end)))
        if evicted and self.sink_mode == "ema" and len(evicted) != self.sink_frames:
            raise ConfigError(f"sink_mode 'ema' needs each eviction to replace the whole sink: "
                              f"{len(evicted)} frames evicted, sink has {self.sink_frames}")
        self.evicted_frames = evicted
        if not evicted:
            return
        self.num_evictions += 1
        if self.sink_mode != "ema":
            return  # the new frames simply overwrite the evicted ring slots
        alpha = self.ema_alpha
        for index, frame in enumerate(evicted):
            for sink, old in zip(self._frame_view(index), self._frame_view(frame)):
                sink.mul_(alpha).add_(old.to(sink.dtype), alpha=1.0 - alpha)
        self.num_ema_updates += 1

    def _old_pieces(self, start, end, which):
        """Stored tensors (k: which=0, v: which=1) of the attended frames before `start`, in temporal order."""
        L = self.frame_tokens
        dtype = self._store[which].dtype
        pieces = [self._sink[which][:, :min(self.sink_frames, start) * L].to(dtype)]
        first = self._window_start(end)
        count = start - first
        if count > 0:
            slot = self._slot(first)
            ring = self._ring_frames
            head = count if ring is None else min(count, ring - slot)
            pieces.append(self._store[which][:, slot * L:(slot + head) * L])
            if head < count:  # the ring wrapped
                pieces.append(self._store[which][:, :(count - head) * L])
        return pieces

    def update(self, k, v, start_frame: int, frame_tokens: int):
        """Write k, v ([B, n, H, D], pre-RoPE keys) for frames [start_frame, start_frame + n // frame_tokens).

        start_frame == next frame appends (evicting the oldest non-sink frames past the window);
        start_frame == the last chunk's start rewrites it (denoising steps, context pass; never evicts).
        Returns (keys, values, query_start_frame): sink frames then window frames in temporal order, ending with
        the live k/v of this chunk; keys sit at RoPE frames 0..N/frame_tokens-1 and the chunk starts at
        query_start_frame. Only the chunk's own k/v carry gradient; the stored copies are detached.
        """
        frames, appending = self._check_call(k, v, start_frame, frame_tokens)
        if self._sink is None:
            self._allocate(k.shape[0], k.shape[2], k.shape[3], k.dtype, k.device, frame_tokens)
        end = start_frame + frames
        rewriting_held = end <= self._rewrite_end  # re-encoding after rewind(): nothing new, nothing evicted
        with torch.no_grad():
            self._advance(start_frame, end, appending, rewriting_held)
            self._pending = None  # this call's write supersedes any pending static-mode write of the chunk
            for index in range(frames):
                if rewriting_held and start_frame + index < self.sink_frames:
                    continue  # rewind() keeps the sink
                token_slice = slice(index * frame_tokens, (index + 1) * frame_tokens)
                k_dst, v_dst = self._frame_view(start_frame + index)
                k_dst.copy_(k.detach()[:, token_slice])
                v_dst.copy_(v.detach()[:, token_slice])
        keys = torch.cat(self._old_pieces(start_frame, end, 0) + [k], dim=1)
        values = torch.cat(self._old_pieces(start_frame, end, 1) + [v], dim=1)
        return keys, values, self._record(start_frame, end, frames)

    def _advance(self, start, end, appending, rewriting_held):
        """Before a write of frames [start, end): a new chunk first stores the previous chunk's pending static
        write, then evicts (and blends the sink) unless it re-encodes held frames after rewind()."""
        self.evicted_frames = ()
        if not appending:
            return
        self._flush_pending()
        self.num_appends += 1
        if rewriting_held:
            return
        self._evict(start, end)
        if self._ring_frames is None:
            self._grow(end)

    def _record(self, start, end, frames):
        """Bookkeeping after a write; returns the query start frame."""
        window = tuple(range(self._window_start(end), end))
        self.attended_frames = tuple(range(min(self.sink_frames, end))) + window
        self.next_frame = max(self.next_frame, end)
        self.last_start, self.last_frames = start, frames
        return len(self.attended_frames) - frames

    # -- static mode ----------------------------------------------------------------------------------------
    def prepare(self, batch, heads, head_dim, dtype, device, start_frame: int, frames: int, frame_tokens: int,
                rope_keys) -> "StaticAttend":
        """Get the in-place buffers for a gradient-free write of frames [start_frame, start_frame + frames).

        Same positions, eviction and EMA as `update`. rope_keys(keys, grid_frames) applies RoPE to pre-RoPE keys
        [B, grid_frames*L, H, D] at frames 0..grid_frames-1; it runs once per chunk, on the attended prefix."""
        if self.window_frames is None:
            raise ValueError("static cache buffers need a finite window (window_frames)")
        shape = (batch, frames * frame_tokens, heads, head_dim)
        frames, appending = self._check_write(shape, dtype, device, start_frame, frame_tokens)
        if self._sink is None:
            self._allocate(batch, heads, head_dim, dtype, device, frame_tokens)
        end = start_frame + frames
        rewriting_held = end <= self._rewrite_end
        with torch.no_grad():
            self._advance(start_frame, end, appending, rewriting_held)
            query_start = self._record(start_frame, end, frames)
            if self._attend is None:
                self._attend = tuple(torch.zeros(batch, self.window_frames * frame_tokens, heads, head_dim,
                                                 dtype=dtype, device=device) for _ in "kv")
            keys, values = (self._attended(buf, query_start + frames) for buf in self._attend)
            if self._prefix_key != (start_frame, self.num_appends):
                prefix = query_start * frame_tokens
                if prefix:
                    keys[:, :prefix].copy_(rope_keys(torch.cat(self._old_pieces(start_frame, end, 0), dim=1),
                                                     query_start))
                    values[:, :prefix].copy_(torch.cat(self._old_pieces(start_frame, end, 1), dim=1))
                self._prefix_key = (start_frame, self.num_appends)
            if self._live_keys is None or self._live_keys.shape != shape:
                self._live_keys = torch.zeros(shape, dtype=dtype, device=device)
            self._pending = (start_frame, frames, values[:, query_start * frame_tokens:], rewriting_held)
        return StaticAttend(keys, values, self._live_keys, query_start)

    def _attended(self, buffer, frames):
        """The first `frames` frames of a static buffer (the buffer itself when it is full)."""
        tokens = frames * self.frame_tokens
        return buffer if tokens == buffer.shape[1] else buffer[:, :tokens]

    def _flush_pending(self):
        """Store the last static-mode write (pre-RoPE keys, values) of a finished chunk in its ring slots."""
        if self._pending is None:
            return
        (start, frames, v, keep_sink), k = self._pending, self._live_keys
        L = self.frame_tokens
        for index in range(frames):
            if keep_sink and start + index < self.sink_frames:
                continue  # rewind() keeps the sink
            for dst, src in zip(self._frame_view(start + index), (k, v)):
                dst.copy_(src[:, index * L:(index + 1) * L])
        self._pending = None


@dataclass
class StaticAttend:
    """One layer's in-place K/V for one gradient-free call: keys (RoPE'd) and values [B, N, H, D] of every
    attended frame, prefix already filled; the call's own chunk goes into the last n tokens (`write_live`)."""
    keys: torch.Tensor
    values: torch.Tensor
    pending_keys: torch.Tensor   # pre-RoPE keys of the chunk, moved to the ring when the next chunk starts
    query_start: int


def write_live(keys, values, live_keys, k, roped_k, v):
    """Write a chunk's pre-RoPE keys k, RoPE'd keys and values ([B, n, H, D]) into the tail of a layer's static
    buffers, in place; returns (keys, values)."""
    n = k.shape[1]
    live_keys.copy_(k)
    keys[:, -n:].copy_(roped_k)
    values[:, -n:].copy_(v)
    return keys, values


class KVCache:
    """All layers' caches for one model and one video: self-attention per block plus cross-attention K/V."""

    def __init__(self, num_layers, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999,
                 chunk_frames=None, static=False):
        _check_int("num_layers", num_layers, 1)
        validate_cache_config(window_frames, sink_frames, sink_mode, ema_alpha, chunk_frames)
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sink_mode = sink_mode
        self.ema_alpha = float(ema_alpha)
        self.chunk_frames = chunk_frames
        # Gradient-free streaming reads through in-place buffers (`LayerKVCache.prepare`); windowed caches only.
        self.static = bool(static) and window_frames is not None
        self.layers = [LayerKVCache(window_frames, sink_frames, sink_mode, ema_alpha) for _ in range(num_layers)]
        self.cross = [None] * num_layers

    def reset(self):
        """New video: clear self- and cross-attention state."""
        for layer in self.layers:
            layer.reset()
        self.reset_cross()

    def reset_cross(self):
        """Prompt switch: drop the cross-attention K/V only."""
        self.cross = [None] * len(self.layers)

    def rewind(self, frame: int) -> None:
        """Prompt switch: re-encode the held frames from `frame` on in every layer (LayerKVCache.rewind)."""
        for layer in self.layers:
            layer.rewind(frame)

    @property
    def nbytes(self):
        cross = sum(t.numel() * t.element_size() for kv in self.cross if kv is not None for t in kv)
        return sum(layer.nbytes for layer in self.layers) + cross
