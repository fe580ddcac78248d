"""Resumable training state (torch.distributed.checkpoint) and the exported generator weights.

Layout under `<logdir>/checkpoints/`:
  step_00000010/          one complete DCP checkpoint: DCP shards + meta.json + rng_rank<r>.pt
  step_00000020.tmp/      being written (or abandoned by a crash): ignored, removed by the next save
A checkpoint becomes visible only by the atomic rename of its .tmp folder after every rank finished
writing, so `latest_checkpoint` never returns a partial one. meta.json holds the loop counters.
"""
import json
import os
import shutil
import stat
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from reward_forcing.errors import CheckpointError

_PREFIX = "step_"


class ModelState:
    """DCP Stateful view of a (possibly FSDP2-sharded) model."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, state):
        set_model_state_dict(self.model, state)


class OptimizerState:
    """DCP Stateful view of an optimiser, keyed by parameter names (resharding-safe)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state):
        set_optimizer_state_dict(self.model, self.optimizer, state)


def checkpoint_root(logdir) -> Path:
    return Path(logdir) / "checkpoints"


def latest_checkpoint(logdir):
    """The newest complete checkpoint folder under `logdir`, or None."""
    root = checkpoint_root(logdir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
            and (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(_PREFIX):]), default=None)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(logdir, step: int, parts: dict, meta: dict, keep: int = 2) -> Path:
    """Collective: every rank calls. `parts` maps names to Stateful objects (ModelState, OptimizerState,
    EMA, ...); `meta` is JSON-serialisable loop state. Returns the final folder."""
    rank = dist.get_rank()
    root = checkpoint_root(logdir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        for stale in root.glob(f"{_PREFIX}*.tmp") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dcp.save(dict(parts), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        meta_path = tmp / "meta.json"
        meta_path.write_text(json.dumps(dict(meta, step=step, world_size=dist.get_world_size()), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
                   and p.name[len(_PREFIX):].isdigit()), key=lambda p: int(p.name[len(_PREFIX):]))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(folder) -> dict:
    path = Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {err}") from None


def load_checkpoint(folder, parts: dict) -> dict:
    """Collective: load `parts` in place from `folder`; restores this rank's RNG state when it was saved
    with the same world size. Returns the meta dict."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        dcp.load(dict(parts), checkpoint_id=str(folder))
    except Exception as err:  # DCP reports missing keys / shape mismatches with many exception types
        raise CheckpointError(f"cannot resume from {folder}: {str(err).splitlines()[0]}") from None
    rng_path = folder / f"rng_rank{dist.get_rank()}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True, map_location="cpu")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta


def full_state_dict(model) -> dict:
    """Collective: the unsharded fp32 state dict on CPU, on rank 0 only ({} elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensors(state: dict, keep: bool = True) -> dict:
    """Collective: gather a dict of (possibly sharded DTensor) tensors to full fp32 CPU tensors, one at a time;
    ranks with keep=False take part in the gathers but return {} (e.g. keep=info.is_main)."""
    out = {}
    for name, value in state.items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        if keep:
            out[name] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def export_weights(stem, sections: dict) -> list[Path]:
    """Rank 0 only: write `<stem>.pt` ({section: state_dict}, what inference.py and checkpoints.py load) and
    safetensors copies, `<stem>.safetensors` for the first section and `<section>.safetensors` beside it for
    the others (generator.pt -> generator.safetensors, generator_ema.safetensors); atomic renames."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(stem.name + ".pt.tmp")
    torch.save(sections, tmp)
    os.replace(tmp, stem.with_name(stem.name + ".pt"))
    written = [stem.name + ".pt"]
    mode = stat.S_IMODE(stem.with_name(stem.name + ".pt").stat().st_mode)  # safetensors writes 0600; match .pt
    for index, (name, state) in enumerate(sections.items()):
        path = stem.with_name((stem.name if index == 0 else name) + ".safetensors")
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        written.append(path.name)
    from reward_forcing.training.metrics import notice

    notice(f"exported the generator to {stem.parent}: {', '.join(written)}")
    return [stem.parent / name for name in written]


def export_generator(stem, generator, ema, is_main: bool) -> list[Path]:
    """Collective: export `<stem>.pt` with the generator and, when there is an EMA, `generator_ema` (the EMA
    shadow over the generator's buffers); rank 0 writes and returns the files ([] elsewhere)."""
    sections = {"generator": full_state_dict(generator)}
    if ema is not None:
        shadow = full_tensors(ema.state_dict(), keep=is_main)
        sections["generator_ema"] = dict(sections["generator"], **shadow) if is_main else {}
    return export_weights(stem, sections) if is_main else []


def export_wan_folder(folder, config: dict, state_dict: dict) -> Path:
    """Rank 0: a Wan folder (config.json + diffusion_pytorch_model.safetensors, what `real_name`, `fake_name` and
    `ode_teacher_name` take), replaced atomically."""
    from safetensors.torch import save_file

    from reward_forcing.checkpoints import WAN_CONFIG, WAN_WEIGHTS
    from reward_forcing.training.metrics import notice

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / WAN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / WAN_WEIGHTS))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    notice(f"exported the model to {folder}")
    return folder


def resume_folder(logdir, explicit=None):
    """The checkpoint to resume from: `explicit` if given, else the latest complete one in logdir (or None)."""
    if explicit is not None:
        read_meta(explicit)  # a clear error for a folder that is not a complete checkpoint
        return Path(explicit)
    return latest_checkpoint(logdir)
