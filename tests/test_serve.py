"""The streaming server on tiny random assets: the websocket protocol, prompt switches (against the offline
--switch_prompts video), bad input, the queue, dropped clients, and the page in a real headless Chromium."""
import json
import shutil
import socket
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from reward_forcing.config import load_config
from reward_forcing.errors import run_cli
from reward_forcing.inference.cli import main as inference_main
from reward_forcing.inference.pipeline import VideoPipeline
from reward_forcing.serve.app import create_app
from reward_forcing.serve import protocol as serve_protocol
from reward_forcing.serve.protocol import Limits, ProtocolError, parse_message
from reward_forcing.serve.cli import main as serve_main
from reward_forcing.testing.server import serve_process

REPO = Path(__file__).resolve().parents[1]
LIMITS = ["serve.max_prompt_chars=64", "serve.max_queue=1", "serve.max_frames=30"]
A, B = "a cat walks on the grass", "waves crash on a beach"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_inference_assets):
    return write_inference_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def app(assets, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(assets / "tiny.yaml", LIMITS)
    pipeline = VideoPipeline.from_config(cfg, assets / "model.pt", use_ema=True)
    yield create_app(pipeline, cfg, tmp_path_factory.mktemp("videos"))
    torch.set_num_threads(threads)


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


@contextmanager
def connected(client):
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


def stream(client, **start):
    with connected(client) as ws:
        ws.send_json({"type": "start", **start})
        events, frames = receive_until(ws, "done", "error")
    assert events[-1]["type"] == "done", events[-1]
    return events, frames


def decode(jpeg):
    return iio.imread(jpeg, extension=".jpeg")


def test_a_switching_stream_equals_the_switch_prompts_video(assets, client, tmp_path):
    segments = [{"prompt": A, "frames": 6}, {"prompt": B, "frames": 3}]
    (tmp_path / "switch.jsonl").write_text(json.dumps(segments) + "\n")
    assert run_cli(inference_main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path",
                                    str(assets / "model.pt"), "--use_ema", "--switch_prompts",
                                    str(tmp_path / "switch.jsonl"), "--output_folder", str(tmp_path / "out")]) == 0
    seed = json.loads((tmp_path / "out" / "manifest.jsonl").read_text())["seed"]

    with connected(client) as ws:
        ws.send_json({"type": "start", "prompt": A, "seed": seed, "frames": 9})
        ws.send_json({"type": "switch", "prompt": B, "at_frame": 6})
        events, frames = receive_until(ws, "done")
    started = next(e for e in events if e["type"] == "started")
    assert seed >= 2**53 and started == {"type": "started", "seed": str(seed), "latent_frames": 9,
                                         "wait_s": started["wait_s"]}
    chunks = [e for e in events if e["type"] == "chunk"]
    assert [(c["start_latent_frame"], c["video_frames"]) for c in chunks] == [(0, 9), (3, 12), (6, 12)]
    assert len(frames) == 33 and decode(frames[0]).shape == (16, 32, 3)
    assert "ttff_s" in chunks[0] and "switch_s" in chunks[2] and all(c["generate_s"] > 0 for c in chunks)
    switched = [e for e in events if e["type"] == "switched"]
    assert switched == [{"type": "switched", "start_latent_frame": 6, "prompt": B}]
    assert events[-1]["reason"] == "finished" and events[-1]["video_frames"] == 33 and events[-1]["latent_frames"] == 9

    download = client.get(events[-1]["video"])
    assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
    online = iio.imread(download.content, extension=".mp4", plugin="FFMPEG")
    offline = iio.imread(tmp_path / "out" / f"{A}-0.mp4", plugin="FFMPEG")
    np.testing.assert_array_equal(online, offline)
    assert client.get("/video/" + "0" * 32 + ".mp4").status_code == 404
    assert client.get("/video/..%2F..%2Fetc%2Fpasswd.mp4").status_code == 404


def test_a_switch_changes_the_frames_from_its_chunk_on_only(client):
    _, plain = stream(client, prompt=A, seed=5, frames=9)
    _, again = stream(client, prompt=A, seed=5, frames=9)
    assert again == plain  # same seed, same JPEG bytes
    with connected(client) as ws:
        ws.send_json({"type": "start", "prompt": A, "seed": 5})  # until stopped
        ws.send_json({"type": "pause"})  # arrives while the first chunk is being made: pauses after it
        events, frames = receive_until(ws, "paused")
        paused = events[-1]["latent_frame"]  # the boundary where the video goes on: 3, or 6 when decoding overlaps
        assert paused in (3, 6)
        ws.send_json({"type": "switch", "prompt": B})  # while paused: applies at the paused boundary
        ws.send_json({"type": "resume"})
        events, more = receive_until(ws, "switched")
        assert events[-2:] == [{"type": "resumed", "latent_frame": paused},
                               {"type": "switched", "start_latent_frame": paused, "prompt": B}]
        frames += more
        while events[-1].get("start_latent_frame") != paused or events[-1]["type"] != "chunk":  # first switched chunk
            events, more = receive_until(ws, "chunk")
            frames += more
        ws.send_json({"type": "stop"})
        events, more = receive_until(ws, "done")
        frames += more
    before = 1 + 4 * (paused - 1)  # frames of latent frames [0, paused)
    assert events[-1]["reason"] == "stopped" and events[-1]["video_frames"] == len(frames) >= before + 12
    assert frames[:before] == plain[:before]
    assert all(a != b for a, b in zip(frames[before:before + 12], plain[before:before + 12]))


BAD = [
    ("{not json", "malformed JSON"),
    (b"\x00\x01", "messages must be JSON text, not binary"),
    ("[1, 2]", 'a JSON object with a "type"'),
    ('{"type": "dance"}', "unknown message type 'dance'"),
    ('{"type": "start", "prompt": "x", "colour": 1}', "start: unknown field(s) 'colour'"),
    ('{"type": "start", "prompt": "   "}', "start: prompt must be a non-empty string"),
    ('{"type": "start", "prompt": "' + "x" * 65 + '"}', "65 characters, more than serve.max_prompt_chars=64"),
    ('{"type": "start", "prompt": "x", "seed": -1}', "seed must be a whole number in [0, 2^63)"),
    ('{"type": "start", "prompt": "x", "seed": "-1"}', "seed must be a whole number in [0, 2^63)"),
    ('{"type": "start", "prompt": "x", "seed": "9223372036854775808"}', "got '9223372036854775808'"),  # 2^63
    ('{"type": "start", "prompt": "x", "seed": "12a"}', "as a JSON integer or a string of digits, got '12a'"),
    ('{"type": "start", "prompt": "x", "seed": 1.5}', "seed must be a whole number"),
    ('{"type": "start", "prompt": "x", "frames": 4}', "frames must be a positive multiple of the chunk"),
    ('{"type": "start", "prompt": "x", "frames": 33}', "more than serve.max_frames=30"),
    ('{"type": "switch", "prompt": "y"}', "switch: no stream is running on this connection"),
    ('{"type": "pause"}', "pause: no stream is running"),
]


def send(ws, message):
    ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message)


def test_bad_input_gets_one_error_each_and_the_server_serves_the_next_client(app, client):
    kept = set(app.state.video_folder.iterdir())
    with ExitStack() as cleanup:
        first_connection = cleanup.enter_context(ExitStack())
        first = first_connection.enter_context(connected(client))
        for message, fragment in BAD:
            send(first, message)
            error = first.receive_json()
            assert error["type"] == "error" and fragment in error["message"], (message, error)
        first.send_json({"type": "start", "prompt": A})  # until stopped: holds the device
        receive_until(first, "chunk")
        receive_until(first, "chunk")  # chunk [3, 6) has begun
        for message, fragment in [({"type": "start", "prompt": A}, "a stream is already running"),
                                  ({"type": "switch", "prompt": B, "at_frame": 3},
                                   "latent frame 3 is already generated")]:
            first.send_json(message)
            assert fragment in receive_until(first, "error")[0][-1]["message"]

        second = cleanup.enter_context(connected(client))
        second.send_json({"type": "start", "prompt": B, "frames": 3})
        assert second.receive_json() == {"type": "queued", "position": 1, "busy": True}
        with connected(client) as third:
            third.send_json({"type": "start", "prompt": B})
            assert "the queue is full (1 streams waiting, serve.max_queue=1)" in third.receive_json()["message"]

        first_connection.close()  # the first client drops mid-stream: the device goes to the second
        events, frames = receive_until(second, "done")
        assert [e["type"] for e in events[:2]] == ["started", "chunk"] and len(frames) == 9
    deadline = time.monotonic() + 10
    while app.state.worker.active is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.worker.active is None and app.state.worker.queue_length == 0
    new = set(app.state.video_folder.iterdir()) - kept
    # the second client's video only: the dropped stream left no file, partial or not
    assert [p.suffix for p in new] == [".mp4"] and not new.pop().name.startswith(".partial")


def test_a_seed_beyond_2_53_given_as_a_string_makes_the_same_frames_as_the_integer(client):
    seed = 2**62 + 1  # no float64 holds it: a JavaScript number would make it 2^62
    events, as_text = stream(client, prompt=A, seed=str(seed), frames=3)
    assert next(e for e in events if e["type"] == "started")["seed"] == str(seed)
    _, as_integer = stream(client, prompt=A, seed=seed, frames=3)
    _, rounded = stream(client, prompt=A, seed=2**62, frames=3)
    assert as_text == as_integer and as_text != rounded


def test_a_client_may_start_its_next_stream_as_soon_as_it_reads_done(client):
    with connected(client) as ws:
        for seed in range(8):
            ws.send_json({"type": "start", "prompt": A, "seed": seed, "frames": 3})
            events, frames = receive_until(ws, "done", "error")
            assert events[-1]["type"] == "done" and len(frames) == 9, events[-1]


def test_nesting_deeper_than_the_parser_goes_is_one_error_and_the_connection_carries_on(client):
    with connected(client) as ws:
        # 12 JSON characters per prompt character (serve.max_prompt_chars=64) + 1024: 1792 characters at most
        for text, fragment in [("[" * 100_000, "the message has 100000 characters, more than the 1792"),
                               ("[" * 1_500, "malformed JSON"), ('[{"a": ' * 250, "malformed JSON")]:
            send(ws, text)
            error = ws.receive_json()
            assert error["type"] == "error" and fragment in error["message"] and len(error["message"]) < 200
        ws.send_json({"type": "pause"})
        assert "pause: no stream is running" in ws.receive_json()["message"]


def test_parse_message_refuses_what_json_cannot_read_with_a_protocol_error():
    limits = Limits(max_prompt_chars=10_000, max_frames=30, chunk_frames=3)  # messages up to 121,024 characters
    digits = "3" * 5_000  # more digits than Python converts to an int (sys.int_info.default_max_str_digits)
    for text, message in [("[" * 100_000, "malformed JSON: nested too deeply"),
                          ('{"type": "start", "prompt": "x", "frames": ' + digits + "}",
                           "malformed JSON: a number with too many digits"),
                          ('{"type": "start", "prompt": "x", "seed": ' + digits + "}",
                           "malformed JSON: a number with too many digits")]:
        with pytest.raises(ProtocolError) as caught:
            parse_message(text, limits)
        assert str(caught.value) == message


def test_errors_repeat_at_most_a_few_dozen_characters_of_the_offending_value(client):
    long = "9" * 1_500
    cases = [({"type": "start", "prompt": "x", "seed": long}, "start: seed must be a whole number"),
             ({"type": "start", "prompt": "x", "frames": long}, "start: frames must be a positive multiple"),
             ({"type": "start", "prompt": "x", "frames": int(long)}, "more than serve.max_frames=30"),
             ({"type": "start", "prompt": "x", "frames": [1] * 500}, "got an array"),
             ({"type": long}, "unknown message type"),
             ({"type": "pause", long: 1}, "pause: unknown field(s)")]
    with connected(client) as ws:
        for message, fragment in cases:
            ws.send_json(message)
            error = ws.receive_json()["message"]
            assert fragment in error and len(error) < 200, (fragment, len(error))
            assert long not in error and ("characters)" in error or "an array" in error), error


SURROGATE_SWITCH = '{"type": "switch", "prompt": "a fox \\ud83d leaps"}'  # valid JSON, but half a UTF-16 pair


def test_a_prompt_with_a_lone_surrogate_is_refused_at_the_door(client):
    with connected(client) as ws:
        ws.send_text('{"type": "start", "prompt": "a fox \\ud83d leaps", "frames": 3}')
        ws.send_json({"type": "start", "prompt": A, "frames": 6})
        ws.send_text(SURROGATE_SWITCH)
        ws.send_json({"type": "dance"})
        events, frames = receive_until(ws, "done")
    errors = [e["message"] for e in events if e["type"] == "error"]
    assert len(errors) == 3 and "unknown message type 'dance'" in errors[2], errors
    for kind, error in zip(("start", "switch"), errors):
        assert error == f"{kind}: prompt holds a lone UTF-16 surrogate '\\ud83d' at character 6, which is not text " \
                        "(send the whole pair)"
    assert "switched" not in [e["type"] for e in events] and len(frames) == 21


def test_an_event_that_cannot_be_sent_ends_the_stream_with_an_error_and_frees_the_device(app, client, monkeypatch):
    """Whatever fails while sending a connection's events: the client is told, the device goes to the next."""
    monkeypatch.setattr(serve_protocol, "_lone_surrogate", lambda text: None)  # let the surrogate through the door
    with connected(client) as ws:
        ws.send_json({"type": "start", "prompt": A})  # until stopped
        receive_until(ws, "chunk")
        ws.send_text(SURROGATE_SWITCH)  # its `switched` event is not UTF-8 text
        events, _ = receive_until(ws, "error")
        assert "switched" not in [e["type"] for e in events]
        assert events[-1] == {"type": "error", "ends_stream": True,
                              "message": "internal error (UnicodeEncodeError); the stream is stopped"}
        assert ws.receive() == {"type": "websocket.close", "code": 1011, "reason": ""}
    deadline = time.monotonic() + 30  # the stream stops at its next chunk boundary
    while app.state.worker.active is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.worker.active is None, "the device still runs the stream of a connection that failed"
    _, frames = stream(client, prompt=B, frames=3)
    assert len(frames) == 9 and app.state.worker.queue_length == 0


def test_page_is_served_offline(client):
    page = client.get("/").text
    assert "<canvas" in page and 'src="/page.js"' in page
    for asset in ("/", "/page.js", "/page.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text  # no CDN: works without a network


@pytest.mark.parametrize("args, message", [
    (["not_a_key=1"], "unknown config key 'not_a_key'"),
    (["serve.max_queue=0"], "serve.max_queue must be a whole number >= 1"),
    (["serve.jpeg_quality=101"], "serve.jpeg_quality must be a whole number in [1, 95]"),
    (["serve.max_unsent_mib=0"], "serve.max_unsent_mib must be a whole number >= 1"),
    (["serve.stall_timeout_s=0.5"], "invalid value for 'serve.stall_timeout_s' in command-line overrides"),
    (["overlap_decode=maybe"], "invalid value for 'overlap_decode' in command-line overrides: Value 'maybe' is not "
                               "a valid bool"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--port", "x"], "invalid int value"),
    (["--checkpoint_path", "{d}/missing.pt"], "checkpoint not found"),
    (["--port", "{port}"], "cannot listen on 127.0.0.1:"),
])
def test_server_bad_arguments_are_one_line(assets, capsys, args, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--config_path", str(assets / "tiny.yaml")] + [a.format(d=assets, port=port) for a in args]
        assert run_cli(serve_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.fixture(scope="module")
def page_server(assets):
    with serve_process(assets) as url:
        yield url


@pytest.fixture
def browser():
    """Debian's chromium + chromium-driver (.ci/run installs them), driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "needs Debian's chromium and chromium-driver (apt-get install; .ci/run does it)"
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


class Page:
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


def test_page_streams_and_switches_in_headless_chromium(page_server, browser, tmp_path):
    page = Page(browser, page_server)
    page.element("start").click()
    page.wait(lambda d: int(page.text("frames-shown")) >= 9)
    painted = browser.execute_script(  # the canvas holds a decoded frame, not the blank initial canvas
        "const c = document.getElementById('view'); const d = c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data; let lit = 0; for (let i = 0; i < d.length; i += 4) lit += d[i + 3] > 0 && "
        "(d[i] + d[i + 1] + d[i + 2]) > 0; return lit / (d.length / 4);")
    assert painted > 0.9
    page.element("switch").click()
    page.wait(lambda d: page.body("data-switches") == "1")
    shown = int(page.text("frames-shown"))
    page.wait(lambda d: int(page.text("frames-shown")) >= shown + 12)  # frames keep coming after the switch
    assert page.text("fps") != "–" and page.text("ttff").endswith(" s")
    assert page.text("message").startswith("switched at latent frame ")
    browser.save_screenshot(str(tmp_path / "page.png"))
    page.element("stop").click()
    page.wait(lambda d: page.body("data-state") == "done")
    assert page.element("download").get_attribute("href").endswith(".mp4")
    assert (tmp_path / "page.png").stat().st_size > 10_000


def mp4_frames(url):
    with urllib.request.urlopen(url) as response:
        return iio.imread(response.read(), extension=".mp4", plugin="FFMPEG")


def client_video(url, prompt, seed, frames):
    """The mp4 a plain websocket client gets for this start message."""
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws", 1) + "/ws", max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "prompt": prompt, "seed": seed, "frames": frames}))
        while not isinstance(message := ws.recv(timeout=60), str) or json.loads(message)["type"] != "done":
            pass
    return mp4_frames(url + json.loads(message)["video"])


@pytest.mark.parametrize("typed", ["6010975578069905001", ""])  # above 2^53 (no float64 holds it); the server's pick
def test_the_seed_the_page_shows_regenerates_its_video(page_server, browser, typed):
    page = Page(browser, page_server)
    page.element("seed").send_keys(typed)
    page.element("endless").click()
    page.element("frames").clear()
    page.element("frames").send_keys("6")
    page.element("start").click()
    page.wait(lambda d: page.body("data-state") == "done")
    seed = page.text("seed-used")
    assert seed == typed if typed else seed.isdigit()
    on_page = mp4_frames(page.element("download").get_attribute("href"))
    again = client_video(page_server, page.element("prompt").get_attribute("value"), seed, 6)
    assert on_page.shape == (21, 16, 32, 3)
    np.testing.assert_array_equal(on_page, again)
    # 6 latent frames are 1 + 4 * (6 - 1) = 21 video frames (the VAE's 4x temporal stride)
    assert page.text("status") == "finished · 21 video frames (6 latent frames)"
    assert page.element("frames-shown-label").get_attribute("textContent") == "Video frames"
    page.wait(lambda d: page.text("frames-shown") == "21")  # played at the video's frame rate
