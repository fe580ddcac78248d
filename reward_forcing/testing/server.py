"""The streaming server for tests: in its own process (the real one on tiny assets, or the noise server of
reward_forcing/testing/noise_server.py at a large frame size), and the clients that talk to it: its websocket
(connected, receive_until) and its page in a Chromium driven by Selenium (Page)."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

# The server tests' limits (prompt length, queue, frames per stream): small enough for a test to reach each one
LIMITS = ["serve.max_prompt_chars=64", "serve.max_queue=1", "serve.max_frames=30"]
A, B = "a cat walks on the grass", "waves crash on a beach"


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


@contextmanager
def connected(client):
    """A websocket to the app of a fastapi TestClient, past its hello."""
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["type"] == "hello"
        yield ws


def receive_until(ws, *kinds):
    """Events up to and including the first of a type in `kinds`, and the JPEG frames received meanwhile."""
    events, frames = [], []
    while True:
        message = ws.receive()
        if message.get("bytes") is not None:
            frames.append(message["bytes"])
            continue
        events.append(json.loads(message["text"]))
        if events[-1]["type"] in kinds:
            return events, frames


class Page:
    """The server's page at `url` in a Selenium driver, loaded and idle."""

    def __init__(self, driver, url):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url = driver, url
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.1).until
        driver.get(url)
        self.wait(lambda d: self.text("status") == "idle")

    def element(self, id_):
        return self.driver.find_element("id", id_)

    def text(self, id_):
        return self.element(id_).text

    def body(self, attribute):
        return self.driver.find_element("tag name", "body").get_attribute(attribute)
