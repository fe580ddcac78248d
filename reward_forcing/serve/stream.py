"""One client's video: controls set from the event loop, generation run on the device thread.

The generation (StreamRunner.run) only looks at the controls between chunks: a switch is applied when the
next chunk begins (StreamingGenerator.switch_prompt), a pause waits after a chunk, and stop or a dropped client
ends the video at the next chunk boundary. Events go to the client through `emit`, callable from any thread.

A video may start from an uploaded picture (its frame 0), or continue the connection's last video: the latent
frames that video sent are kept (on the CPU, up to serve.max_frames of them) and replayed as the new stream's
prefix (reward_forcing/inference/conditioning.py), whose frames go to the mp4 but not again to the client.
"""
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from reward_forcing.inference.conditioning import VideoStart
from reward_forcing.serve.log import LOG, one_line
from reward_forcing.serve.protocol import ProtocolError, Start
from reward_forcing.serve.videos import VideoStore
from reward_forcing.video import Mp4Writer


class Cancelled(Exception):
    """The client went away: stop at the chunk boundary and keep nothing."""


@dataclass(frozen=True)
class PendingSwitch:
    prompt: str
    at_frame: int | None
    received: float  # perf_counter when the message arrived


class Stream:
    def __init__(self, start: Start, seed: int, emit: Callable, picture: np.ndarray | None = None,
                 prefix: torch.Tensor | None = None):
        """picture: the fitted picture frame 0 is made from; prefix: the latents [1, C, P, h, w] it continues."""
        self.prompt, self.seed, self.frames = start.prompt, seed, start.frames  # frames: new latent frames or None
        self.picture, self.prefix = picture, prefix
        self.first_frame = 0 if prefix is None else prefix.shape[2]  # the latent frame its first new chunk makes
        self.latents = None  # once finished: the latent frames it sent, prefix included (None: more than kept)
        self.emit = emit
        self.received = time.perf_counter()
        self.finished = threading.Event()  # set by the device thread when it is done with this stream
        self.cancelled = False
        self.stopping = False
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._switches: list[PendingSwitch] = []
        self._next_frame = self.first_frame  # first latent frame of the first chunk not begun yet

    # -- from the event loop --------------------------------------------------------------------------------
    def request_switch(self, prompt: str, at_frame: int | None) -> None:
        with self._lock:
            if at_frame is not None and at_frame < self._next_frame:
                raise ProtocolError(f"switch: latent frame {at_frame} is already generated or being generated; the "
                                    f"next chunk boundary is latent frame {self._next_frame}")
            end = None if self.frames is None else self.first_frame + self.frames
            if at_frame is not None and end is not None and at_frame >= end:
                raise ProtocolError(f"switch: at_frame={at_frame} is not before the video's end ({end} latent "
                                    "frames)")
            self._switches.append(PendingSwitch(prompt, at_frame, time.perf_counter()))

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self.stopping = True
        self._running.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._running.set()

    # -- from the device thread -----------------------------------------------------------------------------
    def begin_chunk(self, start: int, chunk_frames: int) -> PendingSwitch | None:
        """Chunk `start` begins: the latest switch due by now, if any (earlier due ones are superseded)."""
        with self._lock:
            due = [s for s in self._switches if s.at_frame is None or s.at_frame <= start]
            self._switches = [s for s in self._switches if s not in due]
            self._next_frame = start + chunk_frames
        return due[-1] if due else None

    def wait_while_paused(self) -> None:
        """Hold here while paused; the events name the boundary where the video goes on (and a switch applies).
        With overlap_decode the chunk after the last one sent is already made, so that boundary is one chunk on."""
        if self._running.is_set():
            return
        with self._lock:
            frame = self._next_frame
        self.emit({"type": "paused", "latent_frame": frame})
        self._running.wait()
        if not self.cancelled:
            self.emit({"type": "resumed", "latent_frame": frame})


class KeptLatents:
    """A stream's latent chunks on the CPU (the pipeline's on_latents), after the prefix it continues, while the
    whole video stays within `limit` latent frames; beyond, nothing is held and it cannot be continued."""

    def __init__(self, prefix: torch.Tensor | None, chunk_frames: int, limit: int):
        self.chunks = [] if prefix is None else [prefix]
        self.frames = 0 if prefix is None else prefix.shape[2]
        self.chunk_frames, self.limit = chunk_frames, limit

    def __call__(self, chunk: torch.Tensor) -> None:
        if self.chunks is not None and self.frames + chunk.shape[2] <= self.limit + self.chunk_frames:
            self.chunks.append(chunk.cpu())
        else:
            self.chunks = None
        self.frames += chunk.shape[2]

    def video(self, sent_frames: int) -> torch.Tensor | None:
        """The first `sent_frames` latent frames (overlapped decoding may have made a chunk more than was sent)."""
        if not self.chunks or sent_frames > self.limit:
            return None
        return torch.cat(self.chunks, dim=2)[:, :, :sent_frames]


def encoded(frame, image_format: str, **options) -> bytes:
    """A uint8 frame [H, W, 3] as an image file's bytes (PIL's format name and save options)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=image_format, **options)
    return buffer.getvalue()


class StreamRunner:
    """Generates streams on one device with one loaded VideoPipeline, writing each to an mp4 for download."""

    def __init__(self, pipeline, cfg, store: VideoStore):
        self.pipeline = pipeline
        self.store = store
        self.fps = int(cfg.fps)
        self.chunk_frames = int(cfg.num_frame_per_block)
        self.jpeg_quality = int(cfg.serve.jpeg_quality)
        self.max_kept_frames = int(cfg.serve.max_frames)  # latent frames kept for a continuation

    def run(self, stream: Stream) -> None:
        last = None  # the stream's last event
        try:
            if not stream.cancelled:
                last = self._generate(stream)
        except Cancelled:
            pass
        except Exception as err:  # a failed generation must not take the server down
            LOG.error("generation failed: %s", one_line(err))
            last = {"type": "error", "ends_stream": True, "message": f"generation failed: {type(err).__name__}: {err}"}
        finally:
            stream.finished.set()  # before the last event: a client that reads it may start its next stream at once
            if last is not None:
                stream.emit(last)

    def _switch_callback(self, stream: Stream, switched_at: dict):
        def switch(start):
            pending = stream.begin_chunk(start, self.chunk_frames)
            if pending is None:
                return None
            switched_at[start] = pending.received
            stream.emit({"type": "switched", "start_latent_frame": start, "prompt": pending.prompt})
            return self.pipeline.encode(pending.prompt)
        return switch

    def _video_start(self, stream: Stream) -> VideoStart | None:
        if stream.picture is not None:
            return self.pipeline.start_from(image=stream.picture)
        if stream.prefix is not None:  # replayed, and decoded into the mp4 (bit-identical to the frames it sent)
            return VideoStart(prefix=stream.prefix, keep_prefix=True)
        return None

    def _generate(self, stream: Stream) -> dict:
        """Stream the video's chunks to the client; the `done` event, for `run` to send last."""
        began = time.perf_counter()
        started = {"type": "started", "seed": str(stream.seed), "latent_frames": stream.frames,
                   "wait_s": round(began - stream.received, 4)}
        if stream.first_frame:
            started["continues_from"] = stream.first_frame
        if stream.picture is not None:
            started["picture"] = True
        stream.emit(started)
        switched_at = {}
        kept = KeptLatents(stream.prefix, self.chunk_frames, self.max_kept_frames)
        chunks = self.pipeline.frames(self.pipeline.encode(stream.prompt), stream.frames, stream.seed,
                                      switch=self._switch_callback(stream, switched_at),
                                      start=self._video_start(stream), on_latents=kept)
        token, path = self.store.new_video()
        start_frame, frames_sent = stream.first_frame, 0
        reason = "finished"
        try:
            with Mp4Writer(path, fps=self.fps) as writer:
                for _ in range(stream.first_frame // self.chunk_frames):  # the continued video, into the mp4
                    writer.append(next(chunks))
                while True:
                    tick = time.perf_counter()
                    frames = next(chunks, None)
                    if frames is None:
                        break
                    done = time.perf_counter()
                    writer.append(frames)
                    event = {"type": "chunk", "start_latent_frame": start_frame, "video_frames": len(frames),
                             "generate_s": round(done - tick, 4)}
                    if start_frame == stream.first_frame:
                        event["ttff_s"] = round(done - stream.received, 4)
                    if start_frame in switched_at:
                        event["switch_s"] = round(done - switched_at[start_frame], 4)
                    stream.emit(event)
                    for frame in frames:
                        stream.emit(encoded(frame, "JPEG", quality=self.jpeg_quality))
                    frames_sent += len(frames)
                    start_frame += self.chunk_frames
                    stream.wait_while_paused()
                    if stream.cancelled:
                        raise Cancelled
                    if stream.stopping:
                        reason = "stopped"
                        break
        finally:
            chunks.close()
        self.store.add(token, path)
        stream.latents = kept.video(start_frame)
        return {"type": "done", "reason": reason, "video_frames": frames_sent, "latent_frames": start_frame,
                "seconds": round(time.perf_counter() - began, 3), "video": f"/video/{token}.mp4",
                "continuable": stream.latents is not None}
