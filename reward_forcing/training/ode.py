"""ODE-regression initialisation of the causal student (CausVid, arXiv 2412.07772 §4.3; upstream's
model/ode_regression.py).

Each training pair holds K recorded states of one teacher trajectory, noisiest first. Per sample,
every chunk of frames draws one state index; the student sees that state labelled with the
matching entry of `state_timesteps(cfg)` (a K-entry list ending in 0), runs its block-causal training
forward, and regresses its x0 prediction onto the clean (last) state on the frames whose label is
not 0. The label t is both the model's timestep input and, through the schedule's sigma(t), the sigma
of x0 = x_t - sigma * v, as upstream's wrapper converts with the sigma of the timestep it fed.
"""

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.sampling import FlowMatchSchedule, warped_steps
from reward_forcing.training.data import check_first_frame_prob, open_pairs
from reward_forcing.training.loop import SingleNetworkMethod
from reward_forcing.training.networks import frozen_text_encoder, sharded_student
from reward_forcing.rng import keyed_generator
from reward_forcing.training.state import export_generator


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
                   generator: torch.Generator | None = None, first_frame_prob: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input [B, C, F, H, W] and per-frame timesteps [B, F] for a batch of pairs. first_frame_prob: the
    probability that a sample's frame 0 is its clean state (label 0, so not regressed), the picture an
    image-conditioned student starts from; drawn after the state indices, from the same generator."""
    b, k, _, f = ode_latent.shape[:4]
    if len(timestep_list) != k:
        raise ConfigError(f"ode_timesteps has {len(timestep_list)} entries but the ODE pairs hold {k} states")
    index = sample_state_indices(b, f, frames_per_block, k, generator)
    if first_frame_prob > 0:
        index[torch.rand(b, generator=generator) < first_frame_prob, 0] = k - 1
    timesteps = torch.as_tensor(list(timestep_list), dtype=torch.float32)[index]
    return gather_states(ode_latent, index), timesteps.to(ode_latent.device)


def ode_loss(model, schedule, ode_latent: torch.Tensor, context: torch.Tensor, timestep_list,
             frames_per_block: int, generator: torch.Generator | None = None,
             first_frame_prob: float = 0.0) -> torch.Tensor:
    """One regression loss: block-causal student forward (no cache) on a random state per chunk (frame 0 clean
    with probability first_frame_prob, see student_inputs)."""
    noisy, timesteps = student_inputs(ode_latent, timestep_list, frames_per_block, generator, first_frame_prob)
    flow = model(noisy, timesteps, context)
    pred_x0 = schedule.flow_to_x0(flow, noisy, timesteps)
    return ode_regression_loss(pred_x0, ode_latent[:, -1], timesteps)


# --- the method (`train.py` with `trainer: ode`) -----------------------------------------------

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


class OdeRegression(SingleNetworkMethod):
    """Regression of the causal student onto recorded teacher states; exports `<logdir>/ode_init.pt`
    ({"generator": ...}), no EMA (the regression's own weights are the initialisation)."""
    name = "ode"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.data_path is None:
            raise ConfigError("trainer 'ode' needs data_path=<ODE pairs> (see scripts/generate_ode_pairs.py)")
        check_first_frame_prob(cfg)

    def __init__(self, run):
        super().__init__(run)
        cfg, info = self.cfg, self.info
        self.dataset, self.batches = open_pairs(cfg, run)
        self.model = sharded_student(cfg, info, run.dtype).train()
        self.labels = state_timesteps(cfg)
        check_pairs(self.dataset, self.model, self.labels, cfg.num_frame_per_block)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.add_network("generator", self.model, cfg.lr_generator)
        self.text_encoder = frozen_text_encoder(cfg, info, run.dtype)
        self.schedule = state_schedule(cfg)

    def micro_step(self, step: int, micro: int) -> dict:
        cfg, run = self.cfg, self.run
        prompts, ode_latent = self.batches(step, micro)
        context = self.text_encoder.encode(prompts)
        generator = keyed_generator(run.seed, "ode_state_index", step, micro, self.info.data_rank)
        loss = ode_loss(self.model, self.schedule, ode_latent.to(self.info.device), context, self.labels,
                        cfg.num_frame_per_block, generator, float(cfg.first_frame_prob))
        (loss / cfg.grad_accum).backward()
        return {"loss": loss.detach() / cfg.grad_accum}

    def export(self, average) -> list:
        return export_generator(self.run.logdir / "ode_init", self.model, None, self.info.is_main)
