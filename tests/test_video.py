import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from reward_forcing.video import (Mp4Writer, Prompt, PromptFileError, append_manifest, compact_manifest,
                                  read_manifest, read_prompts, to_uint8_frames, unique_by_stem, video_name,
                                  video_stem)

# The longest prompt of VBench's all_dimension.txt (210 characters) must keep its exact name.
VBENCH_LONGEST = ("A person is playing with a dog in a park. " * 5)[:210]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_blank_lines_are_skipped_and_counted(tmp_path):
    data = _write(tmp_path / "p.txt", "a cat\n\n  \nthe bund Shanghai, oil painting  \n\n")
    prompts, blank = read_prompts(data)
    assert [p.text for p in prompts] == ["a cat", "the bund Shanghai, oil painting"]
    assert [p.index for p in prompts] == [0, 1]
    assert blank == 2  # trailing blank lines are not counted as skipped prompts
    assert prompts[0].generation_text == "a cat"


def test_extended_prompts_pair_by_line(tmp_path):
    data = _write(tmp_path / "p.txt", "a cat\n\na dog\n")
    ext = _write(tmp_path / "e.txt", "a fluffy cat on a sofa\n\na dog running on a beach\n")
    prompts, blank = read_prompts(data, ext)
    assert blank == 1
    assert [(p.text, p.generation_text) for p in prompts] == [
        ("a cat", "a fluffy cat on a sofa"), ("a dog", "a dog running on a beach")]


@pytest.mark.parametrize("short, extended, message", [
    ("a\nb\n", "x\n", "has 1 lines but"),
    ("a\n\nb\n", "x\ny\nz\n", "line 2 is blank in only one"),
    ("\n \n", None, "contains no prompts"),
    ("", None, "contains no prompts"),
])
def test_bad_prompt_files(tmp_path, short, extended, message):
    data = _write(tmp_path / "p.txt", short)
    ext = _write(tmp_path / "e.txt", extended) if extended is not None else None
    with pytest.raises(PromptFileError, match=message) as info:
        read_prompts(data, ext)
    assert "\n" not in str(info.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match="prompt file not found"):
        read_prompts(tmp_path / "nope.txt")


@pytest.mark.parametrize("prompt", [
    "The bund Shanghai, oil painting", VBENCH_LONGEST, "a café in Zürich — 東京", "-leading dash", ".hidden?*:\"<>|",
])
def test_valid_prompts_name_their_file_exactly(tmp_path, prompt):
    assert video_stem(prompt, max_sample_index=4) == prompt
    (tmp_path / video_name(prompt, 4)).write_bytes(b"")  # the file system accepts it


def test_unsafe_prompts_get_capped_hashed_names(tmp_path):
    slash = video_stem("rock/paper scissors")
    assert slash.startswith("rock%2Fpaper scissors~") and "/" not in slash
    assert video_stem("a\0b").startswith("a%00b~")
    # A literal prompt spelling the escape must not collide with the escaped one.
    assert video_stem("rock%2Fpaper scissors") != slash
    long_a, long_b = "x" * 300 + " one", "x" * 300 + " two"
    multibyte = "東" * 120  # 360 bytes; the cut must not split a character
    names = {video_name(video_stem(p, 9), 9) for p in (long_a, long_b, multibyte)}
    assert len(names) == 3
    for name in names:
        assert len(name.encode("utf-8")) <= 255
        (tmp_path / name).write_bytes(b"")
    # A 251-byte prompt fits with "-0.mp4"? 251 + 6 = 257 > 255, so it is capped; 249 fits exactly.
    assert video_stem("y" * 249, 0) == "y" * 249
    assert video_stem("y" * 250, 0) != "y" * 250
    assert video_stem("y" * 249, 10) != "y" * 249  # "-10.mp4" is one byte longer


def test_repeated_prompts_are_generated_once_with_a_warning():
    prompts = [Prompt(0, "a"), Prompt(1, "b"), Prompt(2, "a")]
    with pytest.warns(UserWarning, match="prompt 2 repeats prompt 0"):
        kept = unique_by_stem(prompts, lambda p: video_stem(p.text))
    assert [p.index for p in kept] == [0, 1]


def test_uint8_conversion_is_the_closed_form():
    pixels = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0]).view(1, 1, 1, 5).expand(3, 2, 1, 5)
    frames = to_uint8_frames(pixels)
    assert frames.shape == (2, 1, 5, 3) and frames.dtype == np.uint8
    # (x + 1) * 127.5 rounded half to even: -1.5 clamps to 0; 0 -> 127.5 -> 128; 0.5 -> 191.25 -> 191.
    assert frames[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255]


def _gradient_frames(n, height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 3 + i * 8) % 256, (y * 4) % 256, np.full_like(x, 100 + i)], -1)
                     for i in range(n)]).astype(np.uint8)


def test_mp4_writer_appends_frames_and_renames_at_the_end(tmp_path):
    path = tmp_path / "out" / "a prompt-0.mp4"
    frames = _gradient_frames(9, 40, 72)  # not multiples of 16: must not be resized
    with Mp4Writer(path, fps=16) as writer:
        writer.append(frames[:1])
        assert not path.exists()  # nothing under the final name while frames are still coming
        writer.append(frames[1:])
    assert path.exists() and not writer.tmp_path.exists()
    back = iio.imread(path, plugin="FFMPEG")
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == 16
    assert back.shape == frames.shape
    assert np.abs(back.astype(float) - frames).mean() < 6  # H.264 is lossy; a wrong layout would be far off


def test_mp4_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "v-0.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path, fps=16) as writer:
            writer.append(_gradient_frames(2, 32, 32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_manifest_keeps_the_last_record_per_file_in_order(tmp_path):
    path = tmp_path / "manifest.jsonl"
    for index, sample, seed in [(1, 0, 10), (0, 1, 11), (0, 0, 12), (1, 0, 13)]:
        append_manifest(path, {"prompt_index": index, "sample": sample, "file": f"{index}-{sample}.mp4", "seed": seed})
    compact_manifest(path)
    records = read_manifest(path)
    assert [(r["file"], r["seed"]) for r in records] == [("0-0.mp4", 12), ("0-1.mp4", 11), ("1-0.mp4", 13)]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_mp4_writer_starts_ffmpeg_without_running_python_in_the_forked_child(tmp_path, monkeypatch):
    # The server writes mp4s from a worker thread; a preexec_fn (imageio-ffmpeg's default, os.setpgrp) runs Python
    # between fork and exec, where a lock another thread held at fork time can hang the child forever.
    import subprocess

    spawned = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        spawned.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    with Mp4Writer(tmp_path / "a.mp4", fps=8) as writer:
        writer.append(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert spawned and all(kwargs.get("preexec_fn") is None for kwargs in spawned)
    assert (tmp_path / "a.mp4").is_file()


# ---- export_to_video: the Python API's writer ----
def test_export_to_video_writes_an_array_or_streamed_chunks(tmp_path):
    from reward_forcing import export_to_video

    frames = _gradient_frames(9, 40, 72)
    assert export_to_video(frames, tmp_path / "whole.mp4") == tmp_path / "whole.mp4"
    assert export_to_video(iter([frames[:1], frames[1:5], frames[5:]]), tmp_path / "new" / "chunks.mp4", fps=8)
    whole, chunks = iio.imread(tmp_path / "whole.mp4", plugin="FFMPEG"), iio.imread(tmp_path / "new" / "chunks.mp4",
                                                                                    plugin="FFMPEG")
    assert iio.immeta(tmp_path / "whole.mp4", plugin="FFMPEG")["fps"] == 16
    assert iio.immeta(tmp_path / "new" / "chunks.mp4", plugin="FFMPEG")["fps"] == 8
    assert whole.shape == chunks.shape == frames.shape
    assert np.abs(whole.astype(float) - frames).mean() < 6  # H.264 is lossy; a wrong layout would be far off


def _failing_chunks(frames):
    yield frames
    raise RuntimeError("generation failed")


@pytest.mark.parametrize("frames, message", [
    (np.zeros((3, 32, 32, 3), np.float32), "frames must be uint8 arrays [frames, height, width, 3]"),
    (np.zeros((3, 32, 32), np.uint8), "frames must be uint8 arrays"),
    (np.zeros((3, 33, 32, 3), np.uint8), "H.264 needs an even frame height and width, got 33x32"),
    ([np.zeros((1, 32, 32, 3), np.uint8), np.zeros((4, 32, 48, 3), np.uint8)], "frames change size"),
    (np.zeros((0, 32, 32, 3), np.uint8), "no frames to write"),
])
def test_export_to_video_refuses_bad_frames_in_one_line_and_leaves_nothing(tmp_path, frames, message):
    from reward_forcing import export_to_video
    from reward_forcing.errors import UserError

    with pytest.raises(UserError) as err:
        export_to_video(frames, tmp_path / "v.mp4")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_export_to_video_keeps_the_old_file_when_generation_fails(tmp_path):
    from reward_forcing import export_to_video

    old = export_to_video(_gradient_frames(3, 32, 32), tmp_path / "v.mp4").read_bytes()
    with pytest.raises(RuntimeError, match="generation failed"):
        export_to_video(_failing_chunks(_gradient_frames(2, 32, 32)), tmp_path / "v.mp4")
    assert os.listdir(tmp_path) == ["v.mp4"] and (tmp_path / "v.mp4").read_bytes() == old
