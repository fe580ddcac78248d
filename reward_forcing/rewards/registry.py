"""The config's `reward:` section -> a Reward (reward_forcing/rewards/base.py).

    reward.name       which scorer: a key of REWARDS
    reward.score_key  which of its per-sample scores drives the Re-DMD weight w = exp(reward_beta * score)
Pixel rewards decode through `decoder` (vae: the Wan VAE, as upstream; taehv; none: the latents as they are).
Importing a scorer loads no model (its from_config does), so a run still loads only the reward it names.
"""
from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.blob_reward import BlobQualityReward
from reward_forcing.miniworld.reward import LatentMotionReward
from reward_forcing.models.decoder import load_decoder
from reward_forcing.rewards.base import IdentityDecoder
from reward_forcing.rewards.imagereward_scorer import ImageRewardReward
from reward_forcing.rewards.videoalign_scorer import REWARD_INPUTS, VideoAlignReward

REWARDS = {
    "videoalign": VideoAlignReward,
    "latent_motion": LatentMotionReward,
    "blob_quality": BlobQualityReward,
    "imagereward": ImageRewardReward,
}
DECODERS = ("vae", "taehv", "none")


def reward_class(name: str):
    if name not in REWARDS:
        raise ConfigError(f"reward.name must be one of {', '.join(REWARDS)}; got '{name}'")
    return REWARDS[name]


def reward_decoder(cfg, device, dtype):
    """What turns latents into the pixels a pixel reward reads."""
    if cfg.decoder == "none":
        return IdentityDecoder()
    return load_decoder(cfg, device, dtype)


def check_reward_config(cfg):
    """The configured reward's class, once the section is known to name a scorer, a score it gives and a decoder
    (checked before any model loads, so a typo costs one line, not a model load)."""
    cls = reward_class(cfg.reward.name)
    if cfg.reward.score_key not in cls.keys:
        raise ConfigError(f"reward.score_key '{cfg.reward.score_key}' is not a score of reward "
                          f"'{cfg.reward.name}' (it gives: {', '.join(cls.keys)})")
    if cfg.decoder not in DECODERS:
        raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}; got '{cfg.decoder}'")
    if cfg.reward_input not in REWARD_INPUTS:
        raise ConfigError(f"reward_input must be one of {', '.join(REWARD_INPUTS)}; got '{cfg.reward_input}'")
    if cfg.reward_input == "upstream" and cfg.reward.name != "videoalign":
        raise ConfigError(f"reward_input 'upstream' is upstream's VideoAlign input path; reward.name is "
                          f"'{cfg.reward.name}'")
    return cls


def build_reward(cfg, info, dtype):
    """The configured reward, on this rank's device. info: the trainer's DistInfo (placement, device)."""
    cls = check_reward_config(cfg)
    decoder = reward_decoder(cfg, info.device, dtype) if cls.input == "pixels" else None
    return cls.from_config(cfg, info, dtype, decoder)
