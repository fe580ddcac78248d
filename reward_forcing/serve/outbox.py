"""What waits to be sent to one client, held to a size in bytes.

The device makes frames at its own pace; a client that reads slower than that loses frames (counted, and told
in a `dropped` event before the next event), and one whose unsent events alone pass the limit has stopped
reading and is let go. Either way the server holds at most `max_bytes` for a client, whatever the frame size.
"""
import asyncio
import json
from collections import deque


class ClientStalled(Exception):
    """The client has stopped reading: its stream is stopped and the connection let go."""


class Outbox:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.unsent_bytes = 0
        self._messages: deque[tuple[str | bytes, int]] = deque()  # JSON text or a JPEG frame, and its size
        self._dropped = 0  # frames dropped since the last event
        self._failure: Exception | None = None
        self._changed = asyncio.Event()

    def put(self, event) -> None:
        """Queue an event (a dict) or a frame (bytes); on the event loop's thread. A failure (an event no
        client could decode, or the client not reading) is raised by the next `get`, never here: this runs as
        a loop callback, where an exception would only be logged."""
        if self._failure is not None:
            return
        try:
            if isinstance(event, bytes):
                self._put_frame(event)
            else:
                if self._dropped:
                    self._put_event({"type": "dropped", "video_frames": self._dropped})
                    self._dropped = 0
                self._put_event(event)
        except Exception as err:
            self._failure = err
        self._changed.set()

    async def get(self) -> str | bytes:
        """The next message to send: JSON text or a frame."""
        while not self._messages and self._failure is None:
            self._changed.clear()
            await self._changed.wait()
        if self._failure is not None:
            raise self._failure
        message, size = self._messages.popleft()
        self.unsent_bytes -= size
        return message

    def _put_frame(self, frame: bytes) -> None:
        if self.unsent_bytes + len(frame) > self.max_bytes:
            self._dropped += 1
        else:
            self._append(frame, len(frame))

    def _put_event(self, event: dict) -> None:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))  # raises UnicodeEncodeError for text that is not Unicode (a lone surrogate)
        if self.unsent_bytes + size > self.max_bytes:
            raise ClientStalled(f"{self.unsent_bytes + size} bytes of events wait unsent, more than "
                                f"serve.max_unsent_mib allows ({self.max_bytes} bytes)")
        self._append(text, size)

    def _append(self, message: str | bytes, size: int) -> None:
        self._messages.append((message, size))
        self.unsent_bytes += size
