"""Training data in a keyed order, so any position can be read without replaying the stream: prompts (distillation,
reward feedback) and ODE pairs / latents (reward_forcing/training/ode_data.py; the ODE and diffusion trainers).

Position p of a stream is item perm_e[p mod N] with e = p // N and perm_e a permutation seeded by
(seed, stream, e): every epoch is reshuffled (upstream never called set_epoch), nothing is dropped,
and the data position to resume from is one integer.
"""
import torch

from reward_forcing.errors import ConfigError
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


class PairBatches:
    """Batch `micro` of optimiser step `step` on this rank: a keyed reshuffle of the pairs every epoch,
    so a resumed or re-sharded run reads exactly what an uninterrupted one would."""

    def __init__(self, dataset, seed: int, batch_size: int, grad_accum: int, rank: int, world_size: int):
        self.dataset = dataset
        self.order = PromptStream(list(range(len(dataset))), seed, "ode_pairs")
        self.batch_size, self.grad_accum, self.rank, self.world_size = batch_size, grad_accum, rank, world_size

    def first_sample(self, step: int, micro: int) -> int:
        """The global index of this rank's first sample of micro-batch `micro` of step `step`."""
        return ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size

    def __call__(self, step: int, micro: int) -> tuple[list[str], torch.Tensor]:
        first = self.first_sample(step, micro)
        items = [self.dataset[self.order[first + b]] for b in range(self.batch_size)]
        return [item["prompts"] for item in items], torch.stack([item["ode_latent"] for item in items])


def open_pairs(cfg, run):
    """The dataset at `data_path` and this rank's batches of it."""
    from reward_forcing.training.ode_data import OdePairDataset

    dataset = OdePairDataset(cfg.data_path)
    return dataset, PairBatches(dataset, run.seed, cfg.batch_size, cfg.grad_accum, run.info.data_rank,
                                run.info.data_world)


def check_first_frame_prob(cfg) -> None:
    """`first_frame_prob` (trainers distill and ode) is a probability."""
    if not 0.0 <= cfg.first_frame_prob <= 1.0:
        raise ConfigError(f"first_frame_prob is a probability, got {cfg.first_frame_prob}")


def check_first_frames(dataset, channels: int, latent_hw) -> None:
    """ODE pairs whose clean frame 0 can start this student's rollouts ([K, C, F, h, w] with its C and h, w)."""
    shape = tuple(dataset[0]["ode_latent"].shape)
    if shape[1] != channels or tuple(shape[3:]) != tuple(latent_hw):
        raise ConfigError(f"ODE pairs of latents {list(shape[1:])} [C, F, h, w] cannot start rollouts of "
                          f"{channels} channels at {latent_hw[0]}x{latent_hw[1]} latents")
