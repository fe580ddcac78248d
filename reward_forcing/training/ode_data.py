"""ODE pairs: recorded teacher trajectories that the causal student regresses onto (CausVid, arXiv 2412.07772 §4.3).

Our format, written by scripts/generate_ode_pairs.py, is a directory holding
  manifest.json                  {"format": "reward_forcing.ode_pairs", "version": 1, "num_prompts": N,
                                  "shard_size": S, "layout": ..., plus the generation settings}
  shard_{k:06d}.safetensors      the pairs of prompt lines [k*S, min((k+1)*S, N)):
      ode_latent    [n, K, C, F, H, W]   K recorded states, noisiest first (pure noise ... clean)
      prompt_index  [n] int64            line number in the prompt file
      metadata "prompts"                 JSON list of the n prompt strings
A shard appears atomically (temporary name, then rename), so an interrupted run resumes by
skipping the shards already present, whatever the number of ranks.

The published layout (CausVid / Self Forcing ODE datasets), read and written for compatibility:
  one LMDB   latents_{i}_data = float16 bytes of [K, F, C, H, W], prompts_{i}_data = UTF-8,
             latents_shape = "N K F C H W", prompts_shape = "N"
  sharded    a directory of such LMDBs (shard_0, shard_1, ...); rows may lack the K axis
             (latents_shape "N F C H W"), which reads as one state.
Every reader yields {"prompts": str, "ode_latent": float32 [K, C, F, H, W]} (our latent layout).
"""
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from reward_forcing.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FORMAT = "reward_forcing.ode_pairs"
VERSION = 1
MANIFEST = "manifest.json"
LAYOUT = "ode_latent [n, K, C, F, H, W], states noisiest first"


# --- our shards: which prompts go where ---------------------------------------------------------

def shard_name(k: int) -> str:
    return f"shard_{k:06d}.safetensors"


def num_shards(num_prompts: int, shard_size: int) -> int:
    if shard_size < 1:
        raise ConfigError(f"ode_shard_size must be at least 1, got {shard_size}")
    return math.ceil(num_prompts / shard_size)


def shard_range(k: int, num_prompts: int, shard_size: int) -> range:
    """Prompt indices stored in shard k (the last shard may be short; no prompt is dropped)."""
    return range(k * shard_size, min((k + 1) * shard_size, num_prompts))


def shards_for_rank(num_prompts: int, shard_size: int, rank: int, world_size: int) -> list[int]:
    """Shards are dealt round-robin, so every rank gets a share and together they cover all."""
    return list(range(rank, num_shards(num_prompts, shard_size), world_size))


# --- our shards: writing ------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_output_dir(output_dir, manifest: dict) -> None:
    """Create output_dir with its manifest, or check that an existing one was made the same way."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "layout": LAYOUT, **manifest}
    path = output_dir / MANIFEST
    if path.is_file():
        check_manifest(output_dir, manifest)
    else:
        _atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def check_manifest(output_dir, manifest: dict) -> None:
    old = read_manifest(output_dir)
    for key, value in manifest.items():
        if key not in ("format", "version", "layout") and old.get(key) != value:
            raise ConfigError(
                f"{output_dir} holds ODE pairs made with {key}={old.get(key)!r}, not {value!r}; "
                "use a new --output_dir to change settings")


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read ODE pair manifest {path}: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a version-{VERSION} {FORMAT} manifest")
    return manifest


def shard_done(output_dir, k: int) -> bool:
    return (Path(output_dir) / shard_name(k)).is_file()


def write_shard(output_dir, k: int, prompts: list[str], prompt_index: list[int],
                ode_latent: torch.Tensor) -> Path:
    """Write shard k: ode_latent [n, K, C, F, H, W] for the n prompts (atomically)."""
    if ode_latent.shape[0] != len(prompts) or len(prompts) != len(prompt_index):
        raise ValueError("ode_latent, prompts and prompt_index must have one entry per pair")
    path = Path(output_dir) / shard_name(k)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {"ode_latent": ode_latent.contiguous().cpu(),
               "prompt_index": torch.tensor(prompt_index, dtype=torch.int64)}
    save_file(tensors, str(tmp), metadata={"prompts": json.dumps(prompts, ensure_ascii=False)})
    os.replace(tmp, path)
    return path


# --- the published LMDB layout: writing ---------------------------------------------------------

def _lmdb_rows(ode_latent: torch.Tensor, state_axis: bool) -> np.ndarray:
    """Our [N, K, C, F, H, W] -> the published float16 rows [N, K, F, C, H, W] (or [N, F, C, H, W])."""
    rows = ode_latent.detach().cpu().permute(0, 1, 3, 2, 4, 5).to(torch.float16).numpy()
    if state_axis:
        return rows
    if rows.shape[1] != 1:
        raise ValueError("rows without a state axis need exactly one state per pair")
    return rows[:, 0]


def _write_one_lmdb(path: Path, prompts: list[str], rows: np.ndarray) -> None:
    import lmdb

    map_size = 2 * (rows.nbytes + sum(len(p.encode()) for p in prompts)) + (64 << 20)
    env = lmdb.open(str(path), map_size=map_size, subdir=True)
    with env.begin(write=True) as txn:
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            txn.put(f"latents_{i}_data".encode(), row.tobytes())
            txn.put(f"prompts_{i}_data".encode(), prompt.encode())
        txn.put(b"latents_shape", " ".join(map(str, rows.shape)).encode())
        txn.put(b"prompts_shape", str(len(prompts)).encode())
    env.close()


def write_lmdb(path, prompts: list[str], ode_latent: torch.Tensor, num_lmdb_shards: int = 0,
               state_axis: bool = True) -> None:
    """Write pairs (ode_latent in our layout [N, K, C, F, H, W]) in the published LMDB layout.

    num_lmdb_shards = 0 writes one LMDB at `path`; otherwise `path/shard_{k}` LMDBs, pairs dealt
    round-robin. state_axis=False drops the K axis (K must be 1), as the published 14B shards do.
    """
    rows = _lmdb_rows(ode_latent, state_axis)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if num_lmdb_shards == 0:
        _write_one_lmdb(path, list(prompts), rows)
        return
    for k in range(num_lmdb_shards):
        _write_one_lmdb(path / f"shard_{k}", list(prompts[k::num_lmdb_shards]), rows[k::num_lmdb_shards])


# --- reading ------------------------------------------------------------------------------------

class _ShardSource:
    """One of our safetensors shards."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                self.prompts = json.loads(f.metadata()["prompts"])
                shape = f.get_slice("ode_latent").get_shape()
        except Exception as err:  # safetensors raises several types for truncated files
            raise CheckpointError(f"cannot read ODE pair shard {path}: {str(err).splitlines()[0]}") from None
        if len(shape) != 6 or shape[0] != len(self.prompts):
            raise CheckpointError(f"ODE pair shard {path} has ode_latent of shape {shape}, "
                                  f"expected [{len(self.prompts)}, K, C, F, H, W]")

    def __len__(self):
        return len(self.prompts)

    def get(self, row: int) -> dict:
        with safe_open(str(self.path), framework="pt") as f:
            latent = f.get_slice("ode_latent")[row]
        return {"prompts": self.prompts[row], "ode_latent": latent.float()}


class _LmdbSource:
    """One LMDB in the published layout; opened lazily so DataLoader workers each get their own."""

    def __init__(self, path: Path):
        self.path = path
        self._env = None
        with self.env().begin() as txn:
            shape = txn.get(b"latents_shape")
        if shape is None:
            raise CheckpointError(f"LMDB {path} has no latents_shape entry")
        self.shape = tuple(int(n) for n in shape.decode().split())
        if len(self.shape) not in (5, 6):
            raise CheckpointError(f"LMDB {path}: latents_shape {self.shape} is not N [K] F C H W")

    def env(self):
        if self._env is None:
            import lmdb

            self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, meminit=False)
        return self._env

    def __getstate__(self):
        return {**self.__dict__, "_env": None}

    def __len__(self):
        return self.shape[0]

    def get(self, row: int) -> dict:
        with self.env().begin() as txn:
            latent = txn.get(f"latents_{row}_data".encode())
            prompt = txn.get(f"prompts_{row}_data".encode())
        row_shape = self.shape[1:]
        if latent is None or prompt is None or len(latent) != 2 * math.prod(row_shape):
            raise CheckpointError(f"LMDB {self.path}: entry {row} is missing or not float16 {list(row_shape)}")
        latent = torch.from_numpy(np.frombuffer(latent, dtype=np.float16).reshape(row_shape).copy())
        if latent.dim() == 4:
            latent = latent[None]
        # published rows are [K, F, C, H, W]; our latents are [K, C, F, H, W]
        return {"prompts": prompt.decode(), "ode_latent": latent.permute(0, 2, 1, 3, 4).float()}


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _sources(path: Path) -> list:
    if (path / MANIFEST).is_file():
        expected = read_manifest(path).get("num_prompts")
        sources = [_ShardSource(p) for p in sorted(path.glob("shard_*.safetensors"))]
        found = sum(len(s) for s in sources)
        if found != expected:  # generation still running or interrupted: train on what is there
            log.warning("ODE pairs in %s are incomplete: %d of %d pairs", path, found, expected)
        return sources
    if (path / "data.mdb").is_file():
        return [_LmdbSource(path)]
    if path.is_dir():
        shards = sorted((p for p in path.iterdir() if (p / "data.mdb").is_file()), key=_natural_key)
        if shards:
            return [_LmdbSource(p) for p in shards]
    raise ConfigError(f"data_path {path} is not ODE pairs: expected a generate_ode_pairs.py directory "
                      "(manifest.json), an LMDB (data.mdb) or a directory of LMDB shards")


class OdePairDataset(Dataset):
    """Pairs from our shards, one published LMDB, or a directory of LMDB shards (auto-detected)."""

    def __init__(self, path):
        self.path = Path(path)
        self.sources = _sources(self.path)
        self.index = [(s, row) for s, source in enumerate(self.sources) for row in range(len(source))]
        if not self.index:
            raise ConfigError(f"data_path {self.path} holds no ODE pairs")

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        source, row = self.index[i]
        return self.sources[source].get(row)
