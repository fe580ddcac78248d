"""ODE-regression initialisation of the causal student (CausVid, arXiv 2412.07772 §4.3; upstream's
model/ode_regression.py).

Each training pair holds K recorded states of one teacher trajectory, noisiest first. Per sample,
every chunk of frames draws one state index; the student sees that state labelled with the
matching entry of `state_timesteps(cfg)` (a K-entry list ending in 0), runs its block-causal training
forward, and regresses its x0 prediction onto the clean (last) state on the frames whose label is
not 0. The label t is both the model's timestep input and, through the schedule's sigma(t), the sigma
of x0 = x_t - sigma * v, as upstream's wrapper converts with the sigma of the timestep it fed.
"""
from pathlib import Path

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.sampling import FlowMatchSchedule, warped_steps


def state_timesteps(cfg) -> list[float]:
    """The timestep label of each recorded state: `ode_timesteps`, warped at `ode_shift` when `ode_warp_timesteps`
    (upstream's `warp_denoising_step` on its ODE generator's scheduler, WanDiffusionWrapper's default shift 8).
    Warped, [1000, 750, 500, 250, 0] becomes 1000 * (1, 0.96, 0.889, 0.727, 0): the recorded sigmas of the
    pairs (48 Euler steps at shift 8, kept at steps 0, 12, 24, 36, 48). Unwarped (upstream's default config), a
    state at sigma 0.96 is labelled 750 and converted with sigma 0.75."""
    steps = [float(t) for t in cfg.ode_timesteps]
    return warped_steps(steps, cfg.ode_shift) if cfg.ode_warp_timesteps else steps


def state_schedule(cfg) -> FlowMatchSchedule:
    """The sigma(t) of the x0 conversion: the grid the labels were warped on (the pairs' shift)."""
    return FlowMatchSchedule(cfg.ode_shift, sigma_lookup=cfg.sigma_lookup)


def sample_state_indices(batch_size: int, num_frames: int, frames_per_block: int, num_states: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, F] state indices, uniform over range(num_states), one draw per chunk of frames."""
    if num_frames % frames_per_block:
        raise ConfigError(f"ODE pairs have {num_frames} latent frames, not a multiple of "
                          f"num_frame_per_block={frames_per_block}")
    per_block = torch.randint(0, num_states, (batch_size, num_frames // frames_per_block), generator=generator)
    return per_block.repeat_interleave(frames_per_block, dim=1)


def gather_states(ode_latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick, per sample and frame, state index[b, f] of ode_latent [B, K, C, F, H, W] -> [B, C, F, H, W]."""
    b, _, c, f, h, w = ode_latent.shape
    index = index.to(ode_latent.device).reshape(b, 1, 1, f, 1, 1).expand(b, 1, c, f, h, w)
    return ode_latent.gather(1, index).squeeze(1)


def ode_regression_loss(pred_x0: torch.Tensor, clean: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the frames whose timestep is not 0 (pred_x0, clean: [B, C, F, H, W]; t: [B, F]).

    When every frame of the batch is already clean there is nothing to regress; the loss is then 0
    (still attached to the graph) rather than upstream's NaN mean over an empty set.
    """
    mask = (timesteps != 0).to(pred_x0.device)
    error = (pred_x0.float() - clean.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    if not mask.any():
        return error.sum() * 0.0
    return error[mask].mean()


def student_inputs(ode_latent: torch.Tensor, timestep_list, frames_per_block: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input [B, C, F, H, W] and per-frame timesteps [B, F] for a batch of pairs."""
    b, k, _, f = ode_latent.shape[:4]
    if len(timestep_list) != k:
        raise ConfigError(f"ode_timesteps has {len(timestep_list)} entries but the ODE pairs hold {k} states")
    index = sample_state_indices(b, f, frames_per_block, k, generator)
    timesteps = torch.as_tensor(list(timestep_list), dtype=torch.float32)[index]
    return gather_states(ode_latent, index), timesteps.to(ode_latent.device)


def ode_loss(model, schedule, ode_latent: torch.Tensor, context: torch.Tensor, timestep_list,
             frames_per_block: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One regression loss: block-causal student forward (no cache) on a random state per chunk."""
    noisy, timesteps = student_inputs(ode_latent, timestep_list, frames_per_block, generator)
    flow = model(noisy, timesteps, context)
    pred_x0 = schedule.flow_to_x0(flow, noisy, timesteps)
    return ode_regression_loss(pred_x0, ode_latent[:, -1], timesteps)


# --- the training loop (`train.py` with `trainer: ode`) -----------------------------------------

def load_student(cfg, info, dtype):
    """The causal student, sharded: architecture from the base Wan folder, weights from `generator_ckpt`
    when given (strict), else the base folder's. Only rank 0 reads the full weights."""
    from functools import partial

    from reward_forcing.checkpoints import asset_path, load_generator_state_dict, load_wan_folder, read_wan_config
    from reward_forcing.models.causal_wan import CausalWanModel
    from reward_forcing.training.parallel import load_sharded

    base = asset_path(cfg, cfg.model_name)
    init = asset_path(cfg, cfg.generator_ckpt) if cfg.generator_ckpt else None
    build = partial(CausalWanModel.from_config, read_wan_config(base), num_frame_per_block=cfg.num_frame_per_block,
                    local_attn_size=cfg.local_attn_size)
    weights = (lambda: load_generator_state_dict(init)) if init else (lambda: load_wan_folder(base)[1])
    return load_sharded(build, weights, info, dtype, str(init or base))


def load_text_encoder(cfg, info, dtype):
    from reward_forcing.checkpoints import asset_path
    from reward_forcing.models.text_encoder import TextEncoder
    from reward_forcing.training.parallel import shard_model

    encoder = TextEncoder.from_wan_folder(asset_path(cfg, cfg.model_name), cfg.text_encoder, device="cpu",
                                          dtype=torch.float32)
    shard_model(encoder.model.requires_grad_(False), info, dtype)  # the umT5 stack; the wrapper only tokenises
    return encoder


def check_pairs(dataset, model, timestep_list, frames_per_block: int) -> None:
    """Refuse pairs that cannot train this student, before any step runs."""
    states, channels, frames = dataset[0]["ode_latent"].shape[:3]
    if channels != model.in_dim:
        raise ConfigError(f"ODE pairs have {channels} latent channels but the student takes {model.in_dim}")
    if len(timestep_list) != states:
        raise ConfigError(f"ode_timesteps has {len(timestep_list)} entries but the ODE pairs hold {states} states")
    if list(timestep_list)[-1] != 0:
        raise ConfigError(f"ode_timesteps must end with 0 (the clean state), got {list(timestep_list)}")
    if frames % frames_per_block:
        raise ConfigError(f"ODE pairs have {frames} latent frames, not a multiple of "
                          f"num_frame_per_block={frames_per_block}")


class PairBatches:
    """Batch `micro` of optimiser step `step` on this rank: a keyed reshuffle of the pairs every epoch,
    so a resumed or re-sharded run reads exactly what an uninterrupted one would."""

    def __init__(self, dataset, seed: int, batch_size: int, grad_accum: int, rank: int, world_size: int):
        from reward_forcing.training.data import PromptStream

        self.dataset = dataset
        self.order = PromptStream(list(range(len(dataset))), seed, "ode_pairs")
        self.batch_size, self.grad_accum, self.rank, self.world_size = batch_size, grad_accum, rank, world_size

    def __call__(self, step: int, micro: int) -> tuple[list[str], torch.Tensor]:
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        items = [self.dataset[self.order[first + b]] for b in range(self.batch_size)]
        return [item["prompts"] for item in items], torch.stack([item["ode_latent"] for item in items])


def run(cfg, logdir, args) -> None:
    """ODE-regression training; checkpoints resume, and `<logdir>/ode_init.pt` holds {"generator": ...}."""
    from reward_forcing.training.metrics import MetricsLogger, learning_rates, reduce_across_ranks
    from reward_forcing.training.ode_data import OdePairDataset
    from reward_forcing.training.parallel import compute_dtype, init_distributed, resolve_seed, shutdown
    from reward_forcing.training.rng import keyed_generator
    from reward_forcing.training.lr_schedule import ScheduledRate
    from reward_forcing.training.schedule import Updater
    from reward_forcing.training.state import (
        ModelState, OptimizerState, export_weights, full_state_dict, load_checkpoint, read_meta, resume_folder,
        save_checkpoint)

    if cfg.data_path is None:
        raise ConfigError("trainer 'ode' needs data_path=<ODE pairs> (see scripts/generate_ode_pairs.py)")
    dataset = OdePairDataset(cfg.data_path)
    info = init_distributed(cfg.fsdp_replicate)
    try:
        resumed = resume_folder(logdir, args.resume)
        # a resumed run keeps its seed, so it reads the same pairs and draws the same state indices
        seed = resolve_seed(cfg.seed) if resumed is None else int(read_meta(resumed)["seed"])
        dtype = compute_dtype(cfg.mixed_precision, info.device)
        model = load_student(cfg, info, dtype).train()
        labels = state_timesteps(cfg)
        check_pairs(dataset, model, labels, cfg.num_frame_per_block)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_generator, betas=tuple(cfg.adam_betas),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        rate = ScheduledRate(optimizer, cfg)
        updater = Updater("generator", model, optimizer, cfg.grad_clip)
        parts = {"generator": ModelState(model), "generator_optimizer": OptimizerState(model, optimizer)}
        text_encoder = load_text_encoder(cfg, info, dtype)
        schedule = state_schedule(cfg)
        batches = PairBatches(dataset, seed, cfg.batch_size, cfg.grad_accum, info.rank, info.world_size)

        start = 0 if resumed is None else load_checkpoint(resumed, parts)["step"]
        logger = MetricsLogger(logdir, info.is_main, "disabled" if args.disable_wandb else cfg.wandb_mode, cfg,
                               cfg.wandb_project, cfg.wandb_run_name, resume_step=start if resumed else None)

        def micro_step(step, micro):
            prompts, ode_latent = batches(step, micro)
            context = text_encoder.encode(prompts)
            generator = keyed_generator(seed, "ode_state_index", step, micro, info.rank)
            loss = ode_loss(model, schedule, ode_latent.to(info.device), context, labels,
                            cfg.num_frame_per_block, generator)
            (loss / cfg.grad_accum).backward()
            return {"loss": loss.detach() / cfg.grad_accum}

        def save(done):
            save_checkpoint(logdir, done, parts, {"seed": seed}, keep=cfg.keep_checkpoints)
            weights = full_state_dict(model)
            if info.is_main:
                export_weights(Path(logdir) / "ode_init", {"generator": weights})

        for step in range(start, cfg.max_steps):
            out = updater.accumulate(cfg.grad_accum, lambda micro: micro_step(step, micro))
            rate.set(step)
            grad_norm = updater.step(out["loss"])
            done = step + 1
            logger.log(done, {**reduce_across_ranks(out, info.device), "grad_norm": grad_norm,
                              **learning_rates(generator=optimizer)})
            if not args.no_save and (done % cfg.save_every == 0 or done == cfg.max_steps):
                save(done)
        logger.close()
    finally:
        shutdown()

