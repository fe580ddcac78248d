"""`reward: {name: imagereward}`: ImageReward (reward_forcing/rewards/imagereward.py) on one frame of each decoded
video, differentiable in the pixels: the reward of arXiv 2601.16933's reward-feedback fine-tuning.

It scores the last frame of the video it is handed (`reward.frame: all`: every frame, averaged), so a trainer
that decodes only the frame it wants scored hands over a one-frame video
(reward_forcing/training/reward_feedback.py).
"""
from reward_forcing.checkpoints import asset_path
from reward_forcing.rewards.base import Reward


class ImageRewardReward(Reward):
    input = "pixels"
    differentiable = True
    keys = ("ImageReward",)

    def __init__(self, model, decoder, all_frames: bool = False):
        """model: an ImageReward; all_frames: average over every frame instead of scoring the last."""
        super().__init__(decoder)
        self.model, self.all_frames = model, all_frames

    @classmethod
    def from_settings(cls, reward, checkpoint_dir, fps, info, dtype, decoder):
        from reward_forcing.rewards.imagereward import ImageReward

        model = ImageReward.from_checkpoint(asset_path(checkpoint_dir, reward.imagereward_dir), device=info.device,
                                            dtype=dtype)
        return cls(model, decoder, all_frames=reward.frame == "all")

    def score(self, videos, prompts) -> dict:
        """videos [B, 3, T, H, W] in [-1, 1] -> {"ImageReward": [B]}."""
        if not self.all_frames:
            return {"ImageReward": self.model.score(videos[:, :, -1], prompts)}
        b, _, t = videos.shape[:3]
        images = videos.transpose(1, 2).flatten(0, 1)
        scores = self.model.score(images, [p for p in prompts for _ in range(t)])
        return {"ImageReward": scores.view(b, t).mean(1)}
