"""The presets (configs/*.yaml) ship with the package: `config_path` names one from any folder, in a source
checkout (editable install) and in an installed wheel, with one copy of each preset in the repository."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", ["tiny", "tiny.yaml", "configs/tiny.yaml"])
def test_a_preset_is_found_by_name_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    expected = OmegaConf.load(REPO / "configs" / "tiny.yaml")
    cfg = load_config(name)
    assert (cfg.height, cfg.width, cfg.checkpoint_dir) == (expected.height, expected.width, expected.checkpoint_dir)
    assert cfg.text_encoder == expected.text_encoder


def test_a_file_in_the_working_directory_wins_over_the_preset(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("height: 32\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.yaml").height == 32


def test_a_missing_config_names_both_places_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("configs/nonesuch.yaml")
    message = str(err.value)
    assert str(tmp_path / "configs" / "nonesuch.yaml") in message
    assert str(REPO / "configs" / "nonesuch.yaml") in message
    assert "tiny, tiny_ode" in message and "\n" not in message


def _build_wheel(tmp_path) -> Path:
    """A wheel built from a copy of the files setup.py reads (the repository stays free of build output)."""
    source = tmp_path / "source"
    for name in ("setup.py", "requirements.txt", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for folder in ("reward_forcing", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def test_a_wheel_installs_each_preset_once_and_finds_it_by_name(tmp_path):
    assert not (REPO / "reward_forcing" / "presets").exists()  # configs/ is the only copy in the repository
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name[len("reward_forcing/presets/"):]: archive.read(name) for name in archive.namelist()
                    if name.startswith("reward_forcing/presets/") and name.endswith(".yaml")}
        assert any(name.endswith("LICENSE") for name in archive.namelist())
    assert sorted(packaged) == PRESETS
    assert all(packaged[name] == (REPO / "configs" / name).read_bytes() for name in PRESETS)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import reward_forcing.config as c; cfg = c.load_config('tiny'); "
            "print(c.__file__); print(c.presets_dir()); print(cfg.height)")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    assert out == [str(site / "reward_forcing" / "config.py"), str(site / "reward_forcing" / "presets"),
                   str(OmegaConf.load(REPO / "configs" / "tiny.yaml").height)]
