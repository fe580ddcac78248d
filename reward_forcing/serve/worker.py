"""One device, one generation at a time: a thread runs streams in arrival order; the others wait and are told
their place (1 = next), and a full queue refuses newcomers."""
import threading
from collections import deque
from collections.abc import Callable

from reward_forcing.serve.protocol import ProtocolError


class DeviceWorker:
    def __init__(self, run: Callable, max_queue: int):
        self.run = run  # run(stream): generates one stream, returns when it is finished or cancelled
        self.max_queue = max_queue
        self.active = None
        self._waiting = deque()
        self._cond = threading.Condition()
        self._closed = True
        self._thread = None

    def start(self) -> None:
        """Begin taking streams (again, after close: an app's lifespan may run more than once)."""
        with self._cond:
            self._closed = False
        self._thread = threading.Thread(target=self._loop, name="device-worker", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            active = self.active
            self._cond.notify_all()
        for stream in waiting + ([active] if active is not None else []):
            stream.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, stream) -> None:
        """Queue `stream`; ProtocolError when the queue is full or the server is shutting down."""
        with self._cond:
            if self._closed:
                raise ProtocolError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise ProtocolError(f"the queue is full ({len(self._waiting)} streams waiting, "
                                    f"serve.max_queue={self.max_queue}); try again later")
            self._waiting.append(stream)
            self._announce()
            self._cond.notify_all()

    def withdraw(self, stream) -> None:
        """Drop a waiting stream (its client left); the ones behind it move up."""
        with self._cond:
            if stream in self._waiting:
                self._waiting.remove(stream)
                self._announce()

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _announce(self) -> None:
        for place, stream in enumerate(self._waiting, start=1):
            stream.emit({"type": "queued", "position": place, "busy": self.active is not None})

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self.active = self._waiting.popleft()
                self._announce()
            try:
                self.run(self.active)
            finally:
                with self._cond:
                    self.active = None
