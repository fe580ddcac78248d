"""The streaming server over a stand-in video source, for tests of how the server handles large frames (the model
is not under test there):

    python -m reward_forcing.testing.noise_server [key=value ...]    config overrides over the packaged defaults

Prints "serving on http://HOST:PORT" as `python -m reward_forcing.serve` does, and serves the same app
(reward_forcing.serve.app.create_app) the same way (reward_forcing.serve.cli.run_server).
"""
import sys
import tempfile

import numpy as np

from reward_forcing.config import load_config
from reward_forcing.serve.app import create_app
from reward_forcing.serve.cli import listen, run_server


class StaticNoiseVideo:
    """VideoPipeline's `encode` and `frames`, where each video is one frame of uniform noise (the JPEG's worst case:
    ~350 KB at 480x832, quality 90) repeated, in VideoPipeline.frames' chunks: 1 + 4 (c - 1) video frames for the
    first chunk of c latent frames, 4c after (the Wan VAE's 4x temporal stride)."""

    def __init__(self, cfg):
        self.height, self.width, self.chunk = int(cfg.height), int(cfg.width), int(cfg.num_frame_per_block)

    def encode(self, prompt):
        return prompt

    def frames(self, context, num_frames, seed, switch=None, start=None, on_latents=None):
        """`start` (a picture or a continued video) is not supported; no latents are made for on_latents."""
        if start is not None:
            raise ValueError("the noise server starts every video from noise")
        image = np.random.default_rng(seed).integers(0, 256, (1, self.height, self.width, 3), dtype=np.uint8)
        start = 0
        while num_frames is None or start < num_frames:
            if switch is not None:
                switch(start)
            yield image.repeat(1 + 4 * (self.chunk - 1) if start == 0 else 4 * self.chunk, axis=0)
            start += self.chunk


def main(overrides) -> None:
    cfg = load_config(None, overrides)
    sock = listen("127.0.0.1", 0)
    with sock, tempfile.TemporaryDirectory(prefix="reward-forcing-videos-") as videos:
        app = create_app(StaticNoiseVideo(cfg), cfg, videos)
        print("serving on http://{}:{}".format(*sock.getsockname()[:2]), flush=True)
        run_server(app, cfg, sock)


if __name__ == "__main__":
    main(sys.argv[1:])
