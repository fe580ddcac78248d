"""The streaming server in its own process, for tests: the real one on tiny assets, or the noise server
(reward_forcing/testing/noise_server.py) at a large frame size."""
import os
import subprocess
import sys
from contextlib import contextmanager


@contextmanager
def serve_process(assets, *overrides, stderr=None):
    """`python -m reward_forcing.serve` on the tiny assets (write_inference_assets) on a free loopback port; yields
    its address."""
    server = subprocess.Popen([sys.executable, "-m", "reward_forcing.serve", "--config_path", str(assets / "tiny.yaml"),
                               "--checkpoint_path", str(assets / "model.pt"), "--use_ema", "--port", "0", *overrides],
                              stdout=subprocess.PIPE, stderr=stderr, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = server.stdout.readline().split()[2]
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        server.terminate()
        server.wait(30)
