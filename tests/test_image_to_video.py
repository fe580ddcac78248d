"""Image-to-video and video continuation through VideoPipeline and inference.py on tiny random models: frame 0 is the
autoencoder's round trip of the fitted picture, pixels outside the crop do not matter, a continuation's frames
go on from its prefix's decoder state, the API and the CLI make the same frames, JSONL conditioning and its
provenance, and every bad input is one line with nothing written."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reward_forcing import VideoPipeline
from reward_forcing.config import load_config
from reward_forcing.errors import UserError, run_cli
from reward_forcing.inference import cli
from reward_forcing.inference.conditioning import Conditioning, VideoStart
from reward_forcing.testing.assets import TINY_TAEHV_WIDTHS, TINY_WAN_CONFIG, write_taehv
from reward_forcing.video import export_to_video
from test_python_api import tiny_dir  # noqa: F401  (the fixture: checkpoints/tiny as generation reads it)

# configs/tiny.yaml's VAE (z_dim 16, so the latents carry Wan's per-channel mean/std) at its smallest frame size
SIZE = ["height=16", "width=32"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """checkpoints/tiny (configs/tiny.yaml's sizes; the base folder's weights are the student's) and a TAEHV."""
    root = tiny_dir / "checkpoints" / "tiny"
    write_taehv(root / "taew2_1.pth", TINY_WAN_CONFIG["in_dim"], seed=0, **TINY_TAEHV_WIDTHS)
    return root


def config(tiny, *overrides):
    return load_config("tiny", [f"checkpoint_dir={tiny}", *SIZE, *overrides])


@pytest.fixture(scope="module")
def pipe(tiny):
    return VideoPipeline.from_config(config(tiny), device="cpu")


def picture(seed, size=(64, 64)) -> np.ndarray:
    """A smooth random picture (uint8 [H, W, 3]), so that a resize of it is not noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4, 3)) * 255
    return np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(size[::-1], Image.Resampling.BILINEAR))


def save_png(array, path):
    Image.fromarray(array).save(path)
    return path


def test_fitting_is_a_centred_crop_then_a_bicubic_resize(tiny):
    fit = Conditioning.from_config(config(tiny))
    wide, tall = picture(1, (40, 100)), picture(2, (90, 30))  # [H, W]: wider and narrower than 2:1
    # hand-worked boxes: 100x40 -> the middle 80x40 columns 10..90; 30x90 -> the middle 30x15 rows 37..52
    expected_wide = Image.fromarray(wide).crop((10, 0, 90, 40)).resize((32, 16), Image.Resampling.BICUBIC)
    expected_tall = Image.fromarray(tall).crop((0, 37, 30, 52)).resize((32, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(fit.read_image(wide), np.asarray(expected_wide))
    np.testing.assert_array_equal(fit.read_image(Image.fromarray(tall)), np.asarray(expected_tall))


def round_trip(vae, frame: np.ndarray) -> np.ndarray:
    """diffusers' own encode (posterior mode) and decode of one frame, as uint8."""
    pixels = torch.from_numpy(frame.copy()).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return ((decoded[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def test_frame_0_is_the_vae_round_trip_of_the_picture(pipe):
    image = picture(3)
    video = pipe("a red fox", num_frames=3, seed=1, image=image)
    assert video.shape == (9, 16, 32, 3)
    fitted = pipe.conditioning.read_image(image)
    expected = round_trip(pipe.decoder.vae, fitted)
    assert np.abs(video[0].astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(expected.astype(int) - fitted.astype(int)).max() > 10  # a random VAE's round trip is far off


def test_frame_0_is_taehvs_round_trip_with_the_taehv_decoder(tiny):
    pipe = VideoPipeline.from_config(config(tiny, "decoder=taehv", f"taehv_path={tiny / 'taew2_1.pth'}"))
    image = picture(4)
    video = pipe("a red fox", num_frames=3, seed=1, image=image)
    fitted = torch.tensor(pipe.conditioning.read_image(image)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    decoded = pipe.decoder.decode(pipe.decoder.encode(fitted))  # upstream's end padding: the same for one frame
    expected = ((decoded[0, :, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(video[0].astype(int) - expected.astype(int)).max() <= 1


def test_later_frames_follow_the_picture_but_not_pixels_outside_its_crop(pipe):
    image = picture(5)  # 64x64 for a 2:1 frame: rows 16..47 are kept
    outside, inside = image.copy(), image.copy()
    outside[3, 40] = 255 - outside[3, 40]
    inside[30, 40] = 255 - inside[30, 40]
    frames = {name: pipe("a red fox", num_frames=6, seed=2, image=array)
              for name, array in (("image", image), ("outside", outside), ("inside", inside))}
    np.testing.assert_array_equal(frames["outside"], frames["image"])
    assert not np.array_equal(frames["inside"][1:], frames["image"][1:])
    other = pipe("a red fox", num_frames=6, seed=2, image=picture(6))
    assert all(not np.array_equal(a, b) for a, b in zip(other[1:], frames["image"][1:]))


def test_a_continuation_goes_on_from_the_decoder_state_of_its_prefix(pipe):
    context = pipe.encode("waves on a beach")
    hw = pipe.latent_hw
    prefix = torch.cat(list(pipe.generator.stream(context, 6, hw, generator=torch.Generator().manual_seed(0))), 2)
    new = torch.cat(list(pipe.generator.stream(context, 3, hw, generator=torch.Generator().manual_seed(7),
                                               prefix=prefix)), 2)
    whole = pipe.decoder.decode(torch.cat([prefix, new], 2))[0]
    whole = ((whole + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    for overlap in (False, True):
        pipe.overlap = overlap
        only_new = np.concatenate(list(pipe.frames(context, 3, 7, start=VideoStart(prefix=prefix))))
        kept = np.concatenate(list(pipe.frames(context, 3, 7, start=VideoStart(prefix=prefix, keep_prefix=True))))
        np.testing.assert_array_equal(only_new, whole[21:])  # 6 latents -> 21 frames, then 4 per new latent
        np.testing.assert_array_equal(kept, whole)
    pipe.overlap = True


def test_a_video_is_cut_to_its_last_whole_chunks_and_resampled_to_fps(pipe, tmp_path):
    fit = pipe.conditioning
    levels = np.arange(30) * 8  # frame i is a flat grey of level 8i
    frames = np.repeat(levels.astype(np.uint8)[:, None, None, None], 16, 1).repeat(32, 2).repeat(3, 3)
    kept = fit.read_video(frames)  # 30 frames -> 8 latents -> 6 (two chunks) -> the last 21 frames
    np.testing.assert_array_equal(kept[:, 0, 0, 0], levels[9:])
    # at 16 fps a 32 fps video shows every other frame, an 8 fps one each frame twice (the frame on screen)
    for fps, expected, kept in ((32, levels[::2], 9), (8, np.repeat(levels, 2), 57)):  # 15 -> 4 latents -> 3 kept,
        export_to_video(frames, tmp_path / f"{fps}.mp4", fps=fps)                      # 60 -> 15 latents, all kept
        grey = fit.read_video(tmp_path / f"{fps}.mp4")[:, 8, 16, 0].astype(int)
        want = expected[-kept:]
        assert len(grey) == len(want) and np.abs(grey - want).max() <= 4  # H.264 keeps flat greys within 4


def recording_writer(frames_seen: list):
    """inference.py's mp4 writer, also keeping every chunk of frames it is given in `frames_seen`."""
    class RecordingWriter(cli.Mp4Writer):
        def append(self, frames):
            frames_seen.append(frames.copy())
            super().append(frames)

    return RecordingWriter


def test_the_api_and_inference_py_make_the_same_frames(tiny, tmp_path, monkeypatch):
    frames_seen = []
    RecordingWriter = recording_writer(frames_seen)
    image = save_png(picture(7), tmp_path / "start.png")
    clip = export_to_video(VideoPipeline.from_config(config(tiny))("a cat", num_frames=3, seed=0), tmp_path / "c.mp4")
    (tmp_path / "p.txt").write_text("a red fox running\n")
    monkeypatch.setattr(cli, "Mp4Writer", RecordingWriter)
    pipe = VideoPipeline.from_config(config(tiny), device="cpu")
    for flag, path, argument in (("--image_path", image, "image"), ("--extend_video", clip, "video")):
        frames_seen.clear()
        out = tmp_path / argument
        assert run_cli(cli.main, ["--config_path", "tiny", f"checkpoint_dir={tiny}", *SIZE, "--data_path",
                                  str(tmp_path / "p.txt"), "--output_folder", str(out), "--num_output_frames", "3",
                                  flag, str(path)]) == 0
        record = json.loads((out / "manifest.jsonl").read_text())
        video = pipe("a red fox running", num_frames=3, seed=record["seed"], **{argument: path})
        np.testing.assert_array_equal(np.concatenate(frames_seen), video)
        assert record["video_frames"] == len(video) == (9 if argument == "image" else 12)


def test_a_switch_prompts_video_starts_from_the_picture_and_switches_after_it(tiny, tmp_path, monkeypatch, pipe):
    frames_seen = []
    monkeypatch.setattr(cli, "Mp4Writer", recording_writer(frames_seen))
    image = save_png(picture(15), tmp_path / "start.png")
    segments = [{"prompt": "a red fox", "latent_frames": 3}, {"prompt": "the fox jumps", "latent_frames": 3}]
    (tmp_path / "s.jsonl").write_text(json.dumps(segments) + "\n")
    out = tmp_path / "out"
    assert run_cli(cli.main, ["--config_path", "tiny", f"checkpoint_dir={tiny}", *SIZE, "--switch_prompts",
                              str(tmp_path / "s.jsonl"), "--image_path", str(image), "--output_folder", str(out)]) == 0
    record = json.loads((out / "manifest.jsonl").read_text())
    assert record["conditioning"]["kind"] == "image" and len(record["segments"]) == 2
    unswitched = pipe("a red fox", num_frames=6, seed=record["seed"], image=image)
    np.testing.assert_array_equal(frames_seen[0], unswitched[:9])  # chunk 0: the picture's start, first prompt
    assert not np.array_equal(frames_seen[1], unswitched[9:])  # then the second prompt takes over


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class NotLoaded(Exception):
    """Raised in place of loading the models."""


def test_jsonl_conditioning_and_its_provenance(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "pics").mkdir()
    save_png(picture(8), tmp_path / "pics" / "fox.png")
    export_to_video(np.repeat(picture(9)[None], 13, 0)[:, :32, :], tmp_path / "pics" / "clip.mp4")
    lines = [{"prompt": "a fox", "image": "pics/fox.png"}, {"prompt": "a river", "video": "pics/clip.mp4"},
             {"prompt": "a plain start"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["--config_path", "tiny", f"checkpoint_dir={tiny}", *SIZE, "--data_path", str(tmp_path / "p.jsonl"),
            "--output_folder", str(tmp_path / "out"), "--num_output_frames", "3"]
    assert run_cli(cli.main, args) == 0
    records = {r["prompt"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert records["a fox"]["conditioning"] == {"kind": "image", "file": str(tmp_path / "pics" / "fox.png"),
                                                "sha256": sha256(tmp_path / "pics" / "fox.png")}
    # 13 frames = 4 latents -> one whole chunk (3 latents, the last 9 frames); 3 new latents -> 12 frames
    assert records["a river"]["conditioning"] == {"kind": "video", "file": str(tmp_path / "pics" / "clip.mp4"),
                                                  "sha256": sha256(tmp_path / "pics" / "clip.mp4"),
                                                  "prefix_latent_frames": 3, "keep_prefix": False}
    assert records["a river"]["video_frames"] == 12 and records["a fox"]["video_frames"] == 9
    assert "conditioning" not in records["a plain start"]
    capsys.readouterr()

    def refuse_to_load(*args, **kwargs):
        raise NotLoaded

    with monkeypatch.context() as patch:
        patch.setattr(cli.VideoPipeline, "from_config", refuse_to_load)
        assert run_cli(cli.main, args) == 0  # the same files: nothing to do, decided before loading
        assert capsys.readouterr().out.startswith("nothing to do: the 3 video(s)")
        with pytest.raises(NotLoaded):  # another output for the continuation: its videos must be remade
            cli.main([*args, "--keep_prefix"])
    save_png(picture(10), tmp_path / "pics" / "fox.png")  # the same name, another picture
    assert run_cli(cli.main, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a fox-0.mp4 was made with other settings (sha256" in err
    assert run_cli(cli.main, [*args, "--overwrite"]) == 0
    record = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()][0]
    assert record["conditioning"]["sha256"] == sha256(tmp_path / "pics" / "fox.png")


def write_bad_inputs(folder):
    save_png(picture(11), folder / "ok.png")
    (folder / "text.png").write_text("not a picture at all\n")
    data = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(data[:len(data) // 2])
    save_png(picture(12, (3, 5)), folder / "tiny.png")
    export_to_video(np.repeat(picture(13)[None, :32], 5, 0), folder / "short.mp4")  # 5 frames: 2 latents
    (folder / "text.mp4").write_text("not a video\n")
    (folder / "later.jsonl").write_text('{"prompt": "a", "image": "ok.png"}\n{"prompt": "b"}\n'
                                        '{"prompt": "c", "image": "gone.png"}\n')
    (folder / "both.jsonl").write_text('{"prompt": "a", "image": "ok.png", "video": "short.mp4"}\n')
    (folder / "keys.jsonl").write_text('{"prompt": "a", "picture": "ok.png"}\n')
    (folder / "clash.jsonl").write_text('{"prompt": "a", "image": "ok.png"}\n{"prompt": "a", "image": "tiny.png"}\n')
    (folder / "p.txt").write_text("a cat\n")


BAD_INPUTS = [
    (["--image_path", "{d}/text.png"], "text.png is not an image (PIL cannot read its format)"),
    (["--image_path", "{d}/cut.png"], "--image_path: cannot read image {d}/cut.png: image file is truncated"),
    (["--image_path", "{d}/ok.png", "conditioning.max_pixels=4000"],
     "ok.png is 64x64 = 4096 pixels, more than conditioning.max_pixels=4000"),
    (["--image_path", "{d}/tiny.png"], "tiny.png is too small: 5x3, its centred crop would be enlarged 6.4x to "
                                       "32x16, more than conditioning.max_upscale=4"),
    (["--image_path", "{d}/gone.png"], "--image_path: image not found: {d}/gone.png"),
    (["--extend_video", "{d}/short.mp4"], "short.mp4 is shorter than one chunk: 5 frames at 16 fps; continuing "
                                          "needs at least 9"),
    (["--extend_video", "{d}/text.mp4"], "--extend_video: cannot read video {d}/text.mp4"),
    (["--image_path", "{d}/ok.png", "--extend_video", "{d}/short.mp4"], "give at most one of --image_path"),
    (["--data_path", "{d}/later.jsonl"], "later.jsonl line 3: image not found: {d}/gone.png"),
    (["--data_path", "{d}/both.jsonl"], "both.jsonl line 1: a video starts from an image or continues a video"),
    (["--data_path", "{d}/keys.jsonl"], 'keys.jsonl line 1: expected an object with a "prompt"'),
    (["--data_path", "{d}/clash.jsonl"], "prompts 0 and 1 would both be named 'a' but start from different files"),
    (["--i2v"], "--i2v is not supported: give --image_path FILE"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch, args, message):
    write_bad_inputs(tmp_path)
    monkeypatch.setattr(cli.VideoPipeline, "from_config", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = [a.format(d=tmp_path) for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]  # key=value overrides are one group of positional arguments
    data = [] if "--data_path" in argv else ["--data_path", str(tmp_path / "p.txt")]
    out = tmp_path / "out"
    assert run_cli(cli.main, ["--config_path", "tiny", f"checkpoint_dir={tiny}", *SIZE, *overrides, *data,
                              "--output_folder", str(out), "--num_output_frames", "3", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(d=tmp_path) in err
    assert not out.exists()


def test_bad_api_inputs_are_one_line_user_errors(pipe, tmp_path):
    write_bad_inputs(tmp_path)
    cases = [
        (dict(image=42), "image must be a file path, a PIL image or a uint8 array [H, W, 3], got int"),
        (dict(image=np.zeros((8, 8, 3), np.float32)), "got float32 array [8, 8, 3]"),
        (dict(video=np.zeros((5, 16, 32, 3), np.uint8)), "the video is shorter than one chunk: 5 frames"),
        (dict(image=tmp_path / "ok.png", video=tmp_path / "short.mp4"), "not both"),
        (dict(image=tmp_path / "ok.png", keep_prefix=True), "keep_prefix repeats the video"),
        (dict(image=str(tmp_path / "cut.png")), "image file is truncated"),
    ]
    for arguments, message in cases:
        with pytest.raises(UserError) as err:
            pipe("a cat", num_frames=3, **arguments)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_streams_with_a_start_match_with_and_without_decode_overlap(pipe):
    image = picture(14)
    clip = pipe("a dog", num_frames=3, seed=0)
    runs = {}
    for overlap in (False, True):
        pipe.overlap = overlap
        runs[overlap] = (pipe("a dog", num_frames=6, seed=3, image=image),
                         pipe("a dog", num_frames=3, seed=3, video=clip, keep_prefix=True))
    pipe.overlap = True
    for a, b in zip(runs[False], runs[True]):
        np.testing.assert_array_equal(a, b)
    assert len(runs[True][1]) == 21  # 9 frames of the prefix (as decoded), then 12 new ones
