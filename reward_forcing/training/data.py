"""Training prompts, ordered by a keyed shuffle so any position can be read without replaying the stream.

Position p of a stream is prompt perm_e[p mod N] with e = p // N and perm_e a permutation seeded by
(seed, stream, e): every epoch is reshuffled (upstream never called set_epoch), nothing is dropped,
and the data position to resume from is one integer.
"""
import torch

from reward_forcing.rng import keyed_generator
from reward_forcing.video import read_prompts


def read_prompt_texts(path) -> list[str]:
    """The prompts of a prompt file, blank lines skipped (reward_forcing/video.py's read_prompts, texts only)."""
    return [prompt.text for prompt in read_prompts(path)[0]]


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
