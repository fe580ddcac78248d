"""Typed settings (reward_forcing/settings.py over reward_forcing/defaults/): every choice, number and flag is checked
by its type when the config is read, in one line naming what it takes; keys that moved name their new place."""
import dataclasses
import enum
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reward_forcing.config import load_config, load_defaults
from reward_forcing.errors import ConfigError
from reward_forcing.settings import MOVED_KEYS, Settings

ROOT = Path(__file__).parents[1]


def _fields(cls, prefix=""):
    """(dotted key, type) of every leaf field of a settings dataclass."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield from _fields(f.type, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.type


CHOICES = [(key, kind) for key, kind in _fields(Settings) if isinstance(kind, type) and issubclass(kind, enum.Enum)]


def test_the_defaults_set_every_typed_key_and_nothing_else():
    defaults = load_defaults()
    keys = {key for key, _ in _fields(Settings)}
    assert OmegaConf.missing_keys(defaults) == set()
    container = OmegaConf.to_container(defaults)

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert set(leaves(container)) == keys
    assert {key for key, _ in CHOICES} == {  # every closed set of values the packaged defaults document
        "decoder", "sink_mode", "switch_sink", "sigma_lookup", "trainer", "distill_loss", "schedule", "lr_schedule",
        "rollout_cache", "rollout_cache_grad", "wandb_mode", "ode_save_dtype", "reward.name", "reward.weight_norm",
        "reward.input", "reward.placement", "reward.frame"}


@pytest.mark.parametrize("key, kind", CHOICES, ids=[key for key, _ in CHOICES])
def test_every_choice_refuses_an_unknown_value_naming_its_choices(key, kind):
    choices = ", ".join(member.value for member in kind)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=bogus"])
    assert str(err.value) == (f"invalid value for '{key}' in command-line overrides: Invalid value 'bogus', "
                              f"expected one of [{choices}]")
    first = next(iter(kind)).value
    assert OmegaConf.select(load_config(None, [f"{key}={first}"]), key) == first  # a valid one reads back


@pytest.mark.parametrize("override, message", [
    ("height=tall", "invalid value for 'height' in command-line overrides: Value 'tall' of type 'str' could not be "
                    "converted to Integer"),
    ("max_steps=2.5", "invalid value for 'max_steps' in command-line overrides: Value '2.5' of type 'float' could "
                      "not be converted to Integer"),
    ("reward.beta=high", "invalid value for 'reward.beta' in command-line overrides: Value 'high' of type 'str' "
                         "could not be converted to Float"),
    ("compile=maybe", "invalid value for 'compile' in command-line overrides: Value 'maybe' is not a valid bool "
                      "(type str)"),
])
def test_numbers_and_flags_of_the_wrong_type_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("old, new", sorted(MOVED_KEYS.items()))
def test_a_moved_key_is_refused_with_its_new_place(old, new, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{old}=1"])
    assert str(err.value) == f"config key '{old}' in command-line overrides moved: it is now {new}"
    path = tmp_path / "old.yaml"
    path.write_text(f"{old}: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config key '{old}' in {path} moved: it is now {new}"
    assert OmegaConf.select(load_defaults(), new) is not None or new == "reward.weight_clip"  # the new key exists


def test_choices_compare_and_serialise_as_their_values(tmp_path):
    import json

    cfg = load_config(ROOT / "configs" / "tiny_train.yaml")
    assert cfg.sink_mode == "ema" and f"{cfg.sink_mode}" == "ema" and json.dumps(cfg.reward.name) == '"videoalign"'
    path = tmp_path / "saved.yaml"
    OmegaConf.save(cfg, path)
    assert load_config(path) == cfg  # a saved run config reads back the same


def test_train_py_refuses_a_moved_key_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--logdir", str(tmp_path), "reward_beta=4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config key 'reward_beta' in command-line overrides moved: it is now reward.beta"]
