"""Worker for tests/test_memory_plan.py and scripts/measure_activations.py:
`[torchrun --nproc_per_node=N] -m reward_forcing.testing.memory_worker ASSETS OUT [key=value ...]`.

Builds the distillation trainer (reward_forcing/training/distill.py) of configs/tiny_train.yaml on the tiny assets
in ASSETS (key=value overrides, e.g. sequence_parallel=2 height=128), then measures on this rank:
- the bytes of the storages that hold each network's parameter shards, its gradient shards after a backward, its
  AdamW state after a step, the generator's EMA and the text encoder's shards (what FSDP2 allocated);
- the peak bytes autograd saves (reward_forcing/testing/saved_tensors.py) in the generator's training rollout and
  in the critic's forward, with activation checkpointing and without. Checkpointed: the checkpointed run's peak
  plus the most one checkpointed unit saves when it runs without (what its recomputation holds: one chunk's
  exit-step forward in the rollout, one block in the critic).
Rank 0 writes OUT/memory.pt.
"""
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from reward_forcing.config import load_config
from reward_forcing.testing.saved_tensors import SavedTensorPeak
from reward_forcing.training.distill import Distiller
from reward_forcing.training.ema import EMA
from reward_forcing.training.loop import Run
from reward_forcing.training.parallel import init_distributed, shutdown

CONFIG = Path(__file__).parents[2] / "configs" / "tiny_train.yaml"


def settings(assets: Path, overrides=()):
    return load_config(CONFIG, [f"checkpoint_dir={assets}", f"prompt_path={assets / 'prompts.txt'}", "seed=7",
                                *overrides])


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def optimizer_bytes(optimizer) -> int:
    return storage_bytes(value for state in optimizer.state.values() for value in state.values())


@contextmanager
def unit_increments(meter: SavedTensorPeak, units):
    """Record, in `found`, what each call of a module in `units` adds to the meter's live saved bytes."""
    found = []
    handles = []
    for unit in units:
        handles.append(unit.register_forward_pre_hook(lambda module, args: found.append(-meter.live)))
        handles.append(unit.register_forward_hook(lambda module, args, out: found.append(found.pop() + meter.live)))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def exit_forwards(model, meter: SavedTensorPeak):
    """Record what each stream_step call of `model` adds to the meter's live saved bytes (0 without grad)."""
    found, original = [], model.stream_step

    def counted(*args, **kwargs):
        before = meter.live
        result = original(*args, **kwargs)
        found.append(meter.live - before)
        return result

    model.stream_step = counted
    try:
        yield found
    finally:
        model.stream_step = original


def saved_peaks(method, checkpoint: bool):
    """Saved-tensor peaks of the generator's rollout (grad at the exit steps) and of the critic's forward, the most
    one unit (an exit-step forward, a critic block) saved in them, and both outputs with their graphs."""
    method.cfg.gradient_checkpointing = checkpoint
    for model in (method.generator, method.critic):
        model.gradient_checkpointing = checkpoint
    with SavedTensorPeak() as meter:
        with exit_forwards(method.generator, meter) as exits:
            rolled = method._rolled_out("generator", 0, 0, with_grad=True)[3]
    peaks = {"rollout": meter.peak}
    ids, _, context, x = method._rolled_out("critic", 0, 0, with_grad=False)
    x_t, _, t = method._noisy(x, "critic", 0, ids)
    with SavedTensorPeak() as meter:
        with unit_increments(meter, method.critic.blocks) as blocks:
            critic_out = method.critic(x_t, t, context)
    peaks["critic"] = meter.peak
    return peaks, {"rollout": max(exits), "critic": max(blocks)}, rolled, critic_out


def main(assets: Path, out: Path, overrides):
    cfg = settings(assets, overrides)
    info = init_distributed(cfg.fsdp_replicate, cfg.sequence_parallel)
    method = Distiller(Run(cfg, out, info, 7, torch.float32))
    found = {"params": {name: storage_bytes(getattr(method, name).parameters())
                        for name in ("generator", "critic", "teacher")},
             "text_encoder": storage_bytes(method.text_encoder.model.parameters())}
    plain, units, _, _ = saved_peaks(method, checkpoint=False)
    checkpointed, _, rolled, critic_out = saved_peaks(method, checkpoint=True)
    # checkpointed: the run's peak plus what one unit holds while it is recomputed (module docstring)
    found["activations"] = {"no checkpointing": plain,
                            "checkpointed": {name: checkpointed[name] + units[name] for name in plain}}
    found["grads"], found["adam"] = {}, {}
    for name, output in (("generator", rolled), ("critic", critic_out)):
        output.square().mean().backward()
        network = method.networks[name]
        found["grads"][name] = storage_bytes(p.grad for p in network.model.parameters())
        network.optimizer.step()
        found["adam"][name] = optimizer_bytes(network.optimizer)
    found["ema"] = storage_bytes(EMA(method.generator, 0.99).shadow.values())
    if info.rank == 0:
        torch.save(found, out / "memory.pt")
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
