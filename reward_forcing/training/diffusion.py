"""Flow-matching training of the bidirectional WanModel on a latent dataset: `train.py` with `trainer: diffusion`.

Per sample: t = 1000 * shift(u) with u ~ U{0, .., 999} / 1000 (`diffusion_timestep_shift`), x_t = (1 - sigma) x0 +
sigma * noise, and the model's flow is regressed onto noise - x0 (rectified flow, as Wan is trained; Wan2.1
report, arXiv 2503.20314 §2.3). A fraction `diffusion_text_dropout` of the samples is conditioned on
`negative_prompt` instead of its own, so the model also learns the unconditional flow that classifier-free
guidance needs. Every draw is keyed by (seed, purpose, step, global sample index), so runs resume exactly and
do not depend on the number of ranks. The loop machinery (FSDP2, DCP checkpoints, EMA, metrics) is the
distillation trainer's; the data reader and batching are the ODE trainer's (reward_forcing/training/ode.py).

Outputs: `<logdir>/model/` and, with EMA, `<logdir>/model_ema/`: Wan folders (config.json +
diffusion_pytorch_model.safetensors) that `real_name`, `fake_name`, `ode_teacher_name` and `generator_ckpt` take.
"""
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from reward_forcing.errors import ConfigError


def sample_timesteps(seed: int, step: int, sample_ids, shift: float) -> torch.Tensor:
    """Per-sample training timesteps [B] (float32): 1000 * shift(u), u on the 1000-point grid in [0, 1)."""
    from reward_forcing.training.losses import score_timesteps
    from reward_forcing.rng import keyed_randint

    draws = torch.tensor([keyed_randint(1000, seed, "diffusion", "t", step, i) for i in sample_ids])
    return score_timesteps(draws, shift, 0.0, 1000.0).float()


def dropped_text(seed: int, step: int, sample_ids, rate: float) -> list[bool]:
    """Which samples are trained on the negative prompt (keyed, so a resumed run drops the same ones)."""
    from reward_forcing.rng import keyed_generator

    return [float(torch.rand(1, generator=keyed_generator(seed, "diffusion", "text_dropout", step, i))) < rate
            for i in sample_ids]


def flow_matching_loss(model, schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       context: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model's flow at x_t and the rectified-flow target noise - x0."""
    x_t = schedule.add_noise(x0, noise, t)
    flow = model(x_t, t, context)
    return (flow.float() - schedule.training_target(x0.float(), noise.float())).pow(2).mean()


def export_wan_folder(folder, config: dict, state_dict: dict) -> None:
    """Rank 0: a Wan folder (config.json + diffusion_pytorch_model.safetensors), replaced atomically."""
    from safetensors.torch import save_file

    from reward_forcing.checkpoints import WAN_CONFIG, WAN_WEIGHTS

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / WAN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / WAN_WEIGHTS))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    from reward_forcing.training.metrics import notice

    notice(f"exported the model to {folder}")


def load_model(cfg, info, dtype):
    """The bidirectional Wan model of folder `model_name`, sharded per block; only rank 0 reads the weights."""
    from reward_forcing.checkpoints import asset_path, load_wan_folder, read_wan_config
    from reward_forcing.models.wan import WanModel
    from reward_forcing.training.parallel import load_sharded

    folder = asset_path(cfg, cfg.model_name)
    config = read_wan_config(folder)
    model = load_sharded(partial(WanModel.from_config, config), lambda: load_wan_folder(folder)[1], info, dtype,
                         str(folder))
    return model, config


def run(cfg, logdir, args) -> None:
    from reward_forcing.sampling import FlowMatchSchedule
    from reward_forcing.training.ema import EMA
    from reward_forcing.training.metrics import MetricsLogger, learning_rates, reduce_across_ranks
    from reward_forcing.training.ode import PairBatches, load_text_encoder
    from reward_forcing.training.ode_data import OdePairDataset
    from reward_forcing.distributed import compute_dtype
    from reward_forcing.training.parallel import init_distributed, resolve_seed, shutdown
    from reward_forcing.training.rollout import sample_noise
    from reward_forcing.training.lr_schedule import ScheduledRate
    from reward_forcing.training.schedule import Updater
    from reward_forcing.training.state import (
        ModelState, OptimizerState, full_state_dict, full_tensors, load_checkpoint, read_meta, resume_folder,
        save_checkpoint)

    if cfg.data_path is None:
        raise ConfigError("trainer 'diffusion' needs data_path=<latent dataset> (reward_forcing/training/ode_data.py)")
    if not 0 <= cfg.diffusion_text_dropout <= 1:
        raise ConfigError(f"diffusion_text_dropout must lie in [0, 1], got {cfg.diffusion_text_dropout}")
    dataset = OdePairDataset(cfg.data_path)
    logdir = Path(logdir)
    info = init_distributed(cfg.fsdp_replicate)
    try:
        resumed = resume_folder(logdir, args.resume)
        meta = read_meta(resumed) if resumed is not None else {}
        seed = int(meta["seed"]) if meta else resolve_seed(int(cfg.seed))
        dtype = compute_dtype(cfg.mixed_precision, info.device)
        model, wan_config = load_model(cfg, info, dtype)
        channels = dataset[0]["ode_latent"].shape[1]
        if channels != model.in_dim:
            raise ConfigError(f"the latent dataset has {channels} channels but {cfg.model_name} takes {model.in_dim}")
        model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        model.train()
        # foreach: one op per step for all (DTensor) parameters; PyTorch's CPU default updates them one by one,
        # which costs more than the forward of a small model
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_generator, betas=tuple(cfg.adam_betas),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_eps, foreach=True)
        rate = ScheduledRate(optimizer, cfg)
        updater = Updater("model", model, optimizer, cfg.grad_clip)
        ema = EMA(model, cfg.ema_decay) if meta.get("has_ema") else None

        def parts():
            out = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
            return dict(out, ema=ema) if ema is not None else out

        start = load_checkpoint(resumed, parts())["step"] if resumed is not None else 0
        text_encoder = load_text_encoder(cfg, info, dtype)
        schedule = FlowMatchSchedule(cfg.timestep_shift, sigma_lookup=cfg.sigma_lookup)
        batches = PairBatches(dataset, seed, cfg.batch_size, cfg.grad_accum, info.rank, info.world_size)
        logger = MetricsLogger(logdir, info.is_main, "disabled" if args.disable_wandb else cfg.wandb_mode, cfg,
                               cfg.wandb_project, cfg.wandb_run_name, resume_step=start if resumed else None)

        def micro_step(step, micro):
            prompts, latents = batches(step, micro)
            first = ((step * cfg.grad_accum + micro) * info.world_size + info.rank) * cfg.batch_size
            ids = list(range(first, first + cfg.batch_size))
            drop = dropped_text(seed, step, ids, float(cfg.diffusion_text_dropout))
            context = text_encoder.encode([cfg.negative_prompt if d else p for p, d in zip(prompts, drop)]).to(dtype)
            x0 = latents[:, -1].to(info.device, dtype)
            noise = sample_noise(tuple(x0.shape[1:]), seed, "diffusion", "noise", step, sample_ids=ids, dtype=dtype,
                                 device=info.device)
            t = sample_timesteps(seed, step, ids, float(cfg.diffusion_timestep_shift)).to(info.device)
            loss = flow_matching_loss(model, schedule, x0, noise, t, context) / cfg.grad_accum
            loss.backward()
            return {"loss": loss.detach()}

        def save(done):
            save_checkpoint(logdir, done, parts(), {"seed": seed, "has_ema": ema is not None},
                            keep=cfg.keep_checkpoints)
            weights = full_state_dict(model)
            averaged = full_tensors(ema.state_dict(), keep=info.is_main) if ema is not None else None
            if info.is_main:
                export_wan_folder(logdir / "model", wan_config, weights)
                if averaged is not None:
                    export_wan_folder(logdir / "model_ema", wan_config, dict(weights, **averaged))

        from tqdm import tqdm

        for step in tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not info.is_main,
                         desc="diffusion"):
            began = time.perf_counter()
            out = updater.accumulate(cfg.grad_accum, partial(micro_step, step))
            rate.set(step)
            grad_norm = updater.step(out["loss"])
            if cfg.ema_decay is not None and step >= cfg.ema_start:
                if ema is None:
                    ema = EMA(model, cfg.ema_decay)
                else:
                    ema.update(model)
            done = step + 1
            row = reduce_across_ranks(out, info.device)
            logger.log(done, {**row, "grad_norm": grad_norm, "step_time": time.perf_counter() - began,
                              **learning_rates(model=optimizer)})
            if not args.no_save and (done % cfg.save_every == 0 or done == cfg.max_steps):
                save(done)
        logger.close()
    finally:
        shutdown()
