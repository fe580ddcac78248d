"""Process group, device mesh, FSDP2 sharding and sequence parallelism, applied to plain models from outside.

Works under `torchrun` (one node or several) and as one plain process (a world of one, so the code
path is the same). gloo on CPU, nccl on CUDA. Nothing here touches CUDA at import. The DistInfo it
returns, and on_main / broadcast_object, live one floor down in reward_forcing/distributed.py.
"""
import os
import random

import torch
import torch.distributed as dist

from reward_forcing.distributed import DistInfo, broadcast_object, on_main
from reward_forcing.errors import ConfigError


def init_distributed(fsdp_replicate: int = 1, sequence_parallel: int = 1) -> DistInfo:
    """Initialise torch.distributed (from torchrun's environment, or a world of one) and the device mesh."""
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    replicate = replica_groups(fsdp_replicate, world_size, local_world_size, sequence_parallel)
    mesh = build_mesh(device.type, world_size, replicate)
    group = sequence_group(device.type, world_size, replicate, sequence_parallel) if sequence_parallel > 1 else None
    return DistInfo(rank, world_size, local_rank, device, mesh, sequence_parallel, group)


def replica_groups(replicate: int, world_size: int, local_world_size: int, sequence_parallel: int = 1) -> int:
    """HSDP replica groups for `fsdp_replicate` (0 = one per node), checked against the world and the
    sequence-parallel groups."""
    check_sequence_parallel_world(sequence_parallel, world_size)
    if replicate == 0:
        replicate = max(1, world_size // max(1, local_world_size))
    if replicate < 1 or (world_size // sequence_parallel) % replicate:
        raise ConfigError(f"fsdp_replicate={replicate} must be >= 1 and divide the {world_size // sequence_parallel} "
                          f"data-parallel ranks (world size {world_size} / sequence_parallel {sequence_parallel})")
    return replicate


def check_sequence_parallel_world(sequence_parallel: int, world_size: int) -> None:
    if sequence_parallel < 1 or world_size % sequence_parallel:
        raise ConfigError(f"sequence_parallel {sequence_parallel} must be >= 1 and divide the world size {world_size}")


def build_mesh(device_type: str, world_size: int, replicate: int):
    """The mesh FSDP shards over: 1-D, or a 2-D (replicate, shard) mesh for HSDP. With sequence parallelism its
    shard dimension spans the (shard x sp) ranks, so parameters are sharded over the sp ranks too."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def sequence_group(device_type: str, world_size: int, replicate: int, sequence_parallel: int):
    """This rank's group of the (replicate, shard, sp) mesh's sp dimension: `sequence_parallel` consecutive
    ranks (on one node whenever it divides the GPUs per node, where the all-to-alls are fastest)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (replicate, world_size // (replicate * sequence_parallel), sequence_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard", "sp"))["sp"].get_group()


def shutdown() -> None:
    # Every rank must reach the barrier before the group is destroyed, or gloo ranks abort at teardown.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of repeated blocks: the ModuleList holding the most parameters."""
    best, best_count = None, -1
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = module, count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks to shard")
    return best


# Methods that run a model besides `forward` (CausalWanModel's streaming step): FSDP2 gathers the root's
# parameters around them as it does around forward.
FORWARD_METHODS = ("stream_step",)


def shard_model(model: torch.nn.Module, info: DistInfo, param_dtype: torch.dtype = torch.float32,
                reshard_after_forward: bool = True, move: bool = True) -> torch.nn.Module:
    """fully_shard each transformer block, then the root; fp32 master weights, `param_dtype` compute, fp32
    gradient reduction. The model is moved to the rank's device first (unless move=False).

    A block's parameters are gathered only inside its own forward, so a block must not use another's weights
    (each Wan block computes its own cross-attention K/V: models/wan.py WanBlock.cross_key_value)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if move:
        model.to(info.device)
    # cast_forward_inputs=False (as upstream): FSDP would otherwise cast the float32 timesteps to bf16
    # (937.5 -> 936) before the model's fp64 sinusoid; the models cast their own inputs where needed.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=info.mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=info.mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def load_sharded(build, load_state_dict, info: DistInfo, param_dtype: torch.dtype = torch.float32,
                 source: str = "weights") -> torch.nn.Module:
    """Build a model on the meta device, shard it, and fill it from a full state dict read on rank 0 only
    (broadcast shard by shard), so no rank but one ever holds a full copy (a 14B teacher fits).

    build(): the model (called under the meta device); load_state_dict(): its full state dict (rank 0 only).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from reward_forcing.checkpoints import state_dict_mismatch
    from reward_forcing.errors import CheckpointError

    with torch.device("meta"):
        model = build()

    def load_and_check():
        state_dict = load_state_dict()
        mismatch = state_dict_mismatch(model, state_dict)
        if mismatch:
            raise CheckpointError(f"{source} does not fit {type(model).__name__}: {mismatch}")
        return state_dict

    state_dict = on_main(load_and_check, info, default={})
    shard_model(model, info, param_dtype, move=False)
    model.to_empty(device=info.device)
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def resolve_seed(seed: int) -> int:
    """seed 0 means: rank 0 draws one in [0, 1e7) and everyone uses it (as Self-Forcing's trainer/distillation.py)."""
    if seed == 0:
        seed = random.SystemRandom().randrange(1, 10_000_000)
    return int(broadcast_object(seed))
