"""The server's picture to start from and "continue": an uploaded picture makes the same video as
`inference.py --image_path`, a continued video is the pipeline's continuation of the latents it sent, every bad
upload is one error and nothing kept, and the page uploads a picture and shows it in a real headless Chromium."""
import io
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from reward_forcing.config import load_config
from reward_forcing.errors import run_cli
from reward_forcing.inference.cli import main as inference_main
from reward_forcing.inference.conditioning import Conditioning, VideoStart
from reward_forcing.serve.stream import encoded
from reward_forcing.video import export_to_video
from test_serve import A, B, LIMITS, Page, app, assets, browser, client, connected, page_server, receive_until  # noqa: F401


def picture_file(seed=0, size=(48, 80), image_format="PNG") -> bytes:
    """A smooth random picture [H, W] encoded as `image_format`."""
    coarse = (np.random.default_rng(seed).random((3, 3, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize(size[::-1], Image.Resampling.BILINEAR).save(buffer, format=image_format)
    return buffer.getvalue()


def upload(client, body: bytes):
    return client.post("/picture", content=body, headers={"content-type": "application/octet-stream"})


def frames_of(mp4_bytes):
    return iio.imread(mp4_bytes, extension=".mp4", plugin="FFMPEG")


def test_an_uploaded_picture_makes_the_video_inference_py_makes_from_it(assets, client, tmp_path):
    body = picture_file(1)
    (tmp_path / "start.png").write_bytes(body)
    (tmp_path / "p.txt").write_text(A + "\n")
    assert run_cli(inference_main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path",
                                    str(assets / "model.pt"), "--use_ema", "--data_path", str(tmp_path / "p.txt"),
                                    "--image_path", str(tmp_path / "start.png"), "--num_output_frames", "6",
                                    "--output_folder", str(tmp_path / "out")]) == 0
    seed = json.loads((tmp_path / "out" / "manifest.jsonl").read_text())["seed"]

    reply = upload(client, body)
    assert reply.status_code == 200
    token = reply.json()["picture"]
    fitted = Conditioning.from_config(load_config(assets / "tiny.yaml")).read_image(Image.open(io.BytesIO(body)))
    preview = client.get(reply.json()["preview"])
    assert preview.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(iio.imread(preview.content, extension=".png"), fitted)  # what the model gets
    with connected(client) as ws:
        ws.send_json({"type": "start", "prompt": A, "seed": seed, "frames": 6, "picture": token})
        events, frames = receive_until(ws, "done", "error")
    assert events[-1]["type"] == "done" and len(frames) == 21
    assert next(e for e in events if e["type"] == "started")["picture"] is True
    online = frames_of(client.get(events[-1]["video"]).content)
    np.testing.assert_array_equal(online, iio.imread(tmp_path / "out" / f"{A}-0.mp4", plugin="FFMPEG"))


def test_continue_goes_on_from_the_latent_frames_the_last_video_sent(app, client):
    pipeline = app.state.runner.pipeline
    with connected(client) as ws:
        ws.send_json({"type": "start", "prompt": A, "seed": 3, "frames": 6})
        first, first_frames = receive_until(ws, "done")
        ws.send_json({"type": "start", "prompt": B, "seed": 4, "frames": 3, "continue": True})
        second, new_frames = receive_until(ws, "done", "error")
    assert first[-1]["continuable"] and second[-1]["type"] == "done", second[-1]
    assert next(e for e in second if e["type"] == "started")["continues_from"] == 6
    assert [e["start_latent_frame"] for e in second if e["type"] == "chunk"] == [6]
    assert (second[-1]["video_frames"], second[-1]["latent_frames"]) == (12, 9) and len(new_frames) == 12

    context = pipeline.encode(A)
    sent = torch.cat(list(pipeline.generator.stream(context, 6, pipeline.latent_hw,
                                                    generator=torch.Generator().manual_seed(3))), dim=2)
    expected = np.concatenate(list(pipeline.frames(pipeline.encode(B), 3, 4,
                                                   start=VideoStart(prefix=sent, keep_prefix=True))))
    assert new_frames == [encoded(frame, "JPEG", quality=90) for frame in expected[21:]]  # serve.jpeg_quality
    offline = export_to_video(expected, app.state.video_folder / "expected.mp4")  # the whole video, as one mp4
    np.testing.assert_array_equal(frames_of(client.get(second[-1]["video"]).content), frames_of(offline.read_bytes()))


@pytest.mark.parametrize("body, status, message", [
    (b"\x89PNG" + b"\x00" * 300_000, 413, "larger than serve.max_image_bytes=200000"),
    (picture_file(2, image_format="BMP"), 400, "the picture is BMP; the formats taken are png, jpeg, webp"),
    (b"hello, not a picture", 400, "the picture is not an image"),
    (picture_file(3)[:200], 400, "cannot read image the picture"),
    (picture_file(4, size=(2, 3)), 400, "the picture is too small: 3x2"),
    (b"", 400, "the picture is not an image"),
])
def test_a_bad_upload_is_one_error_and_keeps_nothing(assets, tmp_path_factory, body, status, message):
    from fastapi.testclient import TestClient

    from reward_forcing.inference.pipeline import VideoPipeline
    from reward_forcing.serve.app import create_app

    cfg = load_config(assets / "tiny.yaml", [*LIMITS, "serve.max_image_bytes=200000"])
    app = create_app(VideoPipeline.from_config(cfg, assets / "model.pt", use_ema=True), cfg,
                     tmp_path_factory.mktemp("videos"))
    with TestClient(app) as client:
        reply = upload(client, body)
        assert reply.status_code == status and reply.json() == {"error": reply.json()["error"]}
        assert message in reply.json()["error"] and "\n" not in reply.json()["error"]
        assert not app.state.pictures._pictures


@pytest.mark.parametrize("start, message", [
    ({"picture": "0" * 32}, "start: no such picture (uploaded pictures are kept for a while only)"),
    ({"picture": "../etc/passwd"}, "start: picture must be the token POST /picture returned"),
    ({"continue": True}, "start: nothing to continue: this connection has made no video yet"),
    ({"continue": "yes"}, "start: continue must be true or false"),
    ({"continue": True, "picture": "0" * 32}, "not both"),
])
def test_a_bad_start_from_is_one_error_and_the_connection_carries_on(client, start, message):
    with connected(client) as ws:
        ws.send_json({"type": "start", "prompt": A, "frames": 3, **start})
        error = ws.receive_json()
        assert error["type"] == "error" and message in error["message"]
        ws.send_json({"type": "start", "prompt": A, "frames": 3})
        events, _ = receive_until(ws, "done")
    assert events[-1]["reason"] == "finished"


def test_page_uploads_a_picture_shows_it_then_starts_and_continues_from_it(page_server, browser, tmp_path):
    (tmp_path / "start.png").write_bytes(picture_file(5, size=(64, 96)))
    page = Page(browser, page_server)
    page.element("picture").send_keys(str(tmp_path / "start.png"))
    page.wait(lambda d: page.body("data-picture") == "shown")
    canvas = browser.execute_script(
        "const c = document.getElementById('view'); return Array.from(c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data);")
    shown = np.array(canvas, dtype=np.uint8).reshape(16, 32, 4)[..., :3]
    fitted = iio.imread(urlopen_bytes(page_server + "/picture/" + token_of(browser) + ".png"), extension=".png")
    np.testing.assert_array_equal(shown, fitted)  # the canvas holds the picture as the model gets it
    page.element("endless").click()
    page.element("frames").clear()
    page.element("frames").send_keys("3")
    page.element("start").click()
    page.wait(lambda d: page.body("data-state") == "done")
    assert page.element("continue").is_enabled()
    page.wait(lambda d: page.text("frames-shown") == "9")  # every frame of the first video played
    page.element("continue").click()
    page.wait(lambda d: page.body("data-state") == "done" and page.text("status").startswith("finished · 12 "))
    page.wait(lambda d: page.text("frames-shown") == "21")  # and the 12 continued ones after them
    video = frames_of(urlopen_bytes(page.element("download").get_attribute("href")))
    assert video.shape == (21, 16, 32, 3)  # the whole video: 9 frames from the picture, 12 continued


def urlopen_bytes(url):
    import urllib.request

    with urllib.request.urlopen(url) as response:
        return response.read()


def token_of(browser):
    return browser.execute_script("return state.picture;")


@pytest.mark.parametrize("override, message", [
    ("serve.image_types=[png,heic2]", "serve.image_types must name file formats PIL reads (png, jpeg, webp, ...), "
                                      "got ['png', 'heic2']"),
    ("serve.image_types=[]", "serve.image_types must name file formats PIL reads"),
    ("serve.max_image_bytes=0", "serve.max_image_bytes must be a whole number >= 1"),
    ("serve.keep_images=0", "serve.keep_images must be a whole number >= 1"),
])
def test_bad_picture_limits_are_one_line(assets, capsys, override, message):
    from reward_forcing.serve.cli import main as serve_main

    assert run_cli(serve_main, ["--config_path", str(assets / "tiny.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
