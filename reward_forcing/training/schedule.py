"""The update schedule of two-network distillation (`schedule: corrected | upstream`).

`corrected` (the intended one; one loop step = one optimiser step of each network that steps): one
optimiser step = `grad_accum` micro-steps (each loss already divided by `grad_accum`) -> clip -> step ->
zero_grad. The critic steps on every optimiser step; the generator on every `gen_every`-th one (step 0
included), before the critic, as upstream orders them.

`upstream` (one loop step = one iteration of upstream's loop, trainer/rewarded_distillation.py `train()` in
JaydenLyh/Reward-Forcing, which trained the released weights): every `gen_every * grad_accum`-th iteration one
generator micro-step, clip, step; then one critic micro-step onto the critic's unzeroed gradient, clip (a
partial sum), step; and on every `grad_accum`-th iteration both networks step again on the same gradient and
are zeroed. The generator thus makes two steps per event on one micro-batch's 1/grad_accum-scaled gradient.
"""
import math

import torch

from reward_forcing.errors import UserError


class TrainingDiverged(UserError):
    """A loss became NaN / inf; the run stops before touching the last good checkpoint."""


def is_generator_step(step: int, gen_every: int) -> bool:
    return step % gen_every == 0


def micro_batches_before(schedule: str, step: int, grad_accum: int, gen_every: int) -> tuple[int, int]:
    """(generator, critic) micro-batches run by the loop steps before `step` (each is world * batch samples)."""
    if schedule == "corrected":
        return -(-step // gen_every) * grad_accum, step * grad_accum
    return -(-step // (gen_every * grad_accum)), step


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
    """One network's optimiser with clipping: accumulate -> clip -> step -> zero_grad. reduce_every_micro_step:
    FSDP reduce-scatters after every micro-step and accumulates sharded gradients, instead of accumulating the
    unsharded fp32 gradient (the whole network's numel x 4 bytes on every rank) until the last micro-step."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 reduce_every_micro_step: bool = False):
        self.name, self.model, self.optimizer, self.grad_clip = name, model, optimizer, grad_clip
        self.reduce_every_micro_step = reduce_every_micro_step

    def accumulate(self, grad_accum: int, micro_step) -> dict:
        """Run `micro_step(i)` for i < grad_accum; each returns a dict with a scalar tensor 'loss' (already
        backpropagated and divided by grad_accum) plus metrics. Returns the summed loss, the min / max of
        metrics named `*_min` / `*_max`, and the mean of the others."""
        totals = {}
        for index in range(grad_accum):
            _set_gradient_sync(self.model, self.reduce_every_micro_step or index == grad_accum - 1)
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

    def clip(self, loss: float) -> float:
        """Clip the gradient held now; refuses a non-finite loss or gradient. Returns the norm before clipping."""
        if not _finite_everywhere(loss, self.model):
            raise TrainingDiverged(f"{self.name} loss is {loss} (on this or another rank); stopping "
                                   "(the last saved checkpoint is intact)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise TrainingDiverged(f"{self.name} gradient norm is {norm}; stopping (the last saved checkpoint is intact)")
        return norm

    def step(self, loss: float) -> float:
        """Clip, step and zero the gradients; refuses to step on a non-finite loss or gradient."""
        norm = self.clip(loss)
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


def upstream_iteration(step: int, grad_accum: int, gen_every: int, generator: Updater, critic: Updater,
                       generator_micro, critic_micro, after_generator_step=None) -> dict:
    """One iteration of upstream's loop (module docstring), arguments as optimiser_step's; `step` counts
    iterations. generator_micro / critic_micro are called with micro index 0 and still divide by grad_accum."""
    row = {}
    generator_event = step % (gen_every * grad_accum) == 0
    if generator_event:
        out = generator.accumulate(1, generator_micro)
        row["generator_grad_norm"] = generator.clip(out["loss"])
        row["generator_loss"] = out.pop("loss")
        row.update(out)
        _optimizer_step(generator, after_generator_step)
    out = critic.accumulate(1, critic_micro)  # onto the critic's unzeroed gradient sum
    row["critic_grad_norm"] = critic.clip(out["loss"])
    row["critic_loss"] = out.pop("loss")
    row.update(out)
    _optimizer_step(critic)
    if step % grad_accum == 0:  # upstream's "accumulation boundary": a second step on the same gradient
        if generator_event:
            _optimizer_step(generator, after_generator_step)
            generator.optimizer.zero_grad(set_to_none=True)
        _optimizer_step(critic)
        critic.optimizer.zero_grad(set_to_none=True)
    return row


def _optimizer_step(updater: Updater, after=None) -> None:
    updater.optimizer.step()
    if after is not None:
        after()
