"""The `reward:` settings (reward_forcing/settings.py RewardSettings) -> a Reward (reward_forcing/rewards/base.py).

    reward.name       which scorer: a key of REWARDS
    reward.score_key  which of its per-sample scores drives the Re-DMD weight w = exp(reward.beta * score)
A pixel reward reads what the caller's decoder makes of the latents (reward_forcing/models/decoder.py).
Importing a scorer loads no model (its from_settings does), so a run still loads only the reward it names.
"""
from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.blob_reward import BlobQualityReward
from reward_forcing.miniworld.reward import LatentMotionReward
from reward_forcing.rewards.imagereward_scorer import ImageRewardReward
from reward_forcing.rewards.videoalign_scorer import VideoAlignReward

REWARDS = {
    "videoalign": VideoAlignReward,
    "latent_motion": LatentMotionReward,
    "imagereward": ImageRewardReward,
    "blob_quality": BlobQualityReward,
}  # in reward_forcing/settings.py RewardName's order


def check_reward(reward):
    """The class of the scorer `reward` names, once its settings are known to fit it (before any model loads, so a
    typo costs one line, not a model load)."""
    cls = REWARDS[reward.name]
    if reward.score_key not in cls.keys:
        raise ConfigError(f"reward.score_key '{reward.score_key}' is not a score of reward '{reward.name}' "
                          f"(it gives: {', '.join(cls.keys)})")
    if reward.input == "upstream" and reward.name != "videoalign":
        raise ConfigError(f"reward.input 'upstream' is upstream's VideoAlign input path; reward.name is "
                          f"'{reward.name}'")
    return cls


def build_reward(reward, checkpoint_dir, fps: float, info, dtype, decoder=None):
    """The scorer of `reward` on this rank's device: its weights under `checkpoint_dir`, videos at `fps`, pixels from
    `decoder` (pixel rewards only). info: the trainer's DistInfo (placement, device)."""
    return check_reward(reward).from_settings(reward, checkpoint_dir, fps, info, dtype, decoder)
