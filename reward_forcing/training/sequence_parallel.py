"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv 2309.14509) for the Wan DiTs, applied from outside.

The ranks of one `sp` group (the innermost dimension of the device mesh, reward_forcing/training/parallel.py) run
the same samples, and each holds 1/P of their tokens through every block. The split follows the rows of the time
modulation: a block modulates its tokens by one row of e0 per frame for the causal student (per-frame timesteps)
and by one row for the whole sequence of the bidirectional Wan (models/wan.py `modulate`). Rank r holds token slice
r of every row, so the modulation, the residual adds, cross-attention, the MLP and the head all run on the local
tokens exactly as on the full sequence.

Self-attention is the one place tokens meet: around the attention function a block is given (RoPE at the
full sequence's positions, the block-causal plan, the streaming KV cache with its window and sink), an all-to-all
turns the sequence shard with every head into the whole sequence with H/P heads, [B, n/P, H, D] -> [B, n, H/P, D],
and a second one turns the output back. So that function runs unchanged on whole frames: RoPE positions,
the attention plan and the cache's frame bookkeeping stay what they are on one rank, while the cache holds H/P
heads per rank. The head's output is gathered back into the full sequence, so the model returns the same tensor
on every rank of the group.

Gradients: every rank of a group computes the same loss from the same gathered output, so the gather's backward
keeps the local slice of the output gradient, and each rank's parameter gradients hold its tokens' share of the
sum. FSDP reduce-scatters over the (shard x sp) ranks, so it is told to sum over sp and divide by the number of
data-parallel ranks only.

Applies to the calls that run the blocks on a sequence (`forward`, `stream_step`); the in-place `static_step`
of the streaming generator (inference) keeps whole heads per rank and is not split.
"""
import torch
import torch.distributed as dist

from reward_forcing.errors import ConfigError


def split_sizes(what: str, sizes: dict, parts: int) -> None:
    """One line naming every size in `sizes` ({'heads': 40, 'tokens per frame': 1560, ...}) that `parts` does not
    divide; `what` names the model."""
    bad = [f"{name} {size}" for name, size in sizes.items() if size % parts]
    if bad:
        raise ConfigError(f"sequence_parallel {parts} must divide {what}'s {' and '.join(bad)}")


def check_sequence_parallel(cfg, folders, world_size: int) -> None:
    """One-line errors, before any process group or weights, for a `sequence_parallel` that the world, or a DiT's
    heads, or the tokens of a frame (so of a chunk) do not divide. folders: the config keys naming the Wan
    folders whose DiTs the trainer builds; only their config.json files are read."""
    from reward_forcing.checkpoints import asset_path, read_wan_config
    from reward_forcing.inference.generator import latent_size
    from reward_forcing.models.wan import WanModel
    from reward_forcing.training.parallel import check_sequence_parallel_world

    parts = int(cfg.sequence_parallel)
    check_sequence_parallel_world(parts, world_size)
    if parts == 1:
        return
    for key in dict.fromkeys(folders):
        name = cfg[key]
        with torch.device("meta"):  # the architecture config.json describes, defaults filled in; no memory
            model = WanModel.from_config(read_wan_config(asset_path(cfg.checkpoint_dir, name)))
        height, width = latent_size(cfg, model.patch_size)
        frame_tokens = (height // model.patch_size[1]) * (width // model.patch_size[2])
        split_sizes(name, {"heads": model.num_heads, "tokens per frame": frame_tokens}, parts)


class _Exchange(torch.autograd.Function):
    """An all-to-all, `there` (sequence_to_heads or heads_to_sequence), whose gradient is the opposite one, `back`."""

    @staticmethod
    def forward(ctx, x, group, rows, there, back):
        ctx.group, ctx.rows, ctx.back = group, rows, back
        return there(x, group, rows)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad, ctx.group, ctx.rows), None, None, None, None


class _GatherTokens(torch.autograd.Function):
    """[B, n/P, C] -> [B, n, C] in sequence order; backward keeps this rank's slice of the (identical) gradient."""

    @staticmethod
    def forward(ctx, x, group, rows):
        ctx.group, ctx.rows = group, rows
        parts = dist.get_world_size(group)
        gathered = x.new_empty((parts * x.shape[0], *x.shape[1:]))
        dist.all_gather(list(gathered.chunk(parts)), x.contiguous(), group=group)
        gathered = gathered.unflatten(0, (parts, x.shape[0])).unflatten(2, (rows, -1))  # [P, B, rows, n/(rows P), C]
        return gathered.permute(1, 2, 0, 3, 4).flatten(1, 3)

    @staticmethod
    def backward(ctx, grad):
        return local_tokens(grad, ctx.group, ctx.rows), None, None


def sequence_to_heads(x: torch.Tensor, group, rows: int) -> torch.Tensor:
    """[B, n/P, H, D] (this rank's token slice of every row, all heads) -> [B, n, H/P, D] (every token in order,
    this rank's heads)."""
    parts = dist.get_world_size(group)
    send = x.unflatten(2, (parts, -1)).unflatten(1, (rows, -1))  # [B, rows, n/(rows P), P, H/P, D]
    send = send.permute(3, 0, 1, 2, 4, 5).contiguous()
    received = torch.empty_like(send)  # [P, B, rows, n/(rows P), H/P, D]: source rank first
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4, 5).flatten(1, 3)


def heads_to_sequence(y: torch.Tensor, group, rows: int) -> torch.Tensor:
    """The inverse of sequence_to_heads: [B, n, H/P, D] -> [B, n/P, H, D]."""
    parts = dist.get_world_size(group)
    send = y.unflatten(1, (rows, parts, -1)).permute(2, 0, 1, 3, 4, 5).contiguous()  # [P, B, rows, n/(rows P), ..]
    received = torch.empty_like(send)  # source rank = which heads
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 3, 0, 4, 5).flatten(3, 4).flatten(1, 2)


def local_tokens(x: torch.Tensor, group, rows: int) -> torch.Tensor:
    """This rank's slice of every row of x [B, n, ...] -> [B, n/P, ...]."""
    parts, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[1] % (rows * parts):
        raise ConfigError(f"sequence_parallel {parts} must divide the {x.shape[1] // rows} tokens per "
                          f"{'frame' if rows > 1 else 'sequence'}")
    return x.unflatten(1, (rows, parts, -1))[:, :, rank].flatten(1, 2)


def _split_attention(attend, group, rows: int):
    """attend(q, k, v) on whole sequences with H/P heads, taking and returning this rank's token slice."""
    def attend_local(q, k, v):
        # one all-to-all each: a cache or autograd that keeps v (or k) then holds no other tensor's storage
        q, k, v = (_Exchange.apply(x, group, rows, sequence_to_heads, heads_to_sequence) for x in (q, k, v))
        return _Exchange.apply(attend(q, k, v), group, rows, heads_to_sequence, sequence_to_heads)
    return attend_local


def split_sequence(model: torch.nn.Module, info) -> torch.nn.Module:
    """Split the token sequence of `model` (a Wan DiT, FSDP-sharded over info.mesh) over this rank's
    sequence-parallel group, info.sequence_group (module docstring); the model itself when sequence_parallel is 1."""
    if info.sequence_parallel == 1:
        return model
    _split_blocks(model, info.sequence_group)
    _sum_gradients_over_sequence(model, info.data_world)
    return model


def _split_blocks(model: torch.nn.Module, group) -> None:
    """Hooks on the blocks and the head. A block is called as block(x, e0, context, self_attend[, cache])
    (models/wan.py WanBlock.forward): the first block takes the full sequence and keeps the local slice; every
    block's self_attend is wrapped in the all-to-alls; the head's output is gathered."""
    blocks, head = getattr(model, "blocks", None), getattr(model, "head", None)
    if not blocks or head is None or not hasattr(model, "num_heads"):
        raise ConfigError(f"sequence_parallel cannot split {type(model).__name__}: it has no Wan blocks and head")
    split_sizes(type(model).__name__, {"heads": model.num_heads}, dist.get_world_size(group))

    def split_block_input(first: bool):
        def hook(block, args):
            x, e0, context, attend, *rest = args
            rows = e0.shape[1]
            if first:
                x = local_tokens(x, group, rows)
            return (x, e0, context, _split_attention(attend, group, rows), *rest)
        return hook

    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(split_block_input(index == 0))
    head.register_forward_hook(lambda module, args, out: _GatherTokens.apply(out, group, args[1].shape[1]))


def _sum_gradients_over_sequence(model: torch.nn.Module, data_parallel_size: int) -> None:
    """FSDP units of `model` reduce gradients over (shard x sp) ranks: sum over sp, divide by the data-parallel
    ranks only (module docstring). SUM collectives then a division, which gloo and NCCL both run."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(data_parallel_size))
            module.set_force_sum_reduction_for_comms(True)
