"""The public Python API: `from reward_forcing import VideoPipeline`, the README example, the same frames as
inference.py for the manifest's seed, and checkpoint_dir resolution."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reward_forcing import VideoPipeline
from reward_forcing.config import load_config
from reward_forcing.errors import CheckpointError, ConfigError, run_cli
from reward_forcing.inference import cli
from reward_forcing.testing.assets import (RELEASE_FILE, RELEASE_FOLDER, TINY_WAN_CONFIG, random_wan_state_dict,
                                           write_t5, write_tokenizer, write_vae, write_wan_folder)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """checkpoints/tiny as scripts/make_tiny_checkpoints.py lays it out, limited to what generation reads."""
    root = tmp_path_factory.mktemp("api")
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    out = root / "checkpoints" / "tiny"
    base = write_wan_folder(out / cfg.model_name, TINY_WAN_CONFIG, random_wan_state_dict(TINY_WAN_CONFIG, 0))
    write_tokenizer(base, cfg.text_encoder.vocab_size)
    write_t5(base / "models_t5_umt5-xxl-enc-bf16.pth", cfg.text_encoder, 0)
    write_vae(base / "Wan2.1_VAE.pth", cfg.vae, 0)
    (out / RELEASE_FOLDER).mkdir()
    torch.save({f"model.{k}": v for k, v in random_wan_state_dict(TINY_WAN_CONFIG, 2).items()},
               out / RELEASE_FOLDER / RELEASE_FILE)
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"## Python\n.*?```python\n(.*?)```", text, re.S).group(1)


class RecordingWriter(cli.Mp4Writer):
    """inference.py's writer, keeping the frames it is given."""
    frames_seen = []

    def append(self, frames):
        RecordingWriter.frames_seen.append(frames.copy())
        super().append(frames)


def test_readme_example_remakes_the_demo_video_from_its_manifest(tiny_dir, tmp_path, monkeypatch, capsys):
    """The README's CPU demo (inference.py, run from a folder without configs/, so the preset is found by name),
    then its Python example: the same frames from the manifest's record, saved by export_to_video."""
    import imageio.v3 as iio

    (tmp_path / "checkpoints").symlink_to(tiny_dir / "checkpoints")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "demo.txt").write_text("A red fox trots across a snowy meadow at sunrise.\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "Mp4Writer", RecordingWriter)
    RecordingWriter.frames_seen = []
    assert run_cli(cli.main, ["--config_path", "configs/tiny.yaml", "--checkpoint_path",
                              "checkpoints/tiny/Reward-Forcing-T2V-1.3B/rewardforcing.pt", "--data_path",
                              "prompts/demo.txt", "--output_folder", "videos/tiny", "--num_output_frames", "6"]) == 0
    made_by_cli = np.concatenate(RecordingWriter.frames_seen)
    capsys.readouterr()

    namespace = {}
    exec(readme_example(), namespace)
    frames = namespace["frames"]
    assert frames.dtype == np.uint8 and frames.shape == (1 + 4 * 5, 64, 96, 3)  # configs/tiny.yaml: 64x96
    np.testing.assert_array_equal(frames, made_by_cli)
    decoded = [iio.imread(path, plugin="FFMPEG") for path in
               (tmp_path / "fox.mp4", tmp_path / "videos" / "tiny" / "A red fox trots across a snowy meadow at "
                                                                     "sunrise.-0.mp4")]
    np.testing.assert_array_equal(decoded[0], decoded[1])  # the same frames, the same encoder settings
    assert capsys.readouterr().out.splitlines() == ["(9, 64, 96, 3)", "(12, 64, 96, 3)"]


def test_the_api_and_inference_py_load_the_same_weights_by_default(tiny_dir, tmp_path, monkeypatch, capsys):
    """EMA weights where the checkpoint has them, in both; --no-use_ema / use_ema=False read the generator."""
    checkpoints = tiny_dir / "checkpoints" / "tiny"
    run = tmp_path / "run.pt"
    torch.save({"generator": random_wan_state_dict(TINY_WAN_CONFIG, 2),
                "generator_ema": random_wan_state_dict(TINY_WAN_CONFIG, 3)}, run)
    small = OmegaConf.load(REPO / "configs" / "tiny.yaml")
    small.height, small.width = 16, 32
    OmegaConf.save(small, tmp_path / "small.yaml")
    (tmp_path / "p.txt").write_text("a dog\n")
    recorded = {}
    for flags in ([], ["--use_ema"], ["--no-use_ema"]):  # the default, upstream's flag, and the opt-out
        out = tmp_path / f"out{len(recorded)}"
        assert run_cli(cli.main, ["--config_path", str(tmp_path / "small.yaml"), "--data_path", str(tmp_path / "p.txt"),
                                  "--output_folder", str(out), "--checkpoint_path", str(run), "--num_output_frames",
                                  "3", f"checkpoint_dir={checkpoints}", *flags]) == 0
        recorded[" ".join(flags)] = json.loads((out / "manifest.jsonl").read_text())["settings"]["weights"]
    assert recorded == {"": f"{run.resolve()} [generator_ema]", "--use_ema": f"{run.resolve()} [generator_ema]",
                        "--no-use_ema": f"{run.resolve()} [generator]"}
    assert f"weights: {run} [generator_ema]" in capsys.readouterr().out
    pipe = VideoPipeline.from_pretrained(checkpoints, run, config_path=tmp_path / "small.yaml", device="cpu")
    assert pipe.weights.identity == recorded[""]
    raw = VideoPipeline.from_pretrained(checkpoints, run, use_ema=False, config_path=tmp_path / "small.yaml")
    assert raw.weights.identity == recorded["--no-use_ema"]


def test_the_api_names_its_own_frame_argument_and_unit(tiny_dir):
    config = tiny_dir / "configs" / "tiny.yaml"
    pipe = VideoPipeline.from_pretrained(tiny_dir / "checkpoints" / "tiny", config_path=config, device="cpu")
    with pytest.raises(ConfigError) as err:
        pipe("a dog", num_frames=5)
    assert str(err.value).startswith("num_frames=5 counts latent frames and must be a positive multiple of the "
                                     "chunk size num_frame_per_block=3")


def test_same_frames_as_inference_py_for_the_manifest_seed(tiny_dir, tmp_path, monkeypatch):
    checkpoints = tiny_dir / "checkpoints" / "tiny"
    small = OmegaConf.load(REPO / "configs" / "tiny.yaml")
    small.height, small.width = 16, 32  # the smallest size the VAE and patch strides allow, for speed
    OmegaConf.save(small, tmp_path / "small.yaml")
    (tmp_path / "p.txt").write_text("a dog\na red fox running through snow\n")
    monkeypatch.setattr(cli, "Mp4Writer", RecordingWriter)
    RecordingWriter.frames_seen = []
    assert run_cli(cli.main, ["--config_path", str(tmp_path / "small.yaml"), "--data_path",
                              str(tmp_path / "p.txt"), "--output_folder", str(tmp_path / "out"), "--seed", "5",
                              "--checkpoint_path", str(checkpoints / RELEASE_FOLDER / RELEASE_FILE),
                              "--num_output_frames", "6", f"checkpoint_dir={checkpoints}"]) == 0
    encoded = np.concatenate(RecordingWriter.frames_seen[2:])  # the second prompt's two chunks
    seed = [json.loads(line)["seed"] for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()][1]
    monkeypatch.chdir(tiny_dir)
    pipe = VideoPipeline.from_pretrained("checkpoints/tiny", config_path=tmp_path / "small.yaml", device="cpu")
    video = pipe("a red fox running through snow", num_frames=6, seed=seed)
    np.testing.assert_array_equal(video, encoded)
    assert not np.array_equal(pipe("a red fox running through snow", num_frames=6, seed=seed + 1), encoded)


def test_relative_checkpoint_dir_is_resolved_against_the_working_directory(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        VideoPipeline.from_pretrained("checkpoints/tiny", config_path=tiny_dir / "configs" / "tiny.yaml")
    message = str(err.value)
    assert "'checkpoints/tiny'" in message and str(tmp_path / "checkpoints" / "tiny") in message
    assert f"working directory, {tmp_path}" in message
    with pytest.raises(CheckpointError, match="'nothing.pt' not found: looked for .*tiny/nothing.pt and "):
        VideoPipeline.from_pretrained(tiny_dir / "checkpoints" / "tiny", "nothing.pt",
                                      config_path=tiny_dir / "configs" / "tiny.yaml")
