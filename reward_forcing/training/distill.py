"""DMD (Self Forcing) and Re-DMD (Reward Forcing) distillation: `train.py` with `trainer: distill`.

Per loop step (reward_forcing.training.schedule, `schedule: corrected`): on generator steps, `grad_accum`
micro-steps of rollout (grad at the exit steps) -> [reward (reward_forcing/rewards) -> w] -> teacher/critic
scores -> DMD loss; then `grad_accum` critic micro-steps of a fresh no-grad rollout -> flow-matching loss.
`schedule: upstream` runs upstream's loop instead (one micro-step per network per iteration, its double steps).
Every random draw is keyed by (seed, purpose, step, global sample index) (reward_forcing.training.rng), so runs
resume exactly and 1 rank with batch 2 draws what 2 ranks with batch 1 draw.
"""
import time
from functools import partial
from pathlib import Path

import torch

from reward_forcing.checkpoints import asset_path, load_generator_state_dict, load_wan_folder, read_wan_config
from reward_forcing.errors import ConfigError
from reward_forcing.inference.generator import latent_size
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.wan import WanModel
from reward_forcing.rewards.registry import build_reward, check_reward_config
from reward_forcing.sampling import FlowMatchSchedule
from reward_forcing.training.data import PromptStream, read_prompts
from reward_forcing.training.ema import EMA
from reward_forcing.training.losses import (
    classifier_free_guidance,
    critic_flow_loss,
    dmd_gradient,
    re_dmd_loss,
    WEIGHT_NORMS,
    normalise_weight,
    reward_weight,
    score_timesteps,
)
from reward_forcing.training.metrics import MetricsLogger, learning_rates, reduce_across_ranks
from reward_forcing.training.parallel import (
    compute_dtype,
    init_distributed,
    load_sharded,
    resolve_seed,
    shutdown,
)
from reward_forcing.training.reward_feedback import FrameReward, check_frame_choice, choose_frames
from reward_forcing.training.rng import keyed_randint
from reward_forcing.training.rollout import exit_steps, rollout, sample_noise, training_sampler
from reward_forcing.training.schedule import (
    Updater,
    check_schedule,
    micro_batches_before,
    optimiser_step,
    upstream_iteration,
)
from reward_forcing.training.state import (
    ModelState,
    OptimizerState,
    export_generator,
    load_checkpoint,
    read_meta,
    resume_folder,
    save_checkpoint,
)

LOSSES = ("dmd", "re_dmd")


def run(cfg, logdir, args) -> None:
    if cfg.distill_loss not in LOSSES:
        raise ConfigError(f"distill_loss must be one of {', '.join(LOSSES)}; got '{cfg.distill_loss}'")
    check_schedule(cfg.schedule)
    check_frame_choice(cfg.reward_frame)
    if cfg.distill_loss == "re_dmd":
        check_reward_config(cfg)
    if cfg.reward_weight_norm not in WEIGHT_NORMS:
        raise ConfigError(f"reward_weight_norm must be one of {', '.join(WEIGHT_NORMS)}; "
                          f"got '{cfg.reward_weight_norm}'")
    info = init_distributed(cfg.fsdp_replicate)
    try:
        Distiller(cfg, Path(logdir), args, info).train()
    finally:
        shutdown()


def _wan_loader(folder):
    return lambda: load_wan_folder(folder)[1]


class Distiller:
    def __init__(self, cfg, logdir: Path, args, info):
        self.cfg, self.logdir, self.args, self.info = cfg, logdir, args, info
        self.resumed = resume_folder(logdir, args.resume)
        meta = read_meta(self.resumed) if self.resumed is not None else {}
        # A resumed run keeps its seed: every draw is keyed by it (seed 0 = random, shared by the ranks, as upstream).
        self.seed = int(meta["seed"]) if meta else resolve_seed(int(cfg.seed))
        torch.manual_seed(self.seed + info.rank)
        self.dtype = compute_dtype(cfg.mixed_precision, info.device)
        self.global_batch = info.world_size * cfg.batch_size
        self._build_models()
        self.ema = EMA(self.generator, cfg.ema_decay) if meta.get("has_ema") else None
        self.start = load_checkpoint(self.resumed, self._parts())["step"] if self.resumed is not None else 0

        prompts = read_prompts(cfg.prompt_path)
        self.generator_prompts = PromptStream(prompts, self.seed, "generator")
        self.critic_prompts = PromptStream(prompts, self.seed, "critic")
        self.uncond = self.text_encoder.encode([cfg.negative_prompt]).to(self.dtype)
        self.logger = MetricsLogger(logdir, info.is_main, "disabled" if args.disable_wandb else cfg.wandb_mode, cfg,
                                    cfg.wandb_project, cfg.wandb_run_name,
                                    resume_step=self.start if self.resumed is not None else None)

    # ---- models ----
    def _build_models(self):
        cfg, info = self.cfg, self.info
        student = asset_path(cfg, cfg.model_name)
        student_cfg = read_wan_config(student)
        init = asset_path(cfg, cfg.generator_ckpt) if cfg.generator_ckpt else None

        def build_student():
            return CausalWanModel.from_config(student_cfg, num_frame_per_block=int(cfg.num_frame_per_block),
                                              local_attn_size=int(cfg.local_attn_size))

        # The student's cached path has no per-block checkpointing; the rollout checkpoints each exit forward instead.
        self.generator = load_sharded(build_student, (lambda: load_generator_state_dict(init)) if init else
                                      _wan_loader(student), info, self.dtype, str(init or student))
        critic_dir, teacher_dir = asset_path(cfg, cfg.fake_name), asset_path(cfg, cfg.real_name)
        self.critic = load_sharded(partial(WanModel.from_config, read_wan_config(critic_dir)),
                                   _wan_loader(critic_dir), info, self.dtype, str(critic_dir))
        self.teacher = load_sharded(partial(WanModel.from_config, read_wan_config(teacher_dir)),
                                    _wan_loader(teacher_dir), info, self.dtype, str(teacher_dir))
        self.teacher.requires_grad_(False).eval()
        for model in (self.generator, self.critic):
            model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
            model.train()
        self.text_encoder = self._text_encoder()
        self.reward = build_reward(cfg, info, self.dtype) if cfg.distill_loss == "re_dmd" else None
        # DMD / Re-DMD + reward_feedback_weight * (-mean ImageReward of a decoded frame) (arXiv 2601.16933)
        self.feedback = FrameReward.imagereward(cfg, info, self.dtype) if cfg.reward_feedback_weight else None

        self.sampler = training_sampler(self.generator, cfg)
        self.score_schedule = FlowMatchSchedule(cfg.score_timestep_shift, sigma_lookup=cfg.sigma_lookup)
        self.latent_hw = latent_size(cfg, self.generator.patch_size)
        betas = tuple(cfg.adam_betas)
        self.generator_optimizer = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr_generator, betas=betas,
                                                     weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.lr_critic, betas=betas,
                                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    def _text_encoder(self):
        from reward_forcing.models.text_encoder import TextEncoder
        from reward_forcing.training.parallel import shard_model

        # Frozen, so no fp32 master copy: in bf16 the file's (mmapped, bf16) tensors are adopted without a copy,
        # and ranks on one node share those pages until sharding moves each rank's part to its device.
        encoder = TextEncoder.from_wan_folder(asset_path(self.cfg, self.cfg.model_name), self.cfg.text_encoder,
                                              device="cpu", dtype=self.dtype)
        shard_model(encoder.model, self.info, self.dtype)  # the umT5 stack; the wrapper only tokenises
        return encoder

    def _parts(self) -> dict:
        parts = {"generator": ModelState(self.generator), "critic": ModelState(self.critic),
                 "generator_optimizer": OptimizerState(self.generator, self.generator_optimizer),
                 "critic_optimizer": OptimizerState(self.critic, self.critic_optimizer)}
        if self.ema is not None:
            parts["generator_ema"] = self.ema
        return parts

    # ---- one micro-step ----
    def _sample_ids(self, micro: int) -> list[int]:
        """Indices of this rank's samples among the optimiser step's grad_accum * world * batch samples."""
        first = (micro * self.info.world_size + self.info.rank) * self.cfg.batch_size
        return list(range(first, first + self.cfg.batch_size))

    def _noisy(self, x, purpose, step, ids):
        """x_t at a DMD / critic timestep t ~ U{0..N-1}, shifted and clamped (upstream model/re_dmd.py), per sample."""
        cfg = self.cfg
        draws = torch.tensor([keyed_randint(1000, self.seed, purpose, "t", step, i) for i in ids])
        t = score_timesteps(draws, cfg.timestep_shift, cfg.min_score_timestep, cfg.max_score_timestep)
        t = t.to(device=x.device, dtype=torch.float32)
        noise = sample_noise(tuple(x.shape[1:]), self.seed, purpose, "noise", step, sample_ids=ids, dtype=x.dtype,
                             device=x.device)
        return self.sampler.schedule.add_noise(x, noise, t), noise, t

    def _rollout(self, purpose, step, micro, ids, context, with_grad):
        cfg = self.cfg
        frames = int(cfg.num_training_frames)
        exits = exit_steps(cfg, len(self.sampler.timesteps), frames // self.sampler.chunk_frames,
                           self.seed, purpose, step, micro)
        return rollout(self.sampler, context, frames, self.latent_hw, exits, self.seed, (purpose, step), ids,
                       self.dtype, float(cfg.context_noise), with_grad=with_grad,
                       checkpoint=bool(cfg.gradient_checkpointing), cache_grad=str(cfg.rollout_cache_grad))

    def _encode(self, prompts):
        return self.text_encoder.encode(prompts).to(self.dtype)

    def generator_micro(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        ids = self._sample_ids(micro)
        base = self._micro_batches_before(step)[0] * self.global_batch
        prompts = [self.generator_prompts[base + i] for i in ids]
        context = self._encode(prompts)
        x = self._rollout("generator", step, micro, ids, context, with_grad=True)
        row, weight = {}, None
        if self.reward is not None:
            scores = self.reward(x.detach(), prompts)
            weight = normalise_weight(reward_weight(scores[cfg.reward.score_key], cfg.reward_beta,
                                                    cfg.reward_weight_clip), cfg.reward_weight_norm)
            row.update({f"reward_{key.lower()}": value.mean() for key, value in scores.items()})
            row.update(reward_weight=weight.mean(), reward_weight_min=weight.min(), reward_weight_max=weight.max())
        x_t, _, t = self._noisy(x.detach(), "generator", step, ids)
        with torch.no_grad():
            x_fake = self.score_schedule.flow_to_x0(self.critic(x_t, t, context), x_t, t)
            both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                torch.cat([context, self.uncond.expand(len(ids), -1, -1)]))
            cond, uncond = self.score_schedule.flow_to_x0(both, torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
            x_real = classifier_free_guidance(cond, uncond, cfg.guidance_scale)
            grad = dmd_gradient(x.detach().float(), x_real.float(), x_fake.float())
        loss = re_dmd_loss(x, grad, weight) / cfg.grad_accum
        if self.feedback is not None:
            frames = choose_frames(cfg.reward_frame, self.feedback.num_pixel_frames(x.shape[2]), self.seed, step, ids)
            scores = self.feedback(x, prompts, frames)
            loss = loss - cfg.reward_feedback_weight * scores.mean() / cfg.grad_accum
            row.update(reward=scores.detach().mean())
        loss.backward()
        row.update(loss=loss.detach(), dmd_grad_norm=grad.abs().mean())
        return row

    def critic_micro(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        ids = self._sample_ids(micro)
        base = self._micro_batches_before(step)[1] * self.global_batch
        prompts = [self.critic_prompts[base + i] for i in ids]
        context = self._encode(prompts)
        x = self._rollout("critic", step, micro, ids, context, with_grad=False)
        x_t, noise, t = self._noisy(x, "critic", step, ids)
        x_pred = self.score_schedule.flow_to_x0(self.critic(x_t, t, context), x_t, t)
        loss = critic_flow_loss(x_pred.float(), x_t.float(), x.float(), noise.float(), t, self.sampler.schedule)
        loss = loss / cfg.grad_accum
        loss.backward()
        return {"loss": loss.detach()}

    # ---- loop ----
    def _micro_batches_before(self, step: int) -> tuple[int, int]:
        cfg = self.cfg
        return micro_batches_before(cfg.schedule, step, cfg.grad_accum, cfg.dfake_gen_update_ratio)

    def _after_generator_step(self, step: int) -> None:
        if self.cfg.ema_decay is None:
            return
        if self.cfg.schedule == "upstream":  # made at the end of iteration ema_start - 1 (train), then follows
            if self.ema is not None:         # every generator optimiser step
                self.ema.update(self.generator)
            return
        if step < self.cfg.ema_start:
            return
        if self.ema is None:
            self.ema = EMA(self.generator, self.cfg.ema_decay)
        else:
            self.ema.update(self.generator)

    def train(self) -> None:
        from tqdm import tqdm

        cfg, info = self.cfg, self.info
        generator = Updater("generator", self.generator, self.generator_optimizer, cfg.grad_clip)
        critic = Updater("critic", self.critic, self.critic_optimizer, cfg.grad_clip)
        run_step = upstream_iteration if cfg.schedule == "upstream" else optimiser_step
        bar = tqdm(range(self.start, cfg.max_steps), initial=self.start, total=cfg.max_steps, disable=not info.is_main,
                   desc="distill")
        for step in bar:
            began = time.perf_counter()
            row = run_step(step, cfg.grad_accum, cfg.dfake_gen_update_ratio, generator, critic,
                           partial(self.generator_micro, step), partial(self.critic_micro, step),
                           partial(self._after_generator_step, step))
            row = reduce_across_ranks(row, info.device)
            row["step_time"] = time.perf_counter() - began
            row.update(learning_rates(generator=self.generator_optimizer, critic=self.critic_optimizer))
            done = step + 1
            if cfg.schedule == "upstream" and cfg.ema_decay is not None and self.ema is None and done >= cfg.ema_start:
                self.ema = EMA(self.generator, cfg.ema_decay)  # upstream creates it at the end of the iteration
            self.logger.log(done, row)
            bar.set_postfix(critic=f"{row['critic_loss']:.4g}")
            if not self.args.no_save and (done % cfg.save_every == 0 or done == cfg.max_steps):
                self.save(done)
        self.logger.close()

    def save(self, done: int) -> None:
        generator_batches, critic_batches = self._micro_batches_before(done)
        meta = {"seed": self.seed, "has_ema": self.ema is not None,
                "generator_prompt_position": generator_batches * self.global_batch,
                "critic_prompt_position": critic_batches * self.global_batch}
        save_checkpoint(self.logdir, done, self._parts(), meta, keep=self.cfg.keep_checkpoints)
        export_generator(self.logdir / "generator", self.generator, self.ema, self.info.is_main)
