"""Worker for tests/test_training_parallel.py:
`[torchrun --nproc_per_node=N] -m reward_forcing.testing.sharded_models_worker OUT`.

Loads a tiny CausalWanModel student and a WanModel teacher with load_sharded (as the trainers do) and, with forward
pre-hooks on every module, records the most blocks whose parameters are gathered at once during the teacher's
forward, the student's full-sequence forward and a streaming rollout of the student (reward_forcing/training/
rollout.py, exit steps with grad, activation checkpointing as configs/tiny_train.yaml). Saves those counts, which
blocks are FSDP units, and the student's full gradients of both losses, the global batch of 2 split over the ranks.
"""
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from reward_forcing.config import load_config
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.wan import WanModel
from reward_forcing.training.parallel import init_distributed, load_sharded, shutdown
from reward_forcing.training.rollout import rollout, training_sampler

CONFIG = Path(__file__).parents[2] / "configs" / "tiny_train.yaml"
SIZES = dict(dim=32, ffn_dim=48, num_heads=2, num_layers=3, in_dim=4, out_dim=4, text_dim=8, text_len=4, freq_dim=16)
GLOBAL_BATCH = 2
FRAMES, HW = 9, (4, 4)


def config():
    return load_config(CONFIG)


def student():
    torch.manual_seed(0)
    return CausalWanModel(**SIZES, num_frame_per_block=3, local_attn_size=config().local_attn_size)


def teacher():
    torch.manual_seed(1)
    return WanModel(**SIZES)


def global_batch():
    """(x, t, context) of the whole batch, the same on every rank."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(GLOBAL_BATCH, SIZES["in_dim"], FRAMES, *HW, generator=gen)
    t = torch.rand(GLOBAL_BATCH, FRAMES, generator=gen) * 1000
    return x, t, torch.randn(GLOBAL_BATCH, 4, SIZES["text_dim"], generator=gen)


def forward_loss(model, x, t, context):
    return model(x, t, context).square().mean()


def rollout_loss(model, context, sample_ids):
    cfg = config()
    x = rollout(training_sampler(model, cfg), context, FRAMES, HW, [1, 3, 0], 3, ("g", 0), sample_ids, torch.float32,
                with_grad=True, checkpoint=bool(cfg.gradient_checkpointing), cache_grad=str(cfg.rollout_cache_grad))
    return (x * torch.linspace(-1, 1, x[0].numel()).view(x.shape[1:])).mean()


class GatherCounter:
    """Forward pre-hooks on every module of `model` record the most blocks gathered at once (a gathered block's
    parameters are plain tensors, a sharded one's DTensors), while `counting`."""

    def __init__(self, model):
        self.blocks, self.counting, self.most, self.seen = model.blocks, False, 0, set()
        for module in model.modules():
            module.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if self.counting:
            gathered = [i for i, block in enumerate(self.blocks)
                        if not any(isinstance(p, DTensor) for p in block.parameters())]
            self.most = max(self.most, len(gathered))
            self.seen.update(gathered)

    def during(self, fn, *args):
        self.counting = True
        try:
            return fn(*args)
        finally:
            self.counting = False

    def report(self):
        return {"most": self.most, "seen": sorted(self.seen)}


def main(out):
    info = init_distributed()
    per_rank = GLOBAL_BATCH // info.world_size
    ids = [info.rank * per_rank + b for b in range(per_rank)]
    x, t, context = (tensor[ids] for tensor in global_batch())
    models = {"student": load_sharded(student, lambda: student().state_dict(), info),
              "teacher": load_sharded(teacher, lambda: teacher().state_dict(), info)}
    result = {name: {"units": [isinstance(block, FSDPModule) for block in model.blocks]}
              for name, model in models.items()}
    counters = {name: GatherCounter(model) for name, model in models.items()}
    with torch.no_grad():
        counters["teacher"].during(models["teacher"], x, t[:, 0], context)
    result["teacher"]["forward"] = counters["teacher"].report()

    model, counter = models["student"], counters["student"]
    for name, loss_fn, args in (("forward", forward_loss, (model, x, t, context)),
                                ("rollout", rollout_loss, (model, context, ids))):
        counter.most, counter.seen = 0, set()
        loss = counter.during(loss_fn, *args)
        result["student"][name] = counter.report()
        loss.backward()
        result["student"][f"{name}_grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    if info.rank == 0:
        torch.save(result, out / "sharded.pt")
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
