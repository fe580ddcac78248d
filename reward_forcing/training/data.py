"""Training prompts, ordered by a keyed shuffle so any position can be read without replaying the stream.

Position p of a stream is prompt perm_e[p mod N] with e = p // N and perm_e a permutation seeded by
(seed, stream, e): every epoch is reshuffled (upstream never called set_epoch), nothing is dropped,
and the data position to resume from is one integer.
"""
from pathlib import Path

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.training.rng import keyed_generator


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts")
    return prompts


class PromptStream:
    def __init__(self, prompts: list[str], seed: int, stream: str):
        self.prompts, self.seed, self.stream = prompts, seed, stream
        self._epoch, self._perm = None, None

    def __getitem__(self, position: int) -> str:
        epoch, index = divmod(position, len(self.prompts))
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(len(self.prompts), generator=keyed_generator(self.seed, self.stream, epoch))
        return self.prompts[int(self._perm[index])]
