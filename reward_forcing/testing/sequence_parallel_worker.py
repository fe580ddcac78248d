"""Worker for tests/test_sequence_parallel.py:
`torchrun --nproc_per_node=N -m reward_forcing.testing.sequence_parallel_worker SP OUT`.

Loads a tiny WanModel teacher and CausalWanModel student with load_sharded and split_sequence (as the trainers do,
reward_forcing/training/networks.py), with `sequence_parallel` SP, and runs on every rank the whole batch (SP = N:
one data-parallel rank): the teacher's forward, the student's teacher-forcing forward, a training rollout of the
student (exit steps with grad, activation checkpointing, straight-through cache gradient, a window that evicts
into an EMA sink: configs/tiny_train.yaml) and one streaming chunk on a cache that holds an earlier chunk. Rank 0
saves each call's output and the full parameter gradients of a weighted sum of it.
"""
import sys
from pathlib import Path

import torch

from reward_forcing.config import load_config
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.wan import WanModel
from reward_forcing.training.parallel import init_distributed, load_sharded, shutdown
from reward_forcing.training.rollout import rollout, training_sampler
from reward_forcing.training.sequence_parallel import split_sequence

CONFIG = Path(__file__).parents[2] / "configs" / "tiny_train.yaml"
SIZES = dict(dim=32, ffn_dim=48, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_dim=8, text_len=4, freq_dim=16)
BATCH, FRAMES, HW = 2, 9, (4, 8)  # 2 x 4 = 8 tokens per frame


def config():
    return load_config(CONFIG)


def teacher():
    torch.manual_seed(1)
    return WanModel(**SIZES)


def student():
    torch.manual_seed(0)
    return CausalWanModel(**SIZES, num_frame_per_block=3, local_attn_size=config().local_attn_size)


def inputs():
    """(x, clean_x, t, context) of the whole batch, the same on every rank."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, SIZES["in_dim"], FRAMES, *HW, generator=gen)
    clean = torch.randn(BATCH, SIZES["in_dim"], FRAMES, *HW, generator=gen)
    t = torch.rand(BATCH, FRAMES, generator=gen) * 1000
    return x, clean, t, torch.randn(BATCH, 4, SIZES["text_dim"], generator=gen)


def weighted(out: torch.Tensor) -> torch.Tensor:
    """A scalar that weighs every output element differently, so a misplaced token changes its gradient."""
    return (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()


def calls(teacher_model, student_model):
    """name -> a function returning one call's output (with autograd), on the same inputs everywhere."""
    x, clean, t, context = inputs()
    cfg = config()

    def rollout_call():
        return rollout(training_sampler(student_model, cfg), context, FRAMES, HW, [1, 3, 0], 3, ("g", 0), [0, 1],
                       torch.float32, with_grad=True, checkpoint=True, cache_grad="straight_through")

    def streaming_chunk():
        cache = training_sampler(student_model, cfg).new_cache(BATCH)
        with torch.no_grad():
            student_model.stream_step(clean[:, :, :3], 0.0, context, cache, 0)
        return student_model.stream_step(x[:, :, 3:6], t[:, 3:6], context, cache, 3)

    return {"teacher": lambda: teacher_model(x, t[:, 0], context),
            "teacher_forcing": lambda: student_model(x, t, context, clean_x=clean),
            "rollout": rollout_call,
            "streaming_chunk": streaming_chunk}


def results(teacher_model, student_model, full_grad=lambda g: g):
    """name -> {"output", "grads"} for every call; the grads of the model the call runs."""
    out = {}
    for name, call in calls(teacher_model, student_model).items():
        model = teacher_model if name == "teacher" else student_model
        output = call()
        weighted(output).backward()
        out[name] = {"output": output.detach(),
                     "grads": {n: full_grad(p.grad).clone() for n, p in model.named_parameters()}}
        model.zero_grad(set_to_none=True)
    return out


def main(sequence_parallel: int, out: Path):
    info = init_distributed(sequence_parallel=sequence_parallel)
    models = [split_sequence(load_sharded(build, lambda build=build: build().state_dict(), info), info)
              for build in (teacher, student)]
    found = results(*models, full_grad=lambda g: g.full_tensor())
    if info.rank == 0:
        torch.save(found, out / "sequence_parallel.pt")
    shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
