"""DMD (Self Forcing) and Re-DMD (Reward Forcing) distillation: `train.py` with `trainer: distill`.

Per loop step (reward_forcing.training.schedule, `schedule: corrected`): on generator steps, `grad_accum`
micro-steps of rollout (grad at the exit steps) -> [reward (reward_forcing/rewards) -> w] -> teacher/critic
scores -> DMD loss; then `grad_accum` critic micro-steps of a fresh no-grad rollout -> flow-matching loss.
`schedule: upstream` runs upstream's loop instead (one micro-step per network per iteration, its double steps).
Every random draw is keyed by (seed, purpose, step, global sample index) (reward_forcing.rng), so runs
resume exactly and 1 rank with batch 2 draws what 2 ranks with batch 1 draw.
"""
from functools import partial

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.inference.generator import latent_size
from reward_forcing.rewards.registry import check_reward
from reward_forcing.rng import keyed_generator, keyed_randint
from reward_forcing.sampling import FlowMatchSchedule, classifier_free_guidance
from reward_forcing.training.data import (PromptStream, check_first_frame_prob, check_first_frames, open_pairs,
                                          read_prompt_texts)
from reward_forcing.training.frame_reward import FrameReward, choose_frames
from reward_forcing.training.losses import (
    critic_flow_loss,
    dmd_gradient,
    re_dmd_loss,
    normalise_weight,
    reward_weight,
    score_timesteps,
)
from reward_forcing.training.loop import Method
from reward_forcing.training.networks import configured_reward, frozen_text_encoder, sharded_student, sharded_wan
from reward_forcing.training.rollout import sample_noise, training_rollout, training_sampler
from reward_forcing.training.schedule import micro_batches_before, optimiser_step, upstream_iteration
from reward_forcing.training.state import export_generator


class Distiller(Method):
    """The student (`generator`) and the critic (fake score) trained against the frozen teacher (real score)."""
    name = "distill"
    ema_of = "generator"
    dit_folders = ("model_name", "fake_name", "real_name")

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.distill_loss == "re_dmd":
            check_reward(cfg.reward)
        check_first_frame_prob(cfg)
        if cfg.first_frame_prob > 0 and cfg.data_path is None:
            raise ConfigError("first_frame_prob > 0 takes its first frames from ODE pairs: set data_path=<ODE pairs> "
                              "(see scripts/generate_ode_pairs.py)")

    def __init__(self, run):
        super().__init__(run)
        cfg, info, dtype = self.cfg, self.info, run.dtype
        self.seed, self.dtype = run.seed, dtype
        self.generator = sharded_student(cfg, info, dtype)
        self.critic, _ = sharded_wan(cfg, info, dtype, cfg.fake_name)
        self.teacher, _ = sharded_wan(cfg, info, dtype, cfg.real_name)
        self.teacher.requires_grad_(False).eval()
        for model in (self.generator, self.critic):
            model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
            model.train()
        self.text_encoder = frozen_text_encoder(cfg, info, dtype)
        self.reward = configured_reward(cfg, info, dtype) if cfg.distill_loss == "re_dmd" else None
        # DMD / Re-DMD + reward.feedback_weight * (-mean ImageReward of a decoded frame) (arXiv 2601.16933)
        self.feedback = FrameReward.imagereward(cfg, info, dtype) if cfg.reward.feedback_weight else None

        self.sampler = training_sampler(self.generator, cfg)
        self.score_schedule = FlowMatchSchedule(cfg.score_timestep_shift, sigma_lookup=cfg.sigma_lookup)
        self.latent_hw = latent_size(cfg, self.generator.patch_size)
        self.generator_updater = self.add_network("generator", self.generator, cfg.lr_generator)
        self.critic_updater = self.add_network("critic", self.critic, cfg.lr_critic)
        self.generator_optimizer = self.generator_updater.optimizer
        self.critic_optimizer = self.critic_updater.optimizer

        prompts = read_prompt_texts(cfg.prompt_path)
        self.generator_prompts = PromptStream(prompts, self.seed, "generator")
        self.critic_prompts = PromptStream(prompts, self.seed, "critic")
        self.uncond = self.text_encoder.encode([cfg.negative_prompt]).to(dtype)
        self.pairs = None  # the ODE pairs first frames come from (first_frame_prob > 0)
        if cfg.first_frame_prob > 0:
            self.pairs = open_pairs(cfg, run)[0]
            check_first_frames(self.pairs, self.generator.in_dim, self.latent_hw)
            self.pair_order = {purpose: PromptStream(list(range(len(self.pairs))), self.seed, f"{purpose}_first_frames")
                               for purpose in ("generator", "critic")}

    # ---- one micro-step ----
    def _noisy(self, x, purpose, step, ids):
        """x_t at a DMD / critic timestep t ~ U{0..N-1}, shifted and clamped (upstream model/re_dmd.py), per sample."""
        cfg = self.cfg
        draws = torch.tensor([keyed_randint(1000, self.seed, purpose, "t", step, i) for i in ids])
        t = score_timesteps(draws, cfg.timestep_shift, cfg.min_score_timestep, cfg.max_score_timestep)
        t = t.to(device=x.device, dtype=torch.float32)
        noise = sample_noise(tuple(x.shape[1:]), self.seed, purpose, "noise", step, sample_ids=ids, dtype=x.dtype,
                             device=x.device)
        return self.sampler.schedule.add_noise(x, noise, t), noise, t

    def _encode(self, prompts):
        return self.text_encoder.encode(prompts).to(self.dtype)

    def _rolled_out(self, purpose: str, step: int, micro: int, with_grad: bool):
        """This rank's samples of micro-batch `micro` for `purpose` (generator | critic): their indices, prompts
        (the purpose's own prompt stream), text context and rollout."""
        ids = self.run.sample_ids(micro)
        stream, before = (self.generator_prompts, 0) if purpose == "generator" else (self.critic_prompts, 1)
        base = self._micro_batches_before(step)[before] * self.run.global_batch
        prompts = [stream[base + i] for i in ids]
        first_frame = None
        if self.pairs is not None:
            prompts, first_frame = self._first_frames(purpose, step, [base + i for i in ids], ids, prompts)
        context = self._encode(prompts)
        x = training_rollout(self.sampler, self.cfg, context, self.latent_hw, self.seed, purpose, step, micro, ids,
                             self.dtype, with_grad, first_frame)
        return ids, prompts, context, x

    def _first_frames(self, purpose: str, step: int, positions: list[int], ids: list[int], prompts: list[str]):
        """first_frame_prob: which samples start from a clean first frame (a keyed draw per sample) and, for those,
        the prompt and clean latent frame 0 of an ODE pair (the purpose's own keyed order over the pairs).
        Returns the prompts and rollout's first_frame (latents [B, C, 1, h, w], mask [B])."""
        mask = [torch.rand((), generator=keyed_generator(self.seed, purpose, "first_frame", step, i)).item()
                < self.cfg.first_frame_prob for i in ids]
        latents = torch.zeros(len(ids), self.generator.in_dim, 1, *self.latent_hw)
        prompts = list(prompts)
        for b, (position, held) in enumerate(zip(positions, mask)):
            if held:
                pair = self.pairs[self.pair_order[purpose][position]]
                prompts[b], latents[b] = pair["prompts"], pair["ode_latent"][-1][:, :1]
        device = self.info.device
        return prompts, (latents.to(device=device, dtype=self.dtype), torch.tensor(mask, device=device))

    def generator_micro(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        ids, prompts, context, x = self._rolled_out("generator", step, micro, with_grad=True)
        row, weight = {}, None
        if self.reward is not None:
            scores = self.reward(x.detach(), prompts)
            weight = normalise_weight(reward_weight(scores[cfg.reward.score_key], cfg.reward.beta,
                                                    cfg.reward.weight_clip), cfg.reward.weight_norm)
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
            frames = choose_frames(cfg.reward.frame, self.feedback.num_pixel_frames(x.shape[2]), self.seed, step, ids)
            scores = self.feedback(x, prompts, frames)
            loss = loss - cfg.reward.feedback_weight * scores.mean() / cfg.grad_accum
            row.update(reward=scores.detach().mean())
        loss.backward()
        row.update(loss=loss.detach(), dmd_grad_norm=grad.abs().mean())
        return row

    def critic_micro(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        ids, _, context, x = self._rolled_out("critic", step, micro, with_grad=False)
        x_t, noise, t = self._noisy(x, "critic", step, ids)
        x_pred = self.score_schedule.flow_to_x0(self.critic(x_t, t, context), x_t, t)
        loss = critic_flow_loss(x_pred.float(), x_t.float(), x.float(), noise.float(), t, self.sampler.schedule)
        loss = loss / cfg.grad_accum
        loss.backward()
        return {"loss": loss.detach()}

    # ---- one loop step ----
    def _micro_batches_before(self, step: int) -> tuple[int, int]:
        cfg = self.cfg
        return micro_batches_before(cfg.schedule, step, cfg.grad_accum, cfg.dfake_gen_update_ratio)

    def step(self, step: int) -> dict:
        cfg = self.cfg
        if cfg.schedule == "corrected":
            return optimiser_step(step, cfg.grad_accum, cfg.dfake_gen_update_ratio, self.generator_updater,
                                  self.critic_updater, partial(self.generator_micro, step),
                                  partial(self.critic_micro, step), partial(self.ema.stepped, step))
        # upstream's loop: the EMA is made at the end of iteration ema_start - 1 and follows every generator
        # optimiser step after that, double steps included (trainer/rewarded_distillation.py)
        row = upstream_iteration(step, cfg.grad_accum, cfg.dfake_gen_update_ratio, self.generator_updater,
                                 self.critic_updater, partial(self.generator_micro, step),
                                 partial(self.critic_micro, step), self.ema.update)
        if self.ema.enabled and self.ema.average is None and step + 1 >= cfg.ema_start:
            self.ema.make()
        return row

    def meta(self, done: int) -> dict:
        generator_batches, critic_batches = self._micro_batches_before(done)
        return {"generator_prompt_position": generator_batches * self.run.global_batch,
                "critic_prompt_position": critic_batches * self.run.global_batch}

    def export(self, average) -> list:
        return export_generator(self.run.logdir / "generator", self.generator, average, self.info.is_main)
