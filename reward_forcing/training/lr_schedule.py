"""Learning-rate schedules, applied by the training loop to every network a trainer optimises
(reward_forcing/training/loop.py).

    lr_schedule: constant   the base rate throughout (after the warm-up)
    lr_schedule: cosine     half a cosine from the base rate down to 0 at max_steps (SGDR, arXiv 1608.03983 §3)
    lr_warmup_steps: N      a linear ramp over the first N optimiser steps, before either

The factor is a function of the loop step only, so a resumed run continues on the same curve and the
optimiser's state needs nothing extra. The papers' distillation recipes use constant rates (Reward Forcing,
arXiv 2512.04678 §4.1), the default.
"""
import math

from reward_forcing.errors import ConfigError

def check_lr_schedule(cfg) -> None:
    """A one-line error for a negative warm-up."""
    warmup = cfg.lr_warmup_steps
    if warmup < 0:
        raise ConfigError(f"lr_warmup_steps must be an integer >= 0; got {warmup!r}")


def lr_factor(schedule: str, step: int, max_steps: int, warmup: int) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based) of `max_steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ScheduledRate:
    """Sets an optimiser's per-group rates to base x lr_factor(step) before each of its steps."""

    def __init__(self, optimizer, cfg):
        self.optimizer, self.schedule = optimizer, cfg.lr_schedule
        self.max_steps, self.warmup = int(cfg.max_steps), int(cfg.lr_warmup_steps)
        self.base = [group["lr"] for group in optimizer.param_groups]

    def set(self, step: int) -> None:
        factor = lr_factor(self.schedule, step, self.max_steps, self.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor
