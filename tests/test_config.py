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


@pytest.mark.parametrize("text, where", [
    ("height: 256\nwidth: [1, 2\n", "line 3, column 1: did not find expected ',' or ']'"),  # the list never closes
    ("height: 256\n  width: 3\n", "line 2, column 8: mapping values are not allowed in this context"),
    ("vae:\n\tz_dim: 4\n", "line 2, column 1: found character that cannot start any token"),
])
def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read config {path}: {where}"
