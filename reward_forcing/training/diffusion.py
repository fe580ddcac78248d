"""Flow-matching training on a latent dataset, `train.py` with `trainer: diffusion`: of the bidirectional WanModel, or
(`causal: true`) of the causal student's architecture as an autoregressive diffusion model with teacher forcing.

Per sample: t = 1000 * shift(u) with u ~ U{0, .., 999} / 1000 (`diffusion_timestep_shift`), x_t = (1 - sigma) x0 +
sigma * noise, and the model's flow is regressed onto noise - x0 (rectified flow, as Wan is trained; Wan2.1
report, arXiv 2503.20314 §2.3). A fraction `diffusion_text_dropout` of the samples is conditioned on
`negative_prompt` instead of its own, so the model also learns the unconditional flow that classifier-free
guidance needs. Every draw is keyed by (seed, purpose, step, global sample index), so runs resume exactly and
do not depend on the number of ranks. The data are read and batched as the ODE trainer's pairs
(reward_forcing/training/data.py).

Causal (Causal Forcing's stage 1, arXiv 2602.02214 §4; upstream's model/diffusion.py with `teacher_forcing: true`
in thu-ml/Causal-Forcing): the CausalWanModel (`model_name`'s architecture; weights from `generator_ckpt`, else
that folder's) draws one timestep per chunk of `num_frame_per_block` frames and sees the sequence [clean || noisy]
in one forward (CausalWanModel.forward with clean_x): each noisy chunk attends to itself and to the clean chunks
before it, which is what it attends to when it streams. Upstream weights each chunk's loss by its scheduler's
training_weight (a bell around t = 500); the loss here is unweighted, as for the bidirectional model.

Outputs: `<logdir>/model/` and, with EMA, `<logdir>/model_ema/`: Wan folders (config.json +
diffusion_pytorch_model.safetensors) that `real_name`, `fake_name`, `ode_teacher_name` and `generator_ckpt` take
(a causal run's: `ode_teacher_name` with `ode_teacher_causal: true`, and `generator_ckpt`).
"""
import math

import torch

from reward_forcing.checkpoints import asset_path, read_wan_config
from reward_forcing.errors import ConfigError
from reward_forcing.sampling import FlowMatchSchedule
from reward_forcing.training.loop import SingleNetworkMethod
from reward_forcing.training.data import open_pairs
from reward_forcing.training.losses import score_timesteps
from reward_forcing.training.networks import frozen_text_encoder, sharded_student, sharded_wan
from reward_forcing.rng import keyed_generator, keyed_randint
from reward_forcing.training.rollout import sample_noise
from reward_forcing.training.state import export_wan_folder, full_state_dict, full_tensors


def sample_timesteps(seed: int, step: int, sample_ids, shift: float) -> torch.Tensor:
    """Per-sample training timesteps [B] (float32): 1000 * shift(u), u on the 1000-point grid in [0, 1)."""
    draws = torch.tensor([keyed_randint(1000, seed, "diffusion", "t", step, i) for i in sample_ids])
    return score_timesteps(draws, shift, 0.0, 1000.0).float()


def sample_chunk_timesteps(seed: int, step: int, sample_ids, shift: float, frames: int, chunk: int) -> torch.Tensor:
    """Per-frame training timesteps [B, frames] (float32), one draw per chunk of `chunk` frames: chunk c of sample i
    at 1000 * shift(u), u on the 1000-point grid, keyed by (step, i, c)."""
    chunks = math.ceil(frames / chunk)
    draws = torch.tensor([[keyed_randint(1000, seed, "diffusion", "t", step, i, c) for c in range(chunks)]
                          for i in sample_ids])
    t = score_timesteps(draws, shift, 0.0, 1000.0).float()
    return t.repeat_interleave(chunk, dim=1)[:, :frames]


def dropped_text(seed: int, step: int, sample_ids, rate: float) -> list[bool]:
    """Which samples are trained on the negative prompt (keyed, so a resumed run drops the same ones)."""
    return [float(torch.rand(1, generator=keyed_generator(seed, "diffusion", "text_dropout", step, i))) < rate
            for i in sample_ids]


def flow_matching_loss(model, schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       context: torch.Tensor, teacher_forcing: bool = False) -> torch.Tensor:
    """Mean squared error between the model's flow at x_t and the rectified-flow target noise - x0. t: [B] or per-frame
    [B, F]; teacher_forcing: the causal model also sees the clean x0, each noisy chunk the clean chunks before it."""
    x_t = schedule.add_noise(x0, noise, t)
    flow = model(x_t, t, context, clean_x=x0) if teacher_forcing else model(x_t, t, context)
    return (flow.float() - schedule.training_target(x0.float(), noise.float())).pow(2).mean()


class FlowMatching(SingleNetworkMethod):
    """The Wan model of folder `model_name` (bidirectional, or with `causal` the causal student's architecture under
    teacher forcing), trained by flow matching on the clean latents of `data_path`; exports `<logdir>/model/` and,
    with an EMA, `<logdir>/model_ema/`."""
    name = "diffusion"
    ema_of = "model"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.data_path is None:
            raise ConfigError("trainer 'diffusion' needs data_path=<latent dataset> "
                              "(reward_forcing/training/ode_data.py)")
        if not 0 <= cfg.diffusion_text_dropout <= 1:
            raise ConfigError(f"diffusion_text_dropout must lie in [0, 1], got {cfg.diffusion_text_dropout}")

    def __init__(self, run):
        super().__init__(run)
        cfg, info = self.cfg, self.info
        self.dataset, self.batches = open_pairs(cfg, run)
        if cfg.causal:
            self.model = sharded_student(cfg, info, run.dtype)
            self.wan_config = read_wan_config(asset_path(cfg.checkpoint_dir, cfg.model_name))
        else:
            self.model, self.wan_config = sharded_wan(cfg, info, run.dtype, cfg.model_name)
        channels, frames = self.dataset[0]["ode_latent"].shape[1:3]
        if channels != self.model.in_dim:
            raise ConfigError(f"the latent dataset has {channels} channels but {cfg.model_name} takes "
                              f"{self.model.in_dim}")
        if cfg.causal and frames % cfg.num_frame_per_block:
            raise ConfigError(f"the latent dataset has {frames} frames, not a multiple of num_frame_per_block="
                              f"{cfg.num_frame_per_block}")
        self.model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        self.model.train()
        self.add_network("model", self.model, cfg.lr_generator)
        self.text_encoder = frozen_text_encoder(cfg, info, run.dtype)
        self.schedule = FlowMatchSchedule(cfg.timestep_shift, sigma_lookup=cfg.sigma_lookup)

    def micro_step(self, step: int, micro: int) -> dict:
        cfg, run, device = self.cfg, self.run, self.info.device
        prompts, latents = self.batches(step, micro)
        first = self.batches.first_sample(step, micro)
        ids = list(range(first, first + cfg.batch_size))
        drop = dropped_text(run.seed, step, ids, float(cfg.diffusion_text_dropout))
        context = self.text_encoder.encode([cfg.negative_prompt if d else p for p, d in zip(prompts, drop)])
        context = context.to(run.dtype)
        x0 = latents[:, -1].to(device, run.dtype)
        noise = sample_noise(tuple(x0.shape[1:]), run.seed, "diffusion", "noise", step, sample_ids=ids,
                             dtype=run.dtype, device=device)
        shift = float(cfg.diffusion_timestep_shift)
        if cfg.causal:
            t = sample_chunk_timesteps(run.seed, step, ids, shift, x0.shape[2], cfg.num_frame_per_block)
        else:
            t = sample_timesteps(run.seed, step, ids, shift)
        loss = flow_matching_loss(self.model, self.schedule, x0, noise, t.to(device), context,
                                  teacher_forcing=cfg.causal) / cfg.grad_accum
        loss.backward()
        return {"loss": loss.detach()}

    def export(self, average) -> list:
        weights = full_state_dict(self.model)
        averaged = full_tensors(average.state_dict(), keep=self.info.is_main) if average is not None else None
        if not self.info.is_main:
            return []
        written = [export_wan_folder(self.run.logdir / "model", self.wan_config, weights)]
        if averaged is not None:
            written.append(export_wan_folder(self.run.logdir / "model_ema", self.wan_config,
                                             dict(weights, **averaged)))
        return written
