"""Streaming KV cache for the causal student: attention sink + sliding window, at frame granularity
(the EMA-Sink of Reward Forcing, arXiv 2512.04678).

Per block, a `LayerKVCache` holds two things:
- ring storage with the sink policy: the first `sink_frames` frames in a sink buffer and the later frames in a
  ring of `window_frames - sink_frames` frames (constant memory), or in a growing buffer when unbounded. A frame
  pushed out of the window is handed to the sink policy (`_absorb`: none, static or EMA). Keys are stored pre-RoPE,
  so the caller ropes the returned keys at window-relative frame positions 0..N/L-1 and the EMA blends
  position-free keys: the sink stays position-consistent however long the video.
  `update(k, v, ...)` writes a chunk and returns freshly concatenated (sink, window, chunk) K/V; only the chunk
  carries gradient and the result is a snapshot (training rollouts, teacher-forcing checks).
- `cross`: the block's cross-attention K/V of the current prompt (the block computes and keeps them itself).

A static cache (`KVCache(static=True)`) adds per layer a `StaticKV` for gradient-free streaming: one buffer of
RoPE'd keys and one of values, in temporal order, written in place. The attended prefix (sink + older window
frames) is RoPE'd once per chunk when the chunk starts; every call then writes only its own chunk into the tail
(`write_live`), so no K/V is concatenated or re-rotated per call and, once the window is full, every call sees the
same buffers with the same shapes (what torch.compile / CUDA graphs need). The chunk's K/V reach the ring when the
next chunk starts (a deferred write).
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
    """One block's K/V for one video: ring storage with the sink policy, and the prompt's cross-attention K/V.
    See `update`; static=True adds the in-place buffers (`static`, a StaticKV)."""

    def __init__(self, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999, static=False):
        validate_cache_config(window_frames, sink_frames, sink_mode, ema_alpha)
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.sink_mode = sink_mode
        self.ema_alpha = float(ema_alpha)
        self.static = StaticKV(self) if static else None
        self.reset()

    def reset(self):
        """Forget everything; buffers are re-allocated lazily from the next call's shapes."""
        self.frame_tokens = None
        self._sink = None         # (k, v) [B, sink_frames*L, H, D]; float32 in ema mode (see _allocate)
        self._store = None        # (k, v) [B, frames*L, H, D] of the non-sink frames (the ring, or a growing buffer)
        self.next_frame = 0       # absolute index past the last written frame
        self.last_chunk = None    # (start, frames) of the last write: the chunk that later calls may rewrite
        self.evicted_frames = ()  # absolute frames evicted by the last write
        self.num_evictions = 0    # writes that evicted at least one frame
        self.num_appends = 0      # writes that started a new chunk (the attended prefix changes only then)
        self._floor = 0           # after rewind(): the first non-sink frame that may be attended
        self._rewrite_end = 0     # after rewind(): frames before this are re-encodes of stored frames
        self._deferred = None     # a static-mode write, stored when the next chunk starts (defer_write)
        self.cross = None         # the block's cross-attention (k, v) of the current prompt
        if self.static is not None:
            self.static.reset()

    # -- what the last write attended -----------------------------------------------------------------------
    @property
    def attended_frames(self):
        """Absolute frames the last write attended, in order: the sink frames, then the window up to its chunk."""
        if self.last_chunk is None:
            return ()
        end = sum(self.last_chunk)
        return tuple(range(min(self.sink_frames, end))) + tuple(range(self._window_start(end), end))

    @property
    def query_start(self):
        """RoPE frame position of the last written chunk's first frame among the attended frames."""
        return len(self.attended_frames) - self.last_chunk[1]

    @property
    def num_ema_updates(self):
        """Sink blends so far (each eviction blends once in ema mode)."""
        return self.num_evictions if self.sink_mode == "ema" else 0

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
        self._store_deferred()
        self._rewrite_end = max(self._rewrite_end, self.next_frame)
        self._floor = frame
        self.next_frame = frame
        self.last_chunk = None

    @property
    def sink(self):
        """(k, v) of the sink frames as stored (detached), or None before the first call."""
        self._store_deferred()  # a caller may read or overwrite the sink: make it current first
        return self._sink

    @property
    def nbytes(self):
        """Bytes held by the cache buffers (cross-attention K/V and static buffers included)."""
        buffers = (self._sink or ()) + (self._store or ()) + (self.cross or ())
        own = sum(buf.numel() * buf.element_size() for buf in buffers)
        return own + (self.static.nbytes if self.static is not None else 0)

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

    # -- writes ---------------------------------------------------------------------------------------------
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
        if not (appending or self.last_chunk == (start_frame, frames)):
            last = "none" if self.last_chunk is None else f"frames [{self.last_chunk[0]}, {sum(self.last_chunk)})"
            raise ValueError(f"cache write of frames [{start_frame}, {start_frame + frames}) is neither the next "
                             f"chunk (frame {self.next_frame}) nor a rewrite of the last chunk ({last})")
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

    def begin_write(self, shape, dtype, device, start_frame: int, frame_tokens: int):
        """Everything before a write of K/V of `shape` [B, n, H, D] for frames from start_frame: checks,
        allocation, and, when it starts a new chunk, storing the last deferred write and evicting (the sink policy
        takes the evicted frames). Returns (end frame, keep_sink): keep_sink when the write re-encodes held
        frames after rewind(), which evicts nothing and leaves the sink as it is."""
        frames, appending = self._check_write(shape, dtype, device, start_frame, frame_tokens)
        if self._sink is None:
            self._allocate(shape[0], shape[2], shape[3], dtype, device, frame_tokens)
        end = start_frame + frames
        keep_sink = end <= self._rewrite_end
        self.evicted_frames = ()
        if appending:
            self._store_deferred()
            self.num_appends += 1
            if not keep_sink:
                self._evict(start_frame, end)
                if self._ring_frames is None:
                    self._grow(end)
        self.next_frame = max(self.next_frame, end)
        self.last_chunk = (start_frame, frames)
        return end, keep_sink

    def _evict(self, start, end):
        """Drop the oldest non-sink frames that a new chunk [start, end) pushes out of the window."""
        evicted = tuple(range(self._window_start(start), self._window_start(end)))
        if evicted and self.sink_mode == "ema" and len(evicted) != self.sink_frames:
            raise ConfigError(f"sink_mode 'ema' needs each eviction to replace the whole sink: "
                              f"{len(evicted)} frames evicted, sink has {self.sink_frames}")
        self.evicted_frames = evicted
        if evicted:
            self.num_evictions += 1
            self._absorb(evicted)

    def _absorb(self, evicted):
        """The sink policy. none: no sink; static: the sink keeps the video's first frames; ema: the EMA-Sink
        (arXiv 2512.04678), sink frame i <- alpha * sink frame i + (1 - alpha) * evicted frame i, keys and values
        alike. The evicted ring slots are then simply overwritten by the new chunk."""
        if self.sink_mode != "ema":
            return
        alpha = self.ema_alpha
        for index, frame in enumerate(evicted):
            for sink, old in zip(self._frame_view(index), self._frame_view(frame)):
                sink.mul_(alpha).add_(old.to(sink.dtype), alpha=1.0 - alpha)

    def _write(self, start, k, v, keep_sink):
        """Store k, v [B, n, H, D] as frames start.. in their sink / ring slots (keep_sink: skip sink frames)."""
        L = self.frame_tokens
        for index in range(k.shape[1] // L):
            if keep_sink and start + index < self.sink_frames:
                continue  # rewind() keeps the sink
            for dst, src in zip(self._frame_view(start + index), (k, v)):
                dst.copy_(src[:, index * L:(index + 1) * L])

    def defer_write(self, start, k, v, keep_sink):
        """Store k, v (buffers that the chunk's calls fill in place) as frames start.. once the chunk is done:
        when the next chunk starts, the cache is rewound or the sink is read."""
        self._deferred = (start, k, v, keep_sink)

    def _store_deferred(self):
        if self._deferred is not None:
            self._write(*self._deferred)
            self._deferred = None

    def held(self, start, end, which):
        """Stored tensors (k: which=0, v: which=1) of the frames a chunk [start, end) attends to before itself,
        in temporal order (pieces to concatenate)."""
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
        if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k and v must both be [B, n, H, D] of one dtype, got {tuple(k.shape)} {k.dtype} "
                             f"and {tuple(v.shape)} {v.dtype}")
        with torch.no_grad():
            end, keep_sink = self.begin_write(k.shape, k.dtype, k.device, start_frame, frame_tokens)
            self._deferred = None  # this write supersedes a deferred static-mode write of the same chunk
            self._write(start_frame, k.detach(), v.detach(), keep_sink)
        keys = torch.cat(self.held(start_frame, end, 0) + [k], dim=1)
        values = torch.cat(self.held(start_frame, end, 1) + [v], dim=1)
        return keys, values, self.query_start


@dataclass
class StaticAttend:
    """One layer's in-place K/V for one gradient-free call: keys (RoPE'd) and values [B, N, H, D] of every
    attended frame, prefix already filled; the call's own chunk goes into the last n tokens (`write_live`)."""
    keys: torch.Tensor
    values: torch.Tensor
    live_keys: torch.Tensor   # pre-RoPE keys of the chunk, stored in the ring when the next chunk starts
    query_start: int


class StaticKV:
    """The in-place buffers of one layer for gradient-free streaming calls (module docstring); reads the attended
    prefix from, and defers the chunk's write to, its LayerKVCache."""

    def __init__(self, layer: LayerKVCache):
        self.layer = layer
        self.reset()

    def reset(self):
        self._buffers = None     # (keys, values) [B, window_frames*L, H, D], temporal order
        self._live_keys = None   # pre-RoPE keys of the newest write [B, chunk*L, H, D]
        self._prefix_for = None  # (start_frame, num_appends) of the chunk whose prefix the buffers hold

    def tensors(self):
        """The buffers allocated so far."""
        return (self._buffers or ()) + ((self._live_keys,) if self._live_keys is not None else ())

    @property
    def nbytes(self):
        return sum(buf.numel() * buf.element_size() for buf in self.tensors())

    def prepare(self, batch, heads, head_dim, dtype, device, start_frame: int, frames: int, frame_tokens: int,
                rope_keys) -> StaticAttend:
        """Get the in-place buffers for a gradient-free write of frames [start_frame, start_frame + frames).

        Same positions, eviction and EMA as `LayerKVCache.update`. rope_keys(keys, grid_frames) applies RoPE to
        pre-RoPE keys [B, grid_frames*L, H, D] at frames 0..grid_frames-1; it runs once per chunk, on the
        attended prefix."""
        layer = self.layer
        if layer.window_frames is None:
            raise ValueError("static cache buffers need a finite window (window_frames)")
        shape = (batch, frames * frame_tokens, heads, head_dim)
        with torch.no_grad():
            end, keep_sink = layer.begin_write(shape, dtype, device, start_frame, frame_tokens)
            query_start = layer.query_start
            if self._buffers is None:
                self._buffers = tuple(torch.zeros(batch, layer.window_frames * frame_tokens, heads, head_dim,
                                                  dtype=dtype, device=device) for _ in "kv")
            # the first `query_start + frames` frames of each buffer (the buffer itself once the window is full)
            tokens = (query_start + frames) * frame_tokens
            keys, values = (buf if tokens == buf.shape[1] else buf[:, :tokens] for buf in self._buffers)
            if self._prefix_for != (start_frame, layer.num_appends):
                prefix = query_start * frame_tokens
                if prefix:
                    keys[:, :prefix].copy_(rope_keys(torch.cat(layer.held(start_frame, end, 0), dim=1), query_start))
                    values[:, :prefix].copy_(torch.cat(layer.held(start_frame, end, 1), dim=1))
                self._prefix_for = (start_frame, layer.num_appends)
            if self._live_keys is None or self._live_keys.shape != shape:
                self._live_keys = torch.zeros(shape, dtype=dtype, device=device)
            layer.defer_write(start_frame, self._live_keys, values[:, query_start * frame_tokens:], keep_sink)
        return StaticAttend(keys, values, self._live_keys, query_start)


def write_live(keys, values, live_keys, k, roped_k, v):
    """Write a chunk's pre-RoPE keys k, RoPE'd keys and values ([B, n, H, D]) into the tail of a layer's static
    buffers, in place; returns (keys, values)."""
    n = k.shape[1]
    live_keys.copy_(k)
    keys[:, -n:].copy_(roped_k)
    values[:, -n:].copy_(v)
    return keys, values


class KVCache:
    """All layers' caches for one model and one video."""

    def __init__(self, num_layers, window_frames=None, sink_frames=0, sink_mode="none", ema_alpha=0.999,
                 chunk_frames=None, static=False):
        _check_int("num_layers", num_layers, 1)
        validate_cache_config(window_frames, sink_frames, sink_mode, ema_alpha, chunk_frames)
        self.window_frames = window_frames
        # Gradient-free streaming reads through in-place buffers (StaticKV); windowed caches only.
        self.static = bool(static) and window_frames is not None
        self.layers = [LayerKVCache(window_frames, sink_frames, sink_mode, ema_alpha, self.static)
                       for _ in range(num_layers)]

    @property
    def cross(self):
        """Each block's cross-attention (k, v) of the current prompt (None before the prompt's first call)."""
        return [layer.cross for layer in self.layers]

    @property
    def steady(self):
        """Every layer attends a full window and holds the prompt's cross-attention K/V: from here on every
        gradient-free call sees the same buffers with the same shapes (what torch.compile / CUDA graphs need)."""
        return all(len(layer.attended_frames) == self.window_frames and layer.cross is not None
                   for layer in self.layers)

    def in_place_tensors(self):
        """What the gradient-free calls of a steady cache read and write in place: every layer's static buffers
        and cross-attention K/V."""
        return [tensor for layer in self.layers for tensor in layer.static.tensors() + layer.cross]

    def reset(self):
        """New video: clear self- and cross-attention state."""
        for layer in self.layers:
            layer.reset()

    def reset_cross(self):
        """Prompt switch: drop the cross-attention K/V only."""
        for layer in self.layers:
            layer.cross = None

    def rewind(self, frame: int) -> None:
        """Prompt switch: re-encode the held frames from `frame` on in every layer (LayerKVCache.rewind)."""
        for layer in self.layers:
            layer.rewind(frame)

    @property
    def nbytes(self):
        return sum(layer.nbytes for layer in self.layers)
