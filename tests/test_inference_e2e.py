"""inference.py end to end on tiny random assets: frame counts, fps, names, manifest, resume, torchrun parity."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from reward_forcing.errors import run_cli
from reward_forcing.inference.cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_inference_assets):
    return write_inference_assets(tmp_path_factory.mktemp("tiny"))


def run(assets, out, *extra):
    return run_cli(main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
                          "--data_path", str(assets / "prompts.txt"), "--output_folder", str(out), *extra])


def read_video(path):
    return iio.imread(path, plugin="FFMPEG"), iio.immeta(path, plugin="FFMPEG")["fps"]


def videos(folder):
    return sorted(p.name for p in Path(folder).glob("*.mp4"))


@pytest.mark.parametrize("latent_frames", [21, 120])
def test_videos_have_1_plus_4_per_latent_frames_at_16_fps(assets, tmp_path, latent_frames):
    (assets / "one.txt").write_text("waves crash on a beach\n")
    out = tmp_path / "out"
    assert run_cli(main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
                          "--data_path", str(assets / "one.txt"), "--output_folder", str(out),
                          "--num_output_frames", str(latent_frames), "--use_ema"]) == 0
    frames, fps = read_video(out / "waves crash on a beach-0.mp4")
    assert frames.shape == (1 + 4 * (latent_frames - 1), 16, 32, 3) and fps == 16
    assert frames.std() > 1  # a random model still makes non-constant frames


def test_names_manifest_and_resume(assets, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="repeats"):
        assert run(assets, out, "--num_output_frames", "3", "--num_samples", "2", "--seed", "4") == 0
    slash = [n for n in videos(out) if n.startswith("rock%2Fpaper scissors~")]
    assert videos(out) == sorted(["a cat walks on the grass-0.mp4", "a cat walks on the grass-1.mp4",
                                  "waves crash on a beach-0.mp4", "waves crash on a beach-1.mp4", *slash])
    assert len(slash) == 2 and not any(p.name.startswith(".partial") for p in out.iterdir())
    assert "skipped 1 blank line(s)" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1), (3, 0), (3, 1)]
    assert all(r["video_frames"] == 9 and r["latent_frames"] == 3 and r["seconds"] == 9 / 16 for r in records)
    assert len({r["seed"] for r in records}) == 6
    saved = (out / "config.yaml").read_text()
    assert "num_samples: 2" in saved and "height: 16" in saved

    mtimes = {n: (out / n).stat().st_mtime_ns for n in videos(out)}
    with pytest.warns(UserWarning):
        assert run(assets, out, "--num_output_frames", "3", "--num_samples", "2", "--seed", "4") == 0
    assert {n: (out / n).stat().st_mtime_ns for n in videos(out)} == mtimes  # all skipped
    assert f"nothing to do: the 6 video(s) of this run are in {out}" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert run(assets, out, "--num_output_frames", "3", "--num_samples", "2", "--seed", "4", "--overwrite") == 0
    assert all((out / n).stat().st_mtime_ns != mtimes[n] for n in mtimes)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6  # compacted, not appended twice


@pytest.mark.filterwarnings("ignore:prompt 2 repeats")
@pytest.mark.parametrize("checkpoint, extra, message", [
    ("bad.pt", [], "cannot read"),
    ("model.pt", ["height=24"], "must be positive multiples of 16x16 pixels"),
    ("other.pt", [], "does not fit CausalWanModel"),
])
def test_bad_weights_or_size_are_one_line_and_write_nothing(assets, tmp_path, capsys, checkpoint, extra, message):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"generator": {"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    (tmp_path / "model.pt").symlink_to(assets / "model.pt")
    out = tmp_path / "out"
    assert run_cli(main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(tmp_path / checkpoint),
                          "--data_path", str(assets / "prompts.txt"), "--output_folder", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:prompt 2 repeats")
def test_torchrun_two_processes_match_one(assets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
            "--data_path", str(assets / "prompts.txt"), "--num_output_frames", "6"]
    assert run_cli(main, [*args, "--output_folder", str(tmp_path / "one")]) == 0  # one process, one thread
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "inference.py"), *args, "--output_folder", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    assert "on 2 process(es)" in double.stdout
    names = videos(tmp_path / "one")
    assert len(names) == 3 and videos(tmp_path / "two") == names
    for name in names:
        a, b = read_video(tmp_path / "one" / name)[0], read_video(tmp_path / "two" / name)[0]
        assert a.shape == (21, 16, 32, 3)
        np.testing.assert_array_equal(a, b)
    manifest = [(tmp_path / d / "manifest.jsonl").read_text() for d in ("one", "two")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "generation_seconds"} for line in m.splitlines()]
             for m in manifest]
    assert strip[0] == strip[1]


@pytest.mark.filterwarnings("ignore:prompt of 23 tokens is cut")  # the tiny text_len 16
def test_extended_prompts_generate_while_short_prompts_name(assets, tmp_path):
    (tmp_path / "short.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "ext.txt").write_text("a fluffy cat sleeping on a sofa\n\na dog running on a beach\n")
    common = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
              "--num_output_frames", "3"]
    assert run_cli(main, [*common, "--data_path", str(tmp_path / "short.txt"), "--extended_prompt_path",
                          str(tmp_path / "ext.txt"), "--output_folder", str(tmp_path / "ext")]) == 0
    assert videos(tmp_path / "ext") == ["a cat-0.mp4", "a dog-0.mp4"]
    records = [json.loads(line) for line in (tmp_path / "ext" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["extended_prompt"]) for r in records] == [
        ("a cat", "a fluffy cat sleeping on a sofa"), ("a dog", "a dog running on a beach")]
    # Same seeds, different text: the extended run differs from a run on the short prompts themselves.
    assert run_cli(main, [*common, "--data_path", str(tmp_path / "short.txt"), "--output_folder",
                          str(tmp_path / "short")]) == 0
    a, b = read_video(tmp_path / "ext" / "a cat-0.mp4")[0], read_video(tmp_path / "short" / "a cat-0.mp4")[0]
    assert np.abs(a.astype(int) - b).max() > 0
    seeds = [[json.loads(line)["seed"] for line in (tmp_path / d / "manifest.jsonl").read_text().splitlines()]
             for d in ("ext", "short")]
    assert seeds[0] == seeds[1] and seeds[0][0] != seeds[0][1]  # the --help text for --seed says so


def test_readme_tiny_demo(tmp_path, capsys):
    """The README's CPU demo: configs/tiny.yaml with scripts/make_tiny_checkpoints.py's released-layout files."""
    from reward_forcing.config import load_config
    from reward_forcing.testing.assets import write_tiny_checkpoint_dir

    config = REPO / "configs" / "tiny.yaml"
    checkpoints = tmp_path / "checkpoints" / "tiny"
    cfg = load_config(config)
    paths = write_tiny_checkpoint_dir(checkpoints, cfg)
    (tmp_path / "prompts.txt").write_text("a cat walks on the grass\n")
    assert run_cli(main, ["--config_path", str(config), "--checkpoint_path", str(paths["release"]), "--use_ema",
                          "--data_path", str(tmp_path / "prompts.txt"), "--output_folder", str(tmp_path / "videos"),
                          "--num_output_frames", "6", f"checkpoint_dir={checkpoints}"]) == 0
    frames, fps = read_video(tmp_path / "videos" / "a cat walks on the grass-0.mp4")
    assert frames.shape == (1 + 4 * 5, cfg.height, cfg.width, 3) and fps == 16
    captured = capsys.readouterr()
    assert captured.out.count("holds no separate EMA weights") == 1  # said once
    # Not a terminal: one plain line per prompt, no carriage-return redraws (chunk bars are for terminals).
    assert "\r" not in captured.err
    line = r"^prompts \(rank 0\): 1/1 prompt \(\d+\.\d s, \d+\.\d\d s/prompt\) fps=\d+\.\d\d$"
    assert re.search(line, captured.err, re.M)


def test_frames_are_yielded_chunk_by_chunk(assets):
    """Streaming, not decode-at-the-end: 1 + 4 + 4 frames for the first 3-latent chunk, then 12 per chunk."""
    from reward_forcing.config import load_config
    from reward_forcing.inference.pipeline import VideoPipeline

    cfg = load_config(assets / "tiny.yaml")
    pipeline = VideoPipeline.from_config(cfg, assets / "model.pt")
    context = pipeline.encode("a cat")
    sizes = []
    for frames in pipeline.frames(context, 12, seed=0):
        assert frames.dtype == np.uint8 and frames.shape[1:] == (16, 32, 3)
        sizes.append(len(frames))
    assert sizes == [9, 12, 12, 12]


def test_switch_prompts_file_makes_one_video_per_line(assets, tmp_path):
    segments = [{"prompt": "a cat walks on the grass", "latent_frames": 6},
                {"prompt": "waves crash on a beach", "latent_frames": 3}]
    (tmp_path / "switch.jsonl").write_text(json.dumps(segments) + "\n")
    (tmp_path / "first.txt").write_text("a cat walks on the grass\n")
    common = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"), "--seed", "2"]
    assert run_cli(main, [*common, "--switch_prompts", str(tmp_path / "switch.jsonl"),
                          "--output_folder", str(tmp_path / "switch")]) == 0
    assert run_cli(main, [*common, "--data_path", str(tmp_path / "first.txt"), "--num_output_frames", "9",
                          "--output_folder", str(tmp_path / "plain")]) == 0
    name = "a cat walks on the grass-0.mp4"
    assert videos(tmp_path / "switch") == [name]
    (record,) = [json.loads(line) for line in (tmp_path / "switch" / "manifest.jsonl").read_text().splitlines()]
    assert record["segments"] == [{**segments[0], "start_latent_frame": 0}, {**segments[1], "start_latent_frame": 6}]
    assert record["video_frames"] == 1 + 4 * 8 and record["latent_frames"] == 9
    assert record["prompt"] == "a cat walks on the grass"
    switched, plain = read_video(tmp_path / "switch" / name)[0], read_video(tmp_path / "plain" / name)[0]
    assert switched.shape == plain.shape == (33, 16, 32, 3)
    # latents 0..5 (pixel frames 0..20) precede the switch; the last chunk's 12 frames come from the new prompt
    np.testing.assert_array_equal(switched[:21], plain[:21])
    assert np.abs(switched[21:].astype(int) - plain[21:]).mean() > 1


def test_new_settings_never_skip_or_relabel_old_videos(assets, tmp_path, capsys):
    """Videos made with 3 latent frames are not reported as done for a 6-frame run, nor config.yaml rewritten."""
    (tmp_path / "one.txt").write_text("waves crash on a beach\n")
    common = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
              "--data_path", str(tmp_path / "one.txt"), "--output_folder", str(tmp_path / "out")]
    video = tmp_path / "out" / "waves crash on a beach-0.mp4"
    assert run_cli(main, [*common, "--num_output_frames", "3"]) == 0
    saved, mtime = (tmp_path / "out" / "config.yaml").read_text(), video.stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(main, [*common, "--num_output_frames", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (inference.num_output_frames 3 -> 6)" in err
    assert (tmp_path / "out" / "config.yaml").read_text() == saved and video.stat().st_mtime_ns == mtime
    assert run_cli(main, [*common, "--num_output_frames", "3", "--no-use_ema"]) == 2  # other weights: refused too
    assert "model.pt [generator_ema]' -> " in capsys.readouterr().err
    assert run_cli(main, [*common, "--num_output_frames", "6", "--overwrite"]) == 0
    assert read_video(video)[0].shape[0] == 1 + 4 * 5
    assert "num_output_frames: 6" in (video.parent / "config.yaml").read_text()


def test_partial_videos_of_killed_runs_are_removed(assets, tmp_path, capsys):
    from reward_forcing.video import Mp4Writer

    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # a run killed mid-video: the writer never closes
        writer = Mp4Writer(out / "waves crash on a beach-0.mp4", fps=16).__enter__()
        writer.append(np.zeros((2, 16, 32, 3), np.uint8))
        os._exit(0)
    os.waitpid(pid, 0)
    live = Mp4Writer(out / "a video being written by this live process-0.mp4", fps=16).tmp_path
    live.write_bytes(b"")
    for _ in range(100):  # the child's ffmpeg creates its output file asynchronously
        if len(list(out.glob(".partial-*"))) == 2:
            break
        time.sleep(0.05)
    assert len(list(out.glob(".partial-*"))) == 2
    (tmp_path / "one.txt").write_text("waves crash on a beach\n")
    assert run_cli(main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
                          "--data_path", str(tmp_path / "one.txt"), "--output_folder", str(out),
                          "--num_output_frames", "3"]) == 0
    assert list(out.glob(".partial-*")) == [live]
    assert "removed 1 partial video(s)" in capsys.readouterr().out


class NotLoaded(Exception):
    """Raised in place of loading the models."""


def refuse_to_load(*args, **kwargs):
    raise NotLoaded


def test_a_rerun_with_nothing_to_do_says_so_before_loading_any_model(assets, tmp_path, capsys, monkeypatch):
    from reward_forcing.inference import cli

    (tmp_path / "one.txt").write_text("waves crash on a beach\n")
    common = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
              "--data_path", str(tmp_path / "one.txt"), "--output_folder", str(tmp_path / "out")]
    assert run_cli(main, [*common, "--num_output_frames", "3", "--num_samples", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(cli.VideoPipeline, "from_config", refuse_to_load)
    for same in ([], ["--use_ema"], ["seed=0"]):  # --use_ema and seed 0 are the defaults
        assert run_cli(main, [*common, "--num_output_frames", "3", "--num_samples", "2", *same]) == 0
        assert capsys.readouterr().out == (f"nothing to do: the 2 video(s) of this run are in {tmp_path / 'out'}, "
                                           "made with these settings (--overwrite regenerates them)\n")
    for changed in (["--num_output_frames", "6"], ["--seed", "1"], ["--no-use_ema"], ["--overwrite"],
                    ["--num_samples", "3"], ["height=32"]):  # each needs the models: to refuse, or to generate
        with pytest.raises(NotLoaded):
            main([*common, "--num_output_frames", "3", "--num_samples", "2", *changed])


def to_old_manifest(folder):
    """Rewrite manifest.jsonl as it was before its counts named their unit (`frames` for video frames, segments
    with `frames` and `start_frame` in latent frames)."""
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        record["frames"] = record.pop("video_frames")
        del record["latent_frames"]
        for segment in record.get("segments", []):
            segment["frames"], segment["start_frame"] = segment.pop("latent_frames"), segment.pop("start_latent_frame")
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_an_output_folder_of_the_older_manifest_still_resumes(assets, tmp_path, capsys, monkeypatch):
    from reward_forcing.inference import cli

    segments = [{"prompt": "a cat walks on the grass", "frames": 3}, {"prompt": "waves crash", "frames": 3}]
    (tmp_path / "switch.jsonl").write_text(json.dumps(segments) + "\n")  # the older key, still read
    (tmp_path / "two.txt").write_text("a cat\nwaves crash on a beach\n")
    runs = {"switch": ["--switch_prompts", str(tmp_path / "switch.jsonl")],
            "plain": ["--data_path", str(tmp_path / "two.txt"), "--num_output_frames", "3"]}
    common = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt")]
    for name, args in runs.items():
        assert run_cli(main, [*common, *args, "--output_folder", str(tmp_path / name)]) == 0
        to_old_manifest(tmp_path / name)
    capsys.readouterr()
    monkeypatch.setattr(cli.VideoPipeline, "from_config", refuse_to_load)
    for name, args in runs.items():
        assert run_cli(main, [*common, *args, "--output_folder", str(tmp_path / name)]) == 0
        assert capsys.readouterr().out.startswith("nothing to do: ")
    monkeypatch.undo()
    (tmp_path / "two.txt").write_text("a cat\nwaves crash on a beach\na dog\n")  # one more video to make
    assert run_cli(main, [*common, *runs["plain"], "--output_folder", str(tmp_path / "plain")]) == 0
    assert "1 video(s) written, 2 skipped as existing" in capsys.readouterr().out
