"""Pictures uploaded to start a stream from (POST /picture), fitted to the video's size as inference.py fits one
(reward_forcing/inference/conditioning.py) and kept in memory under random tokens, the newest `keep` of them; a
start message names one by its token, so nothing a client sends becomes a path or reaches the model unchecked."""
import threading
import uuid
from collections import OrderedDict

import numpy as np

from reward_forcing.serve.videos import TOKEN


class PictureStore:
    def __init__(self, keep: int):
        self.keep = keep
        self._pictures: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, picture: np.ndarray) -> str:
        """Keep a fitted picture (uint8 [H, W, 3]); returns its token. The oldest beyond `keep` is dropped."""
        token = uuid.uuid4().hex
        with self._lock:
            self._pictures[token] = picture
            while len(self._pictures) > self.keep:
                self._pictures.popitem(last=False)
        return token

    def get(self, token: str) -> np.ndarray | None:
        if not TOKEN.fullmatch(token):
            return None
        with self._lock:
            return self._pictures.get(token)
