"""What made each video: the settings recorded per video in manifest.jsonl, and the check that a re-run
into the same output folder never skips (or sits beside) videos made with other settings.

A finished video is skipped only when its manifest record says it was made from the same weights, the
same frame count, size, schedule, cache policy and decoder, the same seed and the same generated text
as this run would use; otherwise the run stops with one line before writing anything. When every video
of a run is already there, `finished_before` says so before any model is loaded.
"""
from pathlib import Path

from omegaconf import OmegaConf

from reward_forcing.checkpoints import _safetensors_file, asset_path
from reward_forcing.errors import ConfigError
from reward_forcing.inference.segments import recorded_segments

# Config keys whose values change the frames of a video (the file name and sample count do not).
SHAPING_KEYS = (
    "inference.num_output_frames", "height", "width", "fps", "num_frame_per_block", "local_attn_size", "sink_size",
    "sink_mode", "compression_alpha", "switch_sink", "timestep_shift", "denoising_step_list", "warp_denoising_step",
    "sigma_lookup", "context_noise", "decoder", "taehv_path", "text_encoder.text_len",
)


def video_settings(cfg, weights, dtype) -> dict:
    """The run-wide settings that shape every video, as JSON-ready values (`weights`: a WeightsSource)."""
    return {"weights": weights.identity, **settings_before_loading(cfg, dtype)}


def settings_before_loading(cfg, dtype) -> dict:
    """video_settings without the weights' identity, which only loading the checkpoint tells for certain."""
    settings = {"base_model": str(asset_path(cfg.checkpoint_dir, cfg.model_name).resolve()), "dtype": str(dtype)}
    for key in SHAPING_KEYS:
        value = OmegaConf.select(cfg, key)
        settings[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return settings


def certain_weights(cfg, checkpoint_path, use_ema: bool) -> set[str]:
    """The recorded weights identities (WeightsSource.identity) that loading `checkpoint_path` would surely
    give again, decided without reading it: a flat file, or the section `use_ema` asks for. A `generator`
    section recorded under use_ema (no EMA then) is left out: the file may hold an EMA by now."""
    if checkpoint_path is None:
        return {str(asset_path(cfg.checkpoint_dir, cfg.model_name).resolve())}
    path = Path(checkpoint_path)
    if path.is_dir():
        return {str(path.resolve())}
    if path.suffix == ".safetensors":
        return {_safetensors_file(path, use_ema).identity}
    file = str(path.resolve())
    return {file, f"{file} [{'generator_ema' if use_ema else 'generator'}]"}


def video_record(settings: dict, seed: int, generated_from, conditioning: dict | None = None) -> dict:
    """Everything that shapes one video: the run's settings, its seed and what it was generated from (the
    text, or the manifest's segment list of a --switch_prompts video), and the picture or video it starts from
    (the manifest's `conditioning`: its digest decides, not the file's name)."""
    record = {"settings": settings, "seed": seed, "generated_from": generated_from}
    if conditioning is not None:
        record["conditioning"] = {key: value for key, value in conditioning.items() if key != "file"}
    return record


def _recorded(record: dict) -> dict:
    segments = record.get("segments")
    source = recorded_segments(segments) if segments else record.get("extended_prompt") or record.get("prompt")
    return video_record(record.get("settings"), record.get("seed"), source, record.get("conditioning"))


def finished_before(folder, records: list[dict], planned: dict, weights: set[str]) -> bool:
    """Whether a run has nothing to do: every planned video exists with a matching record, its weights among
    `weights` (certain_weights), and the folder holds no other video. planned: {file name: video_record} made
    with settings_before_loading. False means: load the models and decide with check_output_folder."""
    folder = Path(folder)
    by_file = {record["file"]: record for record in records}
    present = {name for name in by_file if (folder / name).exists()}
    if present != set(planned):
        return False
    for name, wanted in planned.items():
        old = _recorded(by_file[name])
        settings = dict(old["settings"] or {})
        if settings.pop("weights", None) not in weights or dict(old, settings=settings) != wanted:
            return False
    return True


def _first_difference(old, new: dict) -> str:
    """'key old -> new' for the first value of `new` that `old` (a recorded dict, maybe None) lacks."""
    if old is None:
        return "no settings recorded"
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = _first_difference(before, value)
            if inner:
                return inner
        elif isinstance(value, dict) and before is None:
            return f"no {key} recorded"
        elif before != value:
            return f"{key} {before!r} -> {value!r}"
    extra = [key for key in old if key not in new]
    return f"{extra[0]} {old[extra[0]]!r} -> none" if extra else ""


def check_output_folder(folder, records: list[dict], planned: dict, settings: dict, overwrite: bool) -> None:
    """Refuse (one ConfigError) to skip or sit beside videos made with other settings.

    records: manifest records of `folder`; planned: {file name: video_record} of this run.
    A planned video that exists is skipped only if its record matches (else --overwrite regenerates it);
    a recorded video this run does not make must have the same run-wide settings, whatever the flags,
    so the folder's config.yaml describes every video in it.
    """
    folder = Path(folder)
    by_file = {record["file"]: record for record in records}
    for name, wanted in planned.items():
        if overwrite or not (folder / name).exists():
            continue
        if name not in by_file:
            raise ConfigError(f"{folder / name} exists but {folder}/manifest.jsonl does not say how it was made; "
                              "regenerate it with --overwrite or choose another --output_folder")
        old = _recorded(by_file[name])
        if old != wanted:
            raise ConfigError(f"{folder / name} was made with other settings ({_first_difference(old, wanted)}); "
                              "regenerate with --overwrite or choose another --output_folder")
    for name, record in by_file.items():
        if name in planned or not (folder / name).exists():
            continue
        if record.get("settings") != settings:
            difference = _first_difference(record.get("settings"), settings)
            raise ConfigError(f"{folder} holds {name}, made with other settings ({difference}) and not part of "
                              "this run; choose another --output_folder")
