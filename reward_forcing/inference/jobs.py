"""Which process makes which video, and with which seed.

A video's seed depends only on (base seed, prompt index, sample index), never on the rank or the
number of processes, so any torchrun launch reproduces a single-process run exactly.
"""
import hashlib


def video_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed; distinct triples give unrelated seeds (unlike base + index, which overlap)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def shard(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of `items` for `rank`: every item goes to exactly one rank, none dropped."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return items[rank::world_size]
