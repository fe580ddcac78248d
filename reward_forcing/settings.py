"""The types of every setting: what reward_forcing/config.py checks a merged config against.

The values and what each key does are documented once, in the packaged defaults (reward_forcing/defaults/*.yaml);
this module says what kind of value each key takes. A choice is an Enum, so an unknown value is refused in one line
naming the choices, and a number, flag or list of the wrong type is refused the same way. Every field here must be
set by the defaults, and every default must have a field here (config.load_defaults checks both).
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A setting with a fixed set of values; compares, formats and serialises as its value."""

    def __str__(self) -> str:
        return self.value


def choice(name: str, *values: str) -> type[Choice]:
    """A Choice whose members are named by their values."""
    return Choice(name, [(value, value) for value in values])


Trainer = choice("Trainer", "distill", "ode", "diffusion", "reward_feedback")
DistillLoss = choice("DistillLoss", "dmd", "re_dmd")
UpdateSchedule = choice("UpdateSchedule", "corrected", "upstream")
LrSchedule = choice("LrSchedule", "constant", "cosine")
RolloutCache = choice("RolloutCache", "full", "window")
CacheGrad = choice("CacheGrad", "straight_through", "detached")
Decoder = choice("Decoder", "vae", "taehv", "none")
SinkMode = choice("SinkMode", "none", "static", "ema")
SwitchSink = choice("SwitchSink", "keep", "recache")
SigmaLookup = choice("SigmaLookup", "nearest", "exact")
WandbMode = choice("WandbMode", "online", "offline", "disabled")
SaveDtype = choice("SaveDtype", "float16", "float32")
RewardName = choice("RewardName", "videoalign", "latent_motion", "imagereward", "blob_quality")
WeightNorm = choice("WeightNorm", "none", "batch_mean")
RewardInput = choice("RewardInput", "native", "upstream")
RewardPlacement = choice("RewardPlacement", "rank0", "every_rank")
RewardFrame = choice("RewardFrame", "last", "random", "all")


@dataclass
class TextEncoderSettings:
    vocab_size: int = MISSING
    d_model: int = MISSING
    d_kv: int = MISSING
    d_ff: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    relative_attention_num_buckets: int = MISSING
    relative_attention_max_distance: int = MISSING
    text_len: int = MISSING


@dataclass
class VaeSettings:
    base_dim: int = MISSING
    z_dim: int = MISSING
    dim_mult: List[int] = MISSING
    num_res_blocks: int = MISSING
    temperal_downsample: List[bool] = MISSING


@dataclass
class RewardSettings:
    name: RewardName = MISSING
    score_key: str = MISSING
    beta: float = MISSING
    weight_clip: Optional[float] = MISSING
    weight_norm: WeightNorm = MISSING
    input: RewardInput = MISSING
    placement: RewardPlacement = MISSING
    frame: RewardFrame = MISSING
    feedback_weight: float = MISSING
    world_path: Optional[str] = MISSING
    videoalign_dir: str = MISSING
    qwen_dir: str = MISSING
    imagereward_dir: str = MISSING
    check_template: bool = MISSING


@dataclass
class InferenceSettings:
    checkpoint_path: Optional[str] = MISSING
    data_path: Optional[str] = MISSING
    switch_prompts: Optional[str] = MISSING
    extended_prompt_path: Optional[str] = MISSING
    output_folder: Optional[str] = MISSING
    num_output_frames: int = MISSING
    num_samples: int = MISSING
    use_ema: bool = MISSING
    save_with_index: bool = MISSING
    overwrite: bool = MISSING
    device: str = MISSING
    image_path: Optional[str] = MISSING
    extend_video: Optional[str] = MISSING
    keep_prefix: bool = MISSING


@dataclass
class ConditioningSettings:
    max_pixels: int = MISSING
    max_upscale: float = MISSING


@dataclass
class ServeSettings:
    max_prompt_chars: int = MISSING
    max_queue: int = MISSING
    max_frames: int = MISSING
    keep_videos: int = MISSING
    jpeg_quality: int = MISSING
    max_unsent_mib: int = MISSING
    stall_timeout_s: int = MISSING
    max_image_bytes: int = MISSING
    image_types: List[str] = MISSING
    keep_images: int = MISSING


@dataclass
class Settings:
    # assets (defaults/base.yaml)
    checkpoint_dir: str = MISSING
    model_name: str = MISSING
    real_name: str = MISSING
    fake_name: str = MISSING
    generator_ckpt: Optional[str] = MISSING
    text_encoder: TextEncoderSettings = field(default_factory=TextEncoderSettings)
    vae: VaeSettings = field(default_factory=VaeSettings)
    decoder: Decoder = MISSING
    taehv_path: str = MISSING
    # video
    height: int = MISSING
    width: int = MISSING
    fps: int = MISSING
    # streaming student
    num_frame_per_block: int = MISSING
    local_attn_size: int = MISSING
    sink_size: int = MISSING
    sink_mode: SinkMode = MISSING
    compression_alpha: float = MISSING
    switch_sink: SwitchSink = MISSING
    # flow-matching schedule
    timestep_shift: float = MISSING
    denoising_step_list: List[float] = MISSING
    warp_denoising_step: bool = MISSING
    sigma_lookup: SigmaLookup = MISSING
    context_noise: float = MISSING
    # runtime
    seed: int = MISSING
    mixed_precision: bool = MISSING
    compile: bool = MISSING
    overlap_decode: bool = MISSING
    # image-to-video and video continuation (defaults/base.yaml)
    conditioning: ConditioningSettings = field(default_factory=ConditioningSettings)
    # inference.py and the server (defaults/inference.yaml, defaults/serve.yaml)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    # training (defaults/training.yaml)
    trainer: Trainer = MISSING
    distill_loss: DistillLoss = MISSING
    prompt_path: str = MISSING
    schedule: UpdateSchedule = MISSING
    max_steps: int = MISSING
    save_every: int = MISSING
    keep_checkpoints: int = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    dfake_gen_update_ratio: int = MISSING
    lr_generator: float = MISSING
    lr_critic: float = MISSING
    adam_betas: List[float] = MISSING
    weight_decay: float = MISSING
    adam_eps: float = MISSING
    lr_schedule: LrSchedule = MISSING
    lr_warmup_steps: int = MISSING
    grad_clip: float = MISSING
    ema_decay: Optional[float] = MISSING
    ema_start: int = MISSING
    num_training_frames: int = MISSING
    rollout_cache: RolloutCache = MISSING
    rollout_cache_grad: CacheGrad = MISSING
    same_step_across_blocks: bool = MISSING
    first_frame_prob: float = MISSING
    last_step_only: bool = MISSING
    score_timestep_shift: float = MISSING
    min_score_timestep: float = MISSING
    max_score_timestep: float = MISSING
    guidance_scale: float = MISSING
    negative_prompt: str = MISSING
    reward: RewardSettings = field(default_factory=RewardSettings)
    gradient_checkpointing: bool = MISSING
    fsdp_replicate: int = MISSING
    fsdp_reduce_every_micro_step: bool = MISSING
    sequence_parallel: int = MISSING
    wandb_mode: WandbMode = MISSING
    wandb_project: str = MISSING
    wandb_run_name: Optional[str] = MISSING
    # ODE pairs and regression (defaults/ode.yaml)
    ode_teacher_name: str = MISSING
    ode_teacher_causal: bool = MISSING
    ode_num_steps: int = MISSING
    ode_shift: float = MISSING
    ode_guidance_scale: float = MISSING
    ode_keep_indices: List[int] = MISSING
    ode_num_frames: int = MISSING
    ode_shard_size: int = MISSING
    ode_save_dtype: SaveDtype = MISSING
    data_path: Optional[str] = MISSING
    ode_timesteps: List[float] = MISSING
    ode_warp_timesteps: bool = MISSING
    # flow matching of a bidirectional Wan, or of the causal one with teacher forcing (defaults/diffusion.yaml)
    causal: bool = MISSING
    diffusion_text_dropout: float = MISSING
    diffusion_timestep_shift: float = MISSING


# Keys that moved; a config still using the old name is refused with one line naming the new place.
MOVED_KEYS = {
    "reward_beta": "reward.beta",
    "reward_weight_clip": "reward.weight_clip",
    "reward_weight_norm": "reward.weight_norm",
    "reward_input": "reward.input",
    "reward_placement": "reward.placement",
    "reward_frame": "reward.frame",
    "reward_feedback_weight": "reward.feedback_weight",
    "reward_dir": "reward.videoalign_dir",
    "reward_base_dir": "reward.qwen_dir",
    "imagereward_dir": "reward.imagereward_dir",
    "reward_check_template": "reward.check_template",
}
