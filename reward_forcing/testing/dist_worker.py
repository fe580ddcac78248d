"""Worker for tests/test_training_parallel.py, run as a module:

    python -m reward_forcing.testing.dist_worker MODE OUT
    torchrun --standalone --nproc_per_node=N -m reward_forcing.testing.dist_worker MODE OUT

grads:  one FSDP2 forward/backward of a toy on a global batch of 2 split over the ranks; saves the full grads.
hsdp:   the same on a 2-D (replicate 2, shard 1) mesh.
resume: 4 AdamW steps with an EMA, checkpoint after step 1, then a fresh model/optimiser/EMA resumed from it
        replays steps 2-3; saves both final states and exports the generator.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reward_forcing.rng import keyed_randn
from reward_forcing.training.ema import EMA
from reward_forcing.training.parallel import init_distributed, shard_model, shutdown
from reward_forcing.training.state import (
    ModelState, OptimizerState, export_weights, full_state_dict, full_tensors, latest_checkpoint, load_checkpoint,
    save_checkpoint,
)

GLOBAL_BATCH = 2


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(2)])
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def build(info):
    torch.manual_seed(0)
    return shard_model(Toy(), info)


def local_loss(model, info, step):
    per_rank = GLOBAL_BATCH // info.world_size
    idx = [info.rank * per_rank + b for b in range(per_rank)]  # global sample indices of this rank
    x = torch.stack([keyed_randn((6,), 7, "x", step, i) for i in idx])
    return (model(x) ** 2).mean()


def grads(out, replicate=1):
    info = init_distributed(replicate)
    assert info.mesh.ndim == (2 if replicate > 1 else 1), info.mesh
    model = build(info)
    local_loss(model, info, 0).backward()
    full = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if info.rank == 0:
        torch.save(full, out / "grads.pt")
    shutdown()


def train(model, optim, ema, info, steps):
    for step in steps:
        local_loss(model, info, step).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        ema.update(model)


def resume(out):
    info = init_distributed()
    model = build(info)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    ema = EMA(model, 0.9)
    train(model, optim, ema, info, range(2))
    save_checkpoint(out, 1, {"generator": ModelState(model), "optim": OptimizerState(model, optim), "ema": ema},
                    {"data_position": 2})
    train(model, optim, ema, info, range(2, 4))
    straight = full_state_dict(model), full_tensors(ema.state_dict())

    model2 = build(info)
    optim2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    ema2 = EMA(model2, 0.9)
    meta = load_checkpoint(latest_checkpoint(out), {"generator": ModelState(model2),
                                                    "optim": OptimizerState(model2, optim2), "ema": ema2})
    assert meta["step"] == 1 and meta["data_position"] == 2, meta
    train(model2, optim2, ema2, info, range(2, 4))
    resumed = full_state_dict(model2), full_tensors(ema2.state_dict())
    if info.rank == 0:
        torch.save({"straight": straight, "resumed": resumed}, out / "resume.pt")
        export_weights(out / "generator", {"generator": resumed[0], "generator_ema": resumed[1]})
    shutdown()


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"grads": grads, "hsdp": lambda out: grads(out, replicate=2), "resume": resume}[mode](folder)
    assert not dist.is_initialized()
