"""Exponential moving average of a network's parameters (fp32 shadow, sharded like the model), and the one policy
every trainer follows for it (reward_forcing/training/loop.py)."""
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


class EmaPolicy:
    """When the EMA of the tracked network exists and moves: none while `decay` is None or before loop step
    `start`; made from the weights after the network's first optimiser step at a loop step >= `start`; updated
    after every later one. `average` is the EMA (None until made)."""

    def __init__(self, model: torch.nn.Module | None, decay: float | None, start: int):
        self.model, self.decay, self.start = model, decay, int(start)
        self.average = None

    @property
    def enabled(self) -> bool:
        return self.model is not None and self.decay is not None

    def make(self) -> None:
        """Copy the tracked weights now (also before a resumed checkpoint fills the saved EMA in)."""
        self.average = EMA(self.model, self.decay)

    def update(self) -> None:
        """Blend the tracked weights in, if the EMA exists."""
        if self.average is not None:
            self.average.update(self.model)

    def stepped(self, step: int) -> None:
        """Call after each optimiser step of the tracked network, at loop step `step`."""
        if not self.enabled or step < self.start:
            return
        if self.average is None:
            self.make()
        else:
            self.update()
