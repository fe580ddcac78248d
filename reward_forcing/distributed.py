"""This process's place in a run, and the two collectives every floor of the package may use.

DistInfo says which rank this is and on which device it computes; on_main and broadcast_object let one rank
do a piece of work (load a reward model, draw a seed) for all. Starting the process group and sharding
models is reward_forcing/training/parallel.py's job. Nothing here touches CUDA at import.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reward_forcing.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object  # torch.distributed.device_mesh.DeviceMesh, 1-D (FSDP) or 2-D ("replicate", "shard") for HSDP
    # Ulysses sequence parallelism: ranks per group (consecutive ranks) that share their samples and split their
    # tokens, and this rank's group (a ProcessGroup; None when sequence_parallel is 1)
    sequence_parallel: int = 1
    sequence_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which data-parallel rank this is: the ranks of one sequence-parallel group run the same samples."""
        return self.rank // self.sequence_parallel

    @property
    def data_world(self) -> int:
        """How many ranks run different samples."""
        return self.world_size // self.sequence_parallel


def compute_dtype(mixed_precision: bool, device: torch.device) -> torch.dtype:
    """bf16 compute on CUDA when asked; CPU always runs fp32."""
    return torch.bfloat16 if mixed_precision and device.type == "cuda" else torch.float32


def on_main(fn, info: DistInfo, default=None):
    """fn() on rank 0 only (default elsewhere). A UserError there is raised on every rank, with the same
    one-line message, instead of leaving the other ranks waiting in their next collective."""
    result, problem = default, None
    if info.is_main:
        try:
            result = fn()
        except UserError as err:
            problem = (type(err), str(err))
    problem = broadcast_object(problem)
    if problem is not None:
        raise problem[0](problem[1])
    return result


def broadcast_object(obj, src: int = 0):
    """The value of `obj` on rank `src`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
