"""Reward-feedback fine-tuning (arXiv 2601.16933, "Reward-Forcing: Autoregressive Video Generation with Reward
Feedback"): `train.py` with `trainer: reward_feedback`.

From the ODE initialisation, the student rolls out exactly as in distillation (reward_forcing.training.rollout:
random exit step, gradient at each chunk's exit step, context pass); one decoded frame per video (`reward.frame`)
is scored by a differentiable reward with gradient through the decoder into the generator
(reward_forcing/training/frame_reward.py), and the loss is -mean R. No teacher, no critic. The same term,
weighted by `reward.feedback_weight`, can be added to DMD / Re-DMD (`trainer: distill`, the paper's
"distillation + reward" comparison).
"""
from reward_forcing.errors import ConfigError
from reward_forcing.inference.generator import latent_size
from reward_forcing.rewards.registry import check_reward
from reward_forcing.training.data import PromptStream, read_prompt_texts
from reward_forcing.training.frame_reward import DIFFERENTIABLE_EXAMPLES, FrameReward, choose_frames
from reward_forcing.training.loop import SingleNetworkMethod
from reward_forcing.training.networks import frozen_text_encoder, sharded_student
from reward_forcing.training.rollout import training_rollout, training_sampler
from reward_forcing.training.state import export_generator


class RewardFeedback(SingleNetworkMethod):
    name = "reward feedback"
    ema_of = "generator"

    @classmethod
    def check(cls, cfg) -> None:
        reward = check_reward(cfg.reward)
        if not reward.differentiable:
            raise ConfigError(f"trainer reward_feedback needs a differentiable reward; '{cfg.reward.name}' is not "
                              f"(use reward.name={' or '.join(DIFFERENTIABLE_EXAMPLES)})")
        if reward.input == "pixels" and cfg.decoder != "vae":  # a latent reward loads no decoder at all
            raise ConfigError(f"reward '{cfg.reward.name}' reads pixels, which reward feedback decodes through the "
                              f"Wan VAE's causal decoder: set decoder=vae (not '{cfg.decoder}')")

    def __init__(self, run):
        super().__init__(run)
        cfg, info, dtype = self.cfg, self.info, run.dtype
        self.generator = sharded_student(cfg, info, dtype).train()
        self.generator.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        self.sampler = training_sampler(self.generator, cfg)
        self.latent_hw = latent_size(cfg, self.generator.patch_size)
        self.text_encoder = frozen_text_encoder(cfg, info, dtype)
        self.reward = FrameReward.from_config(cfg, info, dtype)
        self.optimizer = self.add_network("generator", self.generator, cfg.lr_generator).optimizer
        self.prompts = PromptStream(read_prompt_texts(cfg.prompt_path), run.seed, "generator")

    def micro_step(self, step: int, micro: int) -> dict:
        cfg, run = self.cfg, self.run
        ids = run.sample_ids(micro)  # global sample indices of this optimiser step
        prompts = [self.prompts[step * cfg.grad_accum * run.global_batch + i] for i in ids]
        context = self.text_encoder.encode(prompts).to(run.dtype)
        x = training_rollout(self.sampler, cfg, context, self.latent_hw, run.seed, "generator", step, micro, ids,
                             run.dtype, with_grad=True)
        chosen = choose_frames(cfg.reward.frame, self.reward.num_pixel_frames(x.shape[2]), run.seed, step, ids)
        scores = self.reward(x, prompts, chosen)
        loss = -scores.mean() / cfg.grad_accum
        loss.backward()
        return {"loss": loss.detach(), "reward": scores.detach().mean()}

    def export(self, average) -> list:
        return export_generator(self.run.logdir / "generator", self.generator, average, self.info.is_main)
