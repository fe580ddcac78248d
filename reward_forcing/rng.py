"""Randomness keyed by counters, so a run is reproducible across resumes and world sizes.

Every random draw of the training loop (noise, exit step, score timestep, prompt order) comes from a
generator seeded by (run seed, purpose, counters...). Nothing depends on how many draws happened
before, so a resumed run draws exactly what the uninterrupted run drew, and sample i of an optimiser
step gets the same noise whether it lives on rank 0 of 1 or on rank 1 of 2.
"""
import hashlib

import torch


def derive_seed(*keys) -> int:
    """A 63-bit seed from any tuple of ints / strings."""
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keyed_generator(*keys) -> torch.Generator:
    """A CPU generator seeded by `keys`; draw on CPU and move, so results do not depend on the device."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def keyed_randn(shape, *keys, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=keyed_generator(*keys), dtype=torch.float32).to(device=device, dtype=dtype)


def keyed_randint(high: int, *keys) -> int:
    return int(torch.randint(high, (1,), generator=keyed_generator(*keys)).item())
