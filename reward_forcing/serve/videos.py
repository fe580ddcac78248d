"""Finished streams as mp4 files for download, in a folder the server owns.

Files are named by random tokens the server makes; a client only ever names a token, which is looked up,
so nothing a client sends becomes a path. The oldest videos beyond `keep` are deleted.
"""
import re
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

TOKEN = re.compile(r"[0-9a-f]{32}")


class VideoStore:
    def __init__(self, folder, keep: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._videos: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def new_video(self) -> tuple[str, Path]:
        """A fresh token and the path its mp4 will be written to (see reward_forcing.video.Mp4Writer)."""
        token = uuid.uuid4().hex
        return token, self.folder / f"{token}.mp4"

    def add(self, token: str, path: Path) -> None:
        with self._lock:
            self._videos[token] = path
            while len(self._videos) > self.keep:
                _, old = self._videos.popitem(last=False)
                old.unlink(missing_ok=True)

    def path(self, token: str) -> Path | None:
        if not TOKEN.fullmatch(token):
            return None
        with self._lock:
            return self._videos.get(token)
