"""The optimiser-step schedule of two-network distillation (SPEC §9.5, the intended one).

One optimiser step of a network = `grad_accum` micro-steps (each loss already divided by
`grad_accum`) -> clip -> step -> zero_grad. The critic steps on every optimiser step; the generator
on every `gen_every`-th one (step 0 included), before the critic, as upstream orders them.
"""
import math

import torch

from reward_forcing.errors import UserError


class TrainingDiverged(UserError):
    """A loss became NaN / inf; the run stops before touching the last good checkpoint."""


def is_generator_step(step: int, gen_every: int) -> bool:
    return step % gen_every == 0


def _set_gradient_sync(model, enabled: bool) -> None:
    # FSDP2 modules reduce-scatter on every backward unless told otherwise; sync on the last micro-step only.
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _finite_everywhere(loss: float, model) -> bool:
    """Whether the loss is finite on every rank (all ranks must agree to stop, or the others would hang)."""
    import torch.distributed as dist

    bad = not math.isfinite(loss)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = next(model.parameters()).device
        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    return not bad


class Updater:
    """One network's optimiser with clipping: accumulate -> clip -> step -> zero_grad."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.name, self.model, self.optimizer, self.grad_clip = name, model, optimizer, grad_clip

    def accumulate(self, grad_accum: int, micro_step) -> dict:
        """Run `micro_step(i)` for i < grad_accum; each returns a dict with a scalar tensor 'loss' (already
        backpropagated and divided by grad_accum) plus metrics. Returns the summed loss, the min / max of
        metrics named `*_min` / `*_max`, and the mean of the others."""
        totals = {}
        for index in range(grad_accum):
            _set_gradient_sync(self.model, index == grad_accum - 1)
            out = micro_step(index)
            for key, value in out.items():
                value = float(value.detach()) if torch.is_tensor(value) else float(value)
                if key.endswith("_min") or key.endswith("_max"):
                    pick = min if key.endswith("_min") else max
                    totals[key] = pick(totals.get(key, value), value)
                else:
                    scale = 1.0 if key == "loss" else 1.0 / grad_accum  # the loss is already divided by grad_accum
                    totals[key] = totals.get(key, 0.0) + scale * value
        return totals

    def step(self, loss: float) -> float:
        """Clip, step and zero the gradients; refuses to step on a non-finite loss or gradient."""
        if not _finite_everywhere(loss, self.model):
            raise TrainingDiverged(f"{self.name} loss is {loss} (on this or another rank); stopping "
                                   "(the last saved checkpoint is intact)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise TrainingDiverged(f"{self.name} gradient norm is {norm}; stopping (the last saved checkpoint is intact)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def optimiser_step(step: int, grad_accum: int, gen_every: int, generator: Updater, critic: Updater,
                   generator_micro, critic_micro, after_generator_step=None) -> dict:
    """One optimiser step of the loop; returns the metrics row (without 'step').

    generator_micro(i) / critic_micro(i): one micro-step's forward + backward (see Updater.accumulate).
    after_generator_step(): e.g. the EMA update, called right after the generator's optimiser step.
    """
    row = {}
    if is_generator_step(step, gen_every):
        out = generator.accumulate(grad_accum, generator_micro)
        row["generator_grad_norm"] = generator.step(out["loss"])
        row["generator_loss"] = out.pop("loss")
        row.update(out)
        if after_generator_step is not None:
            after_generator_step()
    out = critic.accumulate(grad_accum, critic_micro)
    row["critic_grad_norm"] = critic.step(out["loss"])
    row["critic_loss"] = out.pop("loss")
    row.update(out)
    return row
