"""The training loop every trainer runs inside (`train.py`; the trainers are reward_forcing/training/{distill, ode,
diffusion, reward_feedback}.py).

A trainer is a `Method`: the networks it builds, its loop step (micro-steps and optimiser steps) and what it
exports. The rest is here, once: the process group, resuming from the latest complete checkpoint
(reward_forcing/training/state.py), the run's seed and compute dtype, the EMA (one policy,
reward_forcing/training/ema.py), learning-rate schedules, metrics.jsonl and wandb, checkpoints every `save_every`
steps, progress, and a one-line summary at the end. A run already at `max_steps` says so before loading anything.
"""
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from reward_forcing.distributed import compute_dtype
from reward_forcing.progress import progress
from reward_forcing.training.ema import EmaPolicy
from reward_forcing.training.lr_schedule import ScheduledRate
from reward_forcing.training.metrics import MetricsLogger, learning_rates, notice, reduce_across_ranks
from reward_forcing.training.parallel import init_distributed, resolve_seed, shutdown
from reward_forcing.training.schedule import Updater
from reward_forcing.training.sequence_parallel import check_sequence_parallel
from reward_forcing.training.state import (
    ModelState,
    OptimizerState,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    resume_folder,
    save_checkpoint,
)

PROGRESS_KEYS = ("loss", "generator_loss", "critic_loss", "reward")  # the metrics a progress line shows


@dataclass
class Run:
    """What a method is given: the settings, where it runs, and the run's identity (seed, dtype, resume point)."""
    cfg: object
    logdir: Path
    info: object                 # reward_forcing.training.parallel.DistInfo
    seed: int
    dtype: torch.dtype
    resumed: Path | None = None  # the checkpoint folder this run continues from
    meta: dict = field(default_factory=dict)  # its meta.json ({} for a fresh run)

    @classmethod
    def open(cls, cfg, logdir, info, resume=None) -> "Run":
        """Collective. A resumed run keeps its seed, since every random draw is keyed by it (seed 0 = one drawn by
        rank 0 and shared, as upstream)."""
        resumed = resume_folder(logdir, resume)
        meta = read_meta(resumed) if resumed is not None else {}
        seed = int(meta["seed"]) if meta else resolve_seed(int(cfg.seed))
        torch.manual_seed(seed + info.data_rank)
        return cls(cfg, Path(logdir), info, seed, compute_dtype(cfg.mixed_precision, info.device), resumed, meta)

    @property
    def global_batch(self) -> int:
        """Samples per micro-step over all data-parallel ranks (a sequence-parallel group counts once)."""
        return self.info.data_world * self.cfg.batch_size

    def sample_ids(self, micro: int) -> list[int]:
        """This rank's samples among the grad_accum * global_batch samples of one optimiser step (the ranks of one
        sequence-parallel group run the same ones)."""
        first = (micro * self.info.data_world + self.info.data_rank) * self.cfg.batch_size
        return list(range(first, first + self.cfg.batch_size))


class Method(ABC):
    """A training method. Subclasses build their networks in `__init__(run)`, registering each trained one with
    `add_network`, and define `step` and `export`. `ema_of` names the network the EMA follows (None: no EMA); the
    loop sets `self.ema` (an EmaPolicy) before the first step, and `step` calls `self.ema.stepped(step)` after each
    optimiser step of that network (SingleNetworkMethod does)."""
    name = "train"
    ema_of: str | None = None
    dit_folders = ("model_name",)  # config keys of the Wan folders whose DiTs it builds (split by sequence_parallel)

    def __init__(self, run: Run):
        self.run, self.cfg, self.info = run, run.cfg, run.info
        self.networks: dict[str, Updater] = {}
        self.ema = EmaPolicy(None, None, 0)

    @classmethod
    def check(cls, cfg) -> None:
        """One-line errors for settings this method cannot run, before any process group or model exists."""

    def add_network(self, name: str, model: torch.nn.Module, lr: float) -> Updater:
        """Train `model` with AdamW at rate `lr` (the shared betas, weight decay and eps) and global-norm clipping.
        foreach: one op per step for all (DTensor) parameters, as PyTorch does on CUDA by default; its CPU default
        updates them one by one, which costs more than the forward of a small model."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.adam_betas),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_eps, foreach=True)
        self.networks[name] = Updater(name, model, optimizer, cfg.grad_clip, cfg.fsdp_reduce_every_micro_step)
        return self.networks[name]

    @abstractmethod
    def step(self, step: int) -> dict:
        """Loop step `step` (0-based): its micro-steps and optimiser steps; returns this rank's metrics row."""

    @abstractmethod
    def export(self, average) -> list[Path]:
        """Collective: write the trained weights (`average`: the EMA or None); returns the files rank 0 wrote."""

    def meta(self, done: int) -> dict:
        """Extra loop state for the checkpoint's meta.json after `done` steps."""
        return {}


class SingleNetworkMethod(Method):
    """A method that trains one network: `grad_accum` micro-steps -> clip -> step, the EMA following it."""

    @abstractmethod
    def micro_step(self, step: int, micro: int) -> dict:
        """Forward and backward of one micro-batch (loss divided by grad_accum); returns {'loss': ..., metrics}."""

    def step(self, step: int) -> dict:
        (network,) = self.networks.values()
        row = network.accumulate(self.cfg.grad_accum, partial(self.micro_step, step))
        row["grad_norm"] = network.step(row["loss"])
        self.ema.stepped(step)
        return row


def _parts(method: Method) -> dict:
    """The checkpointed state: each network, its optimiser, and the EMA once it exists."""
    parts = {}
    for name, network in method.networks.items():
        parts[name] = ModelState(network.model)
        parts[f"{name}_optimizer"] = OptimizerState(network.model, network.optimizer)
    if method.ema.average is not None:
        parts[f"{method.ema_of}_ema"] = method.ema.average
    return parts


def _nothing_to_do(cfg, logdir, resume) -> bool:
    """Whether the checkpoint this run would resume from is already at max_steps (read without loading models)."""
    folder = Path(resume) if resume is not None else latest_checkpoint(logdir)
    if folder is None:
        return False
    step = read_meta(folder).get("step", 0)
    if step < cfg.max_steps:
        return False
    if int(os.environ.get("RANK", 0)) == 0:  # before the process group: every rank decides, one says so
        notice(f"{logdir}: already at step {step} (max_steps={cfg.max_steps}), nothing to do")
    return True


def train(method_class, cfg, logdir, args) -> None:
    """Run `method_class` (a Method) from `cfg` in `logdir`; args: disable_wandb, no_save, resume (None or a
    checkpoint folder)."""
    method_class.check(cfg)
    check_sequence_parallel(cfg, method_class.dit_folders, int(os.environ.get("WORLD_SIZE", 1)))
    logdir = Path(logdir)
    if _nothing_to_do(cfg, logdir, args.resume):
        return
    info = init_distributed(cfg.fsdp_replicate, cfg.sequence_parallel)
    try:
        _train(method_class, Run.open(cfg, logdir, info, args.resume), args)
    finally:
        shutdown()


def _train(method_class, run: Run, args) -> None:
    cfg, info = run.cfg, run.info
    method = method_class(run)
    tracked = method.networks[method.ema_of].model if method.ema_of else None
    method.ema = EmaPolicy(tracked, cfg.ema_decay, cfg.ema_start)
    if run.meta.get("has_ema"):
        method.ema.make()  # filled from the checkpoint below
    start = load_checkpoint(run.resumed, _parts(method))["step"] if run.resumed is not None else 0
    logger = MetricsLogger(run.logdir, info.is_main, "disabled" if args.disable_wandb else cfg.wandb_mode, cfg,
                           cfg.wandb_project, cfg.wandb_run_name,
                           resume_step=start if run.resumed is not None else None)
    rates = [ScheduledRate(network.optimizer, cfg) for network in method.networks.values()]
    optimizers = {name: network.optimizer for name, network in method.networks.items()}
    began, exported = time.perf_counter(), []
    bar = progress(range(start, cfg.max_steps), method.name, total=cfg.max_steps, unit="step", initial=start,
                   enabled=info.is_main)
    for step in bar:
        step_began = time.perf_counter()
        for rate in rates:
            rate.set(step)
        row = reduce_across_ranks(method.step(step), info.device)
        row["step_time"] = time.perf_counter() - step_began
        row.update(learning_rates(**optimizers))
        done = step + 1
        logger.log(done, row)
        bar.set_postfix(**{key: f"{row[key]:.4g}" for key in PROGRESS_KEYS if key in row})
        if not args.no_save and (done % cfg.save_every == 0 or done == cfg.max_steps):
            meta = {"seed": run.seed, "has_ema": method.ema.average is not None, **method.meta(done)}
            save_checkpoint(run.logdir, done, _parts(method), meta, keep=cfg.keep_checkpoints)
            exported = method.export(method.ema.average)
    logger.close()
    if info.is_main:
        weights = ", ".join(str(path) for path in exported) if exported else "none written (--no_save)"
        notice(f"{method.name}: trained steps {start + 1}..{cfg.max_steps} of {cfg.max_steps} in "
               f"{time.perf_counter() - began:.1f} s; weights: {weights}")
