"""Exponential moving average of the generator's parameters (fp32 shadow, sharded like the model)."""
import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        # Under FSDP2 the parameters are sharded DTensors; their clones stay sharded, so each rank keeps a shard.
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state.items():
                self.shadow[name].copy_(value)


def ema_after_step(ema, model: torch.nn.Module, decay, start: int, step: int):
    """The EMA after optimiser step `step`: none while `decay` is None or before step `start`, created from the
    model at `start`, updated on every later step."""
    if decay is None or step < start:
        return ema
    if ema is None:
        return EMA(model, decay)
    ema.update(model)
    return ema
