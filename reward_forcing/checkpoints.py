"""Every released or own checkpoint layout -> a plain state dict with original Wan2.1 keys.

Formats:
- a Wan folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards listed in
  `diffusion_pytorch_model.safetensors.index.json`;
- a generator file: flat `{param: tensor}` (the released `rewardforcing.pt`), or sectioned
  `{"generator": ..., "generator_ema": ..., "critic": ...}` (`ode_init.pt`, training checkpoints);
  `.safetensors` files are flat.
Wrapper prefixes (`model.`, ComfyUI's `model.diffusion_model.`) and wrapper segments (FSDP,
activation checkpointing, torch.compile) are removed; diffusers-layout keys are renamed.
Nothing but tensors is unpickled.
"""
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from reward_forcing.errors import CheckpointError

WAN_CONFIG = "config.json"
WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_INDEX = WAN_WEIGHTS + ".index.json"

# Removed wherever they occur: wrappers insert them between module names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Removed only at the start (longest first): they name the wrapper that holds the Wan model.
LEADING_PREFIXES = ("model.diffusion_model.", "model.")
SECTIONS = ("generator", "generator_ema", "critic")
DIFFUSERS_MARKER = "condition_embedder."  # top-level module name that only diffusers' Wan transformer has
MAX_NAMED_KEYS = 3


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def _refused_global(err: BaseException) -> str:
    """The class named by torch's weights-only refusal (its message spans many lines)."""
    for line in str(err).splitlines():
        if "Unsupported global:" in line:
            return line.split("Unsupported global:")[1].split(" was not")[0].replace("GLOBAL", "").strip()
    return _first_line(err)


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}{download_hint(path)}")
    if not path.is_file():
        raise CheckpointError(f"{what} is not a file: {path}")
    return path


def strip_prefixes(state_dict: dict) -> dict:
    """Original Wan key names from a wrapped model's state dict."""
    out = {}
    for key, value in state_dict.items():
        name = key
        for segment in WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        for prefix in LEADING_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name in out:
            raise CheckpointError(f"checkpoint keys '{key}' and another key both map to '{name}' after prefix removal")
        out[name] = value
    return out


def original_keys(state_dict: dict) -> dict:
    """Wan key names; a diffusers WanTransformer3DModel state dict (e.g. a diffusers export) is renamed."""
    if not any(key.startswith(DIFFUSERS_MARKER) for key in state_dict):
        return state_dict
    from reward_forcing.models.wan import diffusers_to_wan_state_dict

    return diffusers_to_wan_state_dict(state_dict)


def _load_safetensors(path: Path) -> dict:
    _require_file(path, "weights file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} (truncated or not safetensors?): {_first_line(err)}") from None


def _load_torch(path: Path):
    _require_file(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"cannot read {path}: it holds objects other than tensors and plain containers, "
            f"refused by weights_only loading ({_refused_global(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} (truncated or not a torch.save file?): {_first_line(err)}") from None


# download_checkpoints.sh's flag for each folder or file it fetches by that name (its --help lists the parts).
DOWNLOAD_FLAGS = {"wan2.1-t2v-1.3b": "--only wan-1.3b", "wan2.1-t2v-14b": "--with-teacher",
                  "rewardforcing.pt": "--only reward-forcing", "ode_init.pt": "--only ode-init",
                  "ar_diffusion.pt": "--only causal-forcing", "causal_ode.pt": "--only causal-forcing"}


def download_hint(path) -> str:
    """'; `bash download_checkpoints.sh FLAG` fetches it ...' for an asset the script fetches, else ''."""
    flag = DOWNLOAD_FLAGS.get(Path(path).name.lower())
    if flag is None:
        return ""
    return (f"; `bash download_checkpoints.sh {flag}` fetches it (into checkpoints/; with --checkpoint-dir DIR, "
            "pass checkpoint_dir=DIR here)")


def _missing_wan_folder(folder: Path) -> str:
    return f"Wan model folder not found: {folder}{download_hint(folder)}"


def read_wan_config(folder) -> dict:
    """The DiT architecture stored in a Wan folder's `config.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(_missing_wan_folder(folder))
    path = _require_file(folder / WAN_CONFIG, "Wan config")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot parse {path}: {_first_line(err)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model settings")
    return config


def _load_sharded(folder: Path) -> dict:
    index_path = folder / WAN_INDEX
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot parse {index_path}: {_first_line(err)}") from None
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(_load_safetensors(folder / shard))
    missing = [key for key in weight_map if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensors listed in {index_path} are absent from their shards (first: {missing[0]} "
            f"in {weight_map[missing[0]]})"
        )
    return state_dict


def load_wan_folder(folder) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a Wan folder, single-file or sharded."""
    folder = Path(folder)
    config = read_wan_config(folder)
    if (folder / WAN_WEIGHTS).exists():
        state_dict = _load_safetensors(folder / WAN_WEIGHTS)
    elif (folder / WAN_INDEX).exists():
        state_dict = _load_sharded(folder)
    else:
        raise CheckpointError(f"Wan folder {folder} has neither {WAN_WEIGHTS} nor {WAN_INDEX}")
    return config, strip_prefixes(state_dict)


def _is_flat(obj: dict) -> bool:
    return all(isinstance(value, torch.Tensor) for value in obj.values())


# training/state.py export_weights writes generator.pt ({section: weights}) and flat safetensors copies:
# generator.safetensors (the `generator` section) and generator_ema.safetensors beside it.
EXPORTED_FLAT = "generator.safetensors"
EXPORTED_EMA = "generator_ema.safetensors"
NO_EMA_NOTE = "holds no separate EMA weights; its weights are used as they are"
NO_EMA_SECTION_NOTE = "no generator_ema section (no EMA made yet): the generator weights are used"


@dataclass(frozen=True)
class WeightsSource:
    """Which weights were read: the file (or Wan folder), the section of a sectioned file, and a note."""
    file: Path
    section: str | None = None
    note: str = ""

    @property
    def identity(self) -> str:
        """The absolute file and section: equal for two loads of the same weights."""
        return str(self.file.resolve()) + (f" [{self.section}]" if self.section else "")

    def __str__(self) -> str:
        section = f" [{self.section}]" if self.section else ""
        return f"{self.file}{section} ({self.note})" if self.note else f"{self.file}{section}"


def _select_section(obj: dict, path: Path, use_ema: bool) -> tuple[dict, WeightsSource]:
    """(weights, description of what was picked) from a torch.load-ed checkpoint dict."""
    sections = [name for name in SECTIONS if isinstance(obj.get(name), dict)]
    if not sections:
        if obj and _is_flat(obj):
            return obj, WeightsSource(path, note=NO_EMA_NOTE if use_ema else "")
        keys = ", ".join(sorted(map(str, obj))[:MAX_NAMED_KEYS]) or "none"
        raise CheckpointError(f"{path} is neither a flat state dict nor a checkpoint with a 'generator' section "
                              f"(top-level keys: {keys})")
    wanted = "generator_ema" if use_ema else "generator"
    if wanted not in sections and use_ema and "generator" in sections:
        return obj["generator"], WeightsSource(path, "generator", NO_EMA_SECTION_NOTE)
    if wanted not in sections:
        raise CheckpointError(f"{path} has no '{wanted}' section (it has: {', '.join(sections)})")
    return obj[wanted], WeightsSource(path, wanted)


def _safetensors_file(path: Path, use_ema: bool) -> WeightsSource:
    """The flat file to read: with `use_ema`, an exported generator.safetensors is replaced by the
    generator_ema.safetensors exported beside it."""
    if not use_ema or path.name == EXPORTED_EMA:
        return WeightsSource(path)
    ema = path.with_name(EXPORTED_EMA)
    if path.name == EXPORTED_FLAT and ema.is_file():
        return WeightsSource(ema, note=f"the EMA weights exported beside {path.name}")
    return WeightsSource(path, note=NO_EMA_NOTE)


def load_generator_weights(path, use_ema: bool = False) -> tuple[dict, WeightsSource]:
    """Student weights from a file (flat, sectioned or .safetensors) or a Wan folder, and which file and
    section were actually read.

    `use_ema` picks the EMA weights where the file has them: the `generator_ema` section of a sectioned file,
    or the generator_ema.safetensors exported beside a generator.safetensors. A file without them is used as
    it is (the released rewardforcing.pt, which upstream's README loads with --use_ema; the `generator`
    section of a run exported before its EMA was made), and the description says so.
    Keys in diffusers' WanTransformer3DModel layout are renamed to the original Wan names.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / WAN_CONFIG).is_file():
            raise CheckpointError(f"{path} is a folder without {WAN_CONFIG}: give a Wan model folder or a "
                                  "generator file (.pt, .pth, .safetensors)")
        return load_wan_folder(path)[1], WeightsSource(path, note=NO_EMA_NOTE if use_ema else "")
    if path.suffix == ".safetensors":
        source = _safetensors_file(path, use_ema)
        return original_keys(strip_prefixes(_load_safetensors(source.file))), source
    obj = _load_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    state_dict, source = _select_section(obj, path, use_ema)
    if not _is_flat(state_dict):
        raise CheckpointError(f"the selected weights in {path} contain non-tensor entries")
    return original_keys(strip_prefixes(state_dict)), source


def load_generator_state_dict(path, use_ema: bool = False) -> dict:
    """The weights of `load_generator_weights` without their description."""
    return load_generator_weights(path, use_ema)[0]


def _first(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMED_KEYS])
    return shown + (", ..." if len(names) > MAX_NAMED_KEYS else "")


def state_dict_mismatch(model: torch.nn.Module, state_dict: dict) -> str:
    """'' when `state_dict` fits `model` exactly, else a one-line description of the first differences."""
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong = [
        key for key in expected.keys() & state_dict.keys()
        if tuple(expected[key].shape) != tuple(state_dict[key].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if wrong:
        shown = [
            f"{key} {list(state_dict[key].shape)} vs model {list(expected[key].shape)}"
            for key in sorted(wrong)[:MAX_NAMED_KEYS]
        ]
        parts.append(f"{len(wrong)} wrong shape ({', '.join(shown)}{', ...' if len(wrong) > MAX_NAMED_KEYS else ''})")
    return "; ".join(parts)


def load_into(model: torch.nn.Module, state_dict: dict, source: str) -> torch.nn.Module:
    """Strict load; a mismatch is one CheckpointError naming the first offending keys."""
    problem = state_dict_mismatch(model, state_dict)
    if problem:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model


def _case_insensitive(path: Path) -> Path:
    """`path`, or a sibling whose name differs only in case (upstream writes `Videoreward`)."""
    if path.exists() or not path.parent.is_dir():
        return path
    matches = [p for p in path.parent.iterdir() if p.name.lower() == path.name.lower()]
    return matches[0] if len(matches) == 1 else path


def asset_path(checkpoint_dir, name) -> Path:
    """Where asset `name` lives: absolute, `./`- or `../`-relative paths as given, others under `checkpoint_dir`."""
    if name is None or str(name).strip() == "":
        raise CheckpointError("an empty asset path was given")
    text = str(name)
    path = Path(text).expanduser()
    if not (path.is_absolute() or text.startswith(("./", "../"))):
        path = Path(checkpoint_dir).expanduser() / path
    return _case_insensitive(path)
