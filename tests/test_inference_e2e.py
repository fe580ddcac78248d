"""inference.py end to end on tiny random assets: frame counts, fps, names, manifest, resume, torchrun parity."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reward_forcing.errors import run_cli
from reward_forcing.inference.cli import main
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.tiny_assets import randomise_, write_t5, write_tokenizer, write_vae

REPO = Path(__file__).resolve().parents[1]
DIT = dict(_class_name="WanModel", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=32,
           text_len=16, freq_dim=16, patch_size=[1, 2, 2], eps=1e-6, qk_norm=True, cross_attn_norm=True,
           window_size=[-1, -1], model_type="t2v")
TE = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=32,
          relative_attention_max_distance=128, text_len=16)
VAE = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
PROMPTS = "a cat walks on the grass\n\nrock/paper scissors\na cat walks on the grass\nwaves crash on a beach\n"


def make_tiny_assets(root):
    """A Wan folder (DiT config + weights, T5, tokenizer, VAE), a sectioned student checkpoint and a config."""
    folder = root / "checkpoints" / "Wan2.1-T2V-1.3B"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(DIT))
    torch.manual_seed(0)
    base = randomise_(CausalWanModel.from_config(DIT)).state_dict()
    save_file({k: v.contiguous() for k, v in base.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    write_tokenizer(folder, TE["vocab_size"])
    write_t5(folder / "models_t5_umt5-xxl-enc-bf16.pth", TE)
    write_vae(folder / "Wan2.1_VAE.pth", VAE)
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    torch.save({"generator": base, "generator_ema": ema}, root / "model.pt")
    config = {"checkpoint_dir": str(root / "checkpoints"), "text_encoder": TE, "vae": VAE, "height": 16, "width": 32}
    (root / "tiny.yaml").write_text(json.dumps(config))  # JSON is YAML
    (root / "prompts.txt").write_text(PROMPTS)
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))


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
    assert all(r["frames"] == 9 and r["seconds"] == 9 / 16 for r in records)
    assert len({r["seed"] for r in records}) == 6
    saved = (out / "config.yaml").read_text()
    assert "num_samples: 2" in saved and "height: 16" in saved

    mtimes = {n: (out / n).stat().st_mtime_ns for n in videos(out)}
    with pytest.warns(UserWarning):
        assert run(assets, out, "--num_output_frames", "3", "--num_samples", "2", "--seed", "4") == 0
    assert {n: (out / n).stat().st_mtime_ns for n in videos(out)} == mtimes  # all skipped
    assert "0 video(s) written, 6 skipped" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert run(assets, out, "--num_output_frames", "3", "--num_samples", "2", "--seed", "4", "--overwrite") == 0
    assert all((out / n).stat().st_mtime_ns != mtimes[n] for n in mtimes)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6  # compacted, not appended twice


def test_corrupt_checkpoint_is_one_line_and_writes_nothing(assets, tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    assert run_cli(main, ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(tmp_path / "bad.pt"),
                          "--data_path", str(assets / "prompts.txt"), "--output_folder", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_torchrun_two_processes_match_one(assets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = ["--config_path", str(assets / "tiny.yaml"), "--checkpoint_path", str(assets / "model.pt"),
            "--data_path", str(assets / "prompts.txt"), "--num_output_frames", "6"]
    single = subprocess.run([sys.executable, str(REPO / "inference.py"), *args, "--output_folder",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
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
