"""Configuration: packaged defaults <- a YAML file <- `key=value` overrides, typed and with unknown keys refused.

Every default lives in `reward_forcing/defaults/*.yaml` (one file per concern, each key documented there); a key
may be defined in only one of those files. reward_forcing/settings.py gives each key its type: a value of the wrong
type or an unknown choice is refused in one line, and a key that moved is refused with its new place.

The presets (the repository's `configs/*.yaml`) ship with the package: setup.py installs configs/ as
the data package `reward_forcing.presets`, so `config_path` may name a preset ("tiny",
"reward_forcing") from any working directory as well as give a path to a YAML file.
"""
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from yaml import MarkedYAMLError

from reward_forcing.errors import ConfigError
from reward_forcing.settings import MOVED_KEYS, Settings

DEFAULTS_DIR = Path(__file__).with_name("defaults")
# An installed wheel holds the presets inside the package; a source checkout (editable install or
# PYTHONPATH) reads the repository's configs/ folder beside it. One copy either way.
PRESET_DIRS = (Path(__file__).with_name("presets"), Path(__file__).resolve().parent.parent / "configs")


def presets_dir() -> Path:
    """Where the presets of this installation live."""
    for folder in PRESET_DIRS:
        if folder.is_dir():
            return folder
    return PRESET_DIRS[0]


def preset_names() -> list[str]:
    """The top-level presets (subfolders such as miniworld/ hold the presets of one script)."""
    return sorted(path.stem for path in presets_dir().glob("*.yaml"))


def resolve_config_path(config_path) -> Path:
    """A YAML file: `config_path` as a path (relative to the working directory), else the preset of that
    name ("tiny", "tiny.yaml" and "configs/tiny.yaml" all name configs/tiny.yaml)."""
    path = Path(config_path).expanduser()
    if path.is_file():
        return path
    if path.is_absolute():
        raise ConfigError(f"config file not found: {path}")
    name = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    preset = presets_dir() / name.with_suffix(".yaml")
    if preset.is_file():
        return preset
    raise ConfigError(f"config file not found: {config_path} (looked for {path.absolute()} and for a preset "
                      f"{preset}; presets: {', '.join(preset_names()) or 'none'})")


def _yaml_problem(err: Exception) -> str:
    """The first line of a YAML error, with the line and column it points at."""
    if isinstance(err, MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    return str(err).splitlines()[0]


def load_defaults() -> DictConfig:
    """The packaged defaults on the typed schema; every key of the schema must be set by them."""
    merged = OmegaConf.structured(Settings)
    owner = {}
    for path in sorted(DEFAULTS_DIR.glob("*.yaml")):
        part = OmegaConf.load(path)
        for key in part:
            if key in owner:
                raise RuntimeError(f"default key '{key}' is defined in both {owner[key]} and {path.name}")
            owner[key] = path.name
        merged = OmegaConf.merge(merged, part)
    unset = sorted(OmegaConf.missing_keys(merged))
    if unset:
        raise RuntimeError(f"reward_forcing/settings.py keys without a default in reward_forcing/defaults: {unset}")
    return merged


def _refuse_moved_keys(update: DictConfig, source: str) -> None:
    for key in update:
        if key in MOVED_KEYS:
            raise ConfigError(f"config key '{key}' in {source} moved: it is now {MOVED_KEYS[key]}")


def _merge_strict(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    _refuse_moved_keys(update, source)
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        reason = str(err).splitlines()[0]
        if isinstance(err, ConfigKeyError):
            raise ConfigError(f"unknown config key '{key}' in {source}") from None
        raise ConfigError(f"invalid value for '{key}' in {source}: {reason}") from None


def parse_overrides(overrides) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {str(err).splitlines()[0]}") from None


def load_config(config_path=None, overrides=()) -> DictConfig:
    """Defaults, then the YAML at `config_path` (a path or a preset name, if given), then `key=value` overrides."""
    config = load_defaults()
    if config_path is not None:
        path = resolve_config_path(config_path)
        try:
            user = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come in many exception types
            raise ConfigError(f"cannot read config {path}: {_yaml_problem(err)}") from None
        if not isinstance(user, DictConfig):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        config = _merge_strict(config, user, str(path))
    if overrides:
        config = _merge_strict(config, parse_overrides(overrides), "command-line overrides")
    OmegaConf.set_struct(config, True)
    return config


def save_config(config: DictConfig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path)
