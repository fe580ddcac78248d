"""Configuration: packaged defaults <- a YAML file <- `key=value` overrides, typed and with unknown keys refused.

Every default lives in `reward_forcing/defaults/*.yaml` (one file per concern, each key documented there); a key
may be defined in only one of those files. reward_forcing/settings.py gives each key its type: a value of the wrong
type or an unknown choice is refused in one line, and a key that moved is refused with its new place.
"""
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from reward_forcing.errors import ConfigError
from reward_forcing.settings import MOVED_KEYS, Settings

DEFAULTS_DIR = Path(__file__).with_name("defaults")


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
    """Defaults, then the YAML at `config_path` (if given), then `key=value` overrides."""
    config = load_defaults()
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            user = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come in many exception types
            raise ConfigError(f"cannot read config {path}: {str(err).splitlines()[0]}") from None
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
