"""One client's video: controls set from the event loop, generation run on the device thread.

The generation (StreamRunner.run) only looks at the controls between chunks: a switch is applied when the
next chunk begins (StreamingGenerator.switch_prompt), a pause waits after a chunk, and stop or a dropped client
ends the video at the next chunk boundary. Events go to the client through `emit`, callable from any thread.
"""
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

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
    def __init__(self, start: Start, seed: int, emit: Callable):
        self.prompt, self.seed, self.frames = start.prompt, seed, start.frames  # frames: latent frames or None
        self.emit = emit
        self.received = time.perf_counter()
        self.finished = threading.Event()  # set by the device thread when it is done with this stream
        self.cancelled = False
        self.stopping = False
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._switches: list[PendingSwitch] = []
        self._next_frame = 0  # first latent frame of the first chunk not begun yet

    # -- from the event loop --------------------------------------------------------------------------------
    def request_switch(self, prompt: str, at_frame: int | None) -> None:
        with self._lock:
            if at_frame is not None and at_frame < self._next_frame:
                raise ProtocolError(f"switch: latent frame {at_frame} is already generated or being generated; the "
                                    f"next chunk boundary is latent frame {self._next_frame}")
            if at_frame is not None and self.frames is not None and at_frame >= self.frames:
                raise ProtocolError(f"switch: at_frame={at_frame} is not before the video's end ({self.frames} latent "
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


def jpeg(frame, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class StreamRunner:
    """Generates streams on one device with one loaded VideoPipeline, writing each to an mp4 for download."""

    def __init__(self, pipeline, cfg, store: VideoStore):
        self.pipeline = pipeline
        self.store = store
        self.fps = int(cfg.fps)
        self.chunk_frames = int(cfg.num_frame_per_block)
        self.jpeg_quality = int(cfg.serve.jpeg_quality)

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

    def _generate(self, stream: Stream) -> dict:
        """Stream the video's chunks to the client; the `done` event, for `run` to send last."""
        began = time.perf_counter()
        stream.emit({"type": "started", "seed": str(stream.seed), "latent_frames": stream.frames,
                     "wait_s": round(began - stream.received, 4)})
        switched_at = {}
        chunks = self.pipeline.frames(self.pipeline.encode(stream.prompt), stream.frames, stream.seed,
                                      switch=self._switch_callback(stream, switched_at))
        token, path = self.store.new_video()
        start_frame = frames_sent = 0
        reason = "finished"
        try:
            with Mp4Writer(path, fps=self.fps) as writer:
                while True:
                    tick = time.perf_counter()
                    frames = next(chunks, None)
                    if frames is None:
                        break
                    done = time.perf_counter()
                    writer.append(frames)
                    event = {"type": "chunk", "start_latent_frame": start_frame, "video_frames": len(frames),
                             "generate_s": round(done - tick, 4)}
                    if start_frame == 0:
                        event["ttff_s"] = round(done - stream.received, 4)
                    if start_frame in switched_at:
                        event["switch_s"] = round(done - switched_at[start_frame], 4)
                    stream.emit(event)
                    for frame in frames:
                        stream.emit(jpeg(frame, self.jpeg_quality))
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
        return {"type": "done", "reason": reason, "video_frames": frames_sent, "latent_frames": start_frame,
                "seconds": round(time.perf_counter() - began, 3), "video": f"/video/{token}.mp4"}
