import pytest

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError


def test_defaults_are_the_real_model_values():
    cfg = load_config()
    assert (cfg.num_frame_per_block, cfg.local_attn_size, cfg.sink_size) == (3, 9, 3)
    assert cfg.compression_alpha == 0.999 and cfg.timestep_shift == 5.0
    assert (cfg.height, cfg.width) == (480, 832)


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("height: 256\nsink_size: 0\n")
    cfg = load_config(path, ["width=384", "sink_size=1"])
    assert (cfg.height, cfg.width, cfg.sink_size) == (256, 384, 1)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("not_a_key: 1\n", [], "unknown config key 'not_a_key'"),
        ("height: 256\n", ["nope=3"], "unknown config key 'nope'"),
        ("height: 256\n", ["height"], "not of the form key=value"),
        ("height: [1, 2\n", [], "cannot read config"),
        ("vae:\n  extra: 1\n", [], "unknown config key 'vae.extra'"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")
