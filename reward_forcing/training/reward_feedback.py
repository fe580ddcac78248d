"""Reward-feedback fine-tuning (arXiv 2601.16933, "Reward-Forcing: Autoregressive Video Generation with Reward
Feedback"): `train.py` with `trainer: reward_feedback`.

From the ODE initialisation, the student rolls out exactly as in distillation (reward_forcing.training.rollout:
random exit step, gradient at each chunk's exit step, context pass); one decoded frame per video is scored by
ImageReward with gradient through the decoder into the generator, and the loss is -mean R. No teacher, no
critic. Only what the scored frame needs is decoded with gradient: the Wan VAE's decoder is causal, so the
latents before the frame's latent fill its feature cache without gradient and that latent alone is decoded
with it (decoder activations for one latent, 4 frames).

`reward_frame`: `last` (the paper's choice), `random` (one frame per video, drawn from a keyed stream, the
paper's ablation), `all` (every frame, mean score; decodes the whole video with gradient). A latent reward (no
decoder, e.g. the miniature world's blob_quality, reward_forcing/miniworld/blob_reward.py) picks among the latent
frames themselves: the chosen latent frame alone, as a one-frame video, or the whole latent video for `all`.
The same term, weighted by `reward_feedback_weight`, can be added to DMD / Re-DMD (`trainer: distill`, the
paper's "distillation + reward" comparison).
"""
import time
from functools import partial
from pathlib import Path

import torch

from reward_forcing.checkpoints import asset_path
from reward_forcing.errors import ConfigError
from reward_forcing.training.rng import keyed_randint

FRAME_CHOICES = ("last", "random", "all")
DIFFERENTIABLE_EXAMPLES = ("imagereward", "blob_quality")  # what the refusals of a non-differentiable reward suggest


def check_frame_choice(choice: str) -> None:
    if choice not in FRAME_CHOICES:
        raise ConfigError(f"reward_frame must be one of {', '.join(FRAME_CHOICES)}; got '{choice}'")


def temporal_factor(vae_cfg) -> int:
    """Pixel frames per latent after the first (Wan VAE: 1 + 4(T - 1) frames from T latents)."""
    return 2 ** sum(bool(x) for x in vae_cfg["temperal_downsample"])


def frame_location(frame: int, factor: int) -> tuple[int, int]:
    """(latent index, position among that latent's decoded frames) of pixel frame `frame`."""
    return (0, 0) if frame == 0 else ((frame - 1) // factor + 1, (frame - 1) % factor)


def choose_frames(choice: str, num_pixel_frames: int, seed: int, step: int, sample_ids) -> list | None:
    """The pixel frame each sample is scored on (None = all); `random` draws per global sample index, so the
    draw does not depend on how samples are spread over ranks."""
    if choice == "all":
        return None
    if choice == "last":
        return [num_pixel_frames - 1] * len(sample_ids)
    return [keyed_randint(num_pixel_frames, seed, "reward_frame", step, i) for i in sample_ids]


class FrameReward:
    """A differentiable reward (reward_forcing/rewards/base.py) on the frame(s) `reward_frame` picks from normalised
    latents [B, C, F, h, w]; per-sample scores [B] under `score_key`, differentiable in the latents. A pixel
    reward gets a one-frame video decoded by the Wan VAE (all frames for `all`); a latent reward gets the chosen
    latent frame as a one-frame video [B, C, 1, h, w] (the whole latents for `all`): its frames are the latents'."""

    def __init__(self, reward, score_key: str, vae_cfg):
        if not reward.differentiable:
            raise ConfigError(f"reward feedback needs a differentiable reward; {type(reward).__name__} is not "
                              f"(use reward.name={' or '.join(DIFFERENTIABLE_EXAMPLES)})")
        if reward.input == "pixels" and not hasattr(reward.decoder, "stream_decoder"):
            raise ConfigError("reward feedback decodes through the Wan VAE's causal decoder: set decoder=vae")
        self.reward, self.score_key = reward, score_key
        self.factor = temporal_factor(vae_cfg) if reward.input == "pixels" else 1  # no decoder, no upsampling

    @classmethod
    def from_config(cls, cfg, info, dtype) -> "FrameReward":
        """The `reward:` section's scorer (trainer reward_feedback)."""
        from reward_forcing.rewards.registry import build_reward

        return cls(build_reward(cfg, info, dtype), cfg.reward.score_key, cfg.vae)

    @classmethod
    def imagereward(cls, cfg, info, dtype) -> "FrameReward":
        """ImageReward on Wan VAE pixels, whatever the `reward:` section names (it drives Re-DMD's weight)."""
        from reward_forcing.inference.pipeline import WAN_VAE_FILE
        from reward_forcing.models.vae import WanVAE
        from reward_forcing.rewards.imagereward_scorer import ImageRewardReward

        vae = WanVAE.from_file(asset_path(cfg, Path(cfg.model_name) / WAN_VAE_FILE), cfg.vae, device=info.device,
                               dtype=dtype)
        return cls(ImageRewardReward.from_config(cfg, info, dtype, vae), ImageRewardReward.keys[0], cfg.vae)

    def num_pixel_frames(self, num_latents: int) -> int:
        return 1 + self.factor * (num_latents - 1)

    def decode_latent(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """Pixels [B, 3, n, H, W] of latent `index`, with gradient to latents[:, :, index] only."""
        stream = self.reward.decoder.stream_decoder()
        if index > 0:
            stream.decode_chunk(latents[:, :, :index])  # fills the causal cache; no gradient
        return stream.decode_chunk(latents[:, :, index:index + 1], with_grad=True)

    def _score(self, videos, prompts) -> torch.Tensor:
        return self.reward.score(videos, prompts)[self.score_key]

    def __call__(self, latents: torch.Tensor, prompts: list[str], frames: list | None) -> torch.Tensor:
        if self.reward.input == "latents":
            if frames is None:
                return self._score(latents, prompts)
            chosen = torch.stack([latents[b, :, f] for b, f in enumerate(frames)])[:, :, None]  # [B, C, 1, h, w]
            return self._score(chosen, prompts)
        if frames is None:
            return self._score(self.reward.decoder.stream_decoder().decode_chunk(latents, with_grad=True), prompts)
        scores = [None] * len(frames)
        located = [frame_location(f, self.factor) for f in frames]
        for index in sorted({latent for latent, _ in located}):
            rows = [b for b, (latent, _) in enumerate(located) if latent == index]
            pixels = self.decode_latent(latents[rows], index)
            videos = torch.stack([pixels[j, :, located[b][1]] for j, b in enumerate(rows)])[:, :, None]
            for b, score in zip(rows, self._score(videos, [prompts[b] for b in rows])):
                scores[b] = score
        return torch.stack(scores)


# ---- the loop (`train.py` with `trainer: reward_feedback`) ----
def run(cfg, logdir, args) -> None:
    from reward_forcing.training.parallel import init_distributed, shutdown

    from reward_forcing.rewards.registry import check_reward_config

    check_frame_choice(cfg.reward_frame)
    reward = check_reward_config(cfg)
    if not reward.differentiable:
        raise ConfigError(f"trainer reward_feedback needs a differentiable reward; '{cfg.reward.name}' is not "
                          f"(use reward.name={' or '.join(DIFFERENTIABLE_EXAMPLES)})")
    if reward.input == "pixels" and cfg.decoder != "vae":  # a latent reward loads no decoder at all
        raise ConfigError(f"reward '{cfg.reward.name}' reads pixels, which reward feedback decodes through the Wan "
                          f"VAE's causal decoder: set decoder=vae (not '{cfg.decoder}')")
    info = init_distributed(cfg.fsdp_replicate)
    try:
        RewardFeedback(cfg, Path(logdir), args, info).train()
    finally:
        shutdown()


class RewardFeedback:
    def __init__(self, cfg, logdir: Path, args, info):
        from reward_forcing.inference.generator import latent_size
        from reward_forcing.training.data import PromptStream, read_prompts
        from reward_forcing.training.ema import EMA
        from reward_forcing.training.metrics import MetricsLogger
        from reward_forcing.training.ode import load_student, load_text_encoder
        from reward_forcing.training.parallel import compute_dtype, resolve_seed
        from reward_forcing.training.rollout import training_sampler
        from reward_forcing.training.state import load_checkpoint, read_meta, resume_folder

        self.cfg, self.logdir, self.args, self.info = cfg, logdir, args, info
        resumed = resume_folder(logdir, args.resume)
        meta = read_meta(resumed) if resumed is not None else {}
        # A resumed run keeps its seed: every draw is keyed by it.
        self.seed = int(meta["seed"]) if meta else resolve_seed(int(cfg.seed))
        torch.manual_seed(self.seed + info.rank)
        self.dtype = compute_dtype(cfg.mixed_precision, info.device)
        self.global_batch = info.world_size * cfg.batch_size
        self.generator = load_student(cfg, info, self.dtype).train()
        self.generator.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        self.sampler = training_sampler(self.generator, cfg)
        self.latent_hw = latent_size(cfg, self.generator.patch_size)
        self.text_encoder = load_text_encoder(cfg, info, self.dtype)
        self.reward = FrameReward.from_config(cfg, info, self.dtype)
        self.optimizer = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr_generator,
                                           betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                                           eps=cfg.adam_eps)
        self.ema = EMA(self.generator, cfg.ema_decay) if meta.get("has_ema") else None
        self.start = load_checkpoint(resumed, self._parts())["step"] if resumed is not None else 0
        self.prompts = PromptStream(read_prompts(cfg.prompt_path), self.seed, "generator")
        self.logger = MetricsLogger(logdir, info.is_main, "disabled" if args.disable_wandb else cfg.wandb_mode, cfg,
                                    cfg.wandb_project, cfg.wandb_run_name,
                                    resume_step=self.start if resumed is not None else None)

    def _parts(self) -> dict:
        from reward_forcing.training.state import ModelState, OptimizerState

        parts = {"generator": ModelState(self.generator),
                 "generator_optimizer": OptimizerState(self.generator, self.optimizer)}
        if self.ema is not None:
            parts["generator_ema"] = self.ema
        return parts

    def micro_step(self, step: int, micro: int) -> dict:
        from reward_forcing.training.rollout import exit_steps, rollout

        cfg, info = self.cfg, self.info
        first = (micro * info.world_size + info.rank) * cfg.batch_size
        ids = list(range(first, first + cfg.batch_size))  # global sample indices of this optimiser step
        prompts = [self.prompts[step * cfg.grad_accum * self.global_batch + i] for i in ids]
        context = self.text_encoder.encode(prompts).to(self.dtype)
        frames = int(cfg.num_training_frames)
        exits = exit_steps(cfg, len(self.sampler.timesteps), frames // self.sampler.chunk_frames,
                           self.seed, "generator", step, micro)
        x = rollout(self.sampler, context, frames, self.latent_hw, exits, self.seed, ("generator", step), ids,
                    self.dtype, float(cfg.context_noise), with_grad=True, checkpoint=bool(cfg.gradient_checkpointing),
                    cache_grad=str(cfg.rollout_cache_grad))
        chosen = choose_frames(cfg.reward_frame, self.reward.num_pixel_frames(frames), self.seed, step, ids)
        scores = self.reward(x, prompts, chosen)
        loss = -scores.mean() / cfg.grad_accum
        loss.backward()
        return {"loss": loss.detach(), "reward": scores.detach().mean()}

    def train(self) -> None:
        from tqdm import tqdm

        from reward_forcing.training.ema import ema_after_step
        from reward_forcing.training.metrics import learning_rates, reduce_across_ranks
        from reward_forcing.training.schedule import Updater

        cfg, info = self.cfg, self.info
        updater = Updater("generator", self.generator, self.optimizer, cfg.grad_clip)
        bar = tqdm(range(self.start, cfg.max_steps), initial=self.start, total=cfg.max_steps, disable=not info.is_main,
                   desc="reward feedback")
        for step in bar:
            began = time.perf_counter()
            out = updater.accumulate(cfg.grad_accum, partial(self.micro_step, step))
            grad_norm = updater.step(out["loss"])
            self.ema = ema_after_step(self.ema, self.generator, cfg.ema_decay, cfg.ema_start, step)
            row = reduce_across_ranks(out, info.device)
            row.update(grad_norm=grad_norm, step_time=time.perf_counter() - began,
                       **learning_rates(generator=self.optimizer))
            done = step + 1
            self.logger.log(done, row)
            bar.set_postfix(reward=f"{row['reward']:.4g}")
            if not self.args.no_save and (done % cfg.save_every == 0 or done == cfg.max_steps):
                self.save(done)
        self.logger.close()

    def save(self, done: int) -> None:
        from reward_forcing.training.state import export_generator, save_checkpoint

        save_checkpoint(self.logdir, done, self._parts(), {"seed": self.seed, "has_ema": self.ema is not None},
                        keep=self.cfg.keep_checkpoints)
        export_generator(self.logdir / "generator", self.generator, self.ema, self.info.is_main)
