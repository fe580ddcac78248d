"""The networks trainers build, sharded with FSDP2 (reward_forcing/training/parallel.py): the causal student, a
bidirectional Wan model (teacher, critic, diffusion target) and the frozen text encoder. Each is built on the meta
device and filled from weights only rank 0 reads; the DiTs split their tokens over the sequence-parallel ranks
(reward_forcing/training/sequence_parallel.py)."""
from functools import partial

from reward_forcing.checkpoints import asset_path, load_generator_state_dict, load_wan_folder, read_wan_config
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.wan import WanModel
from reward_forcing.training.parallel import load_sharded, shard_model
from reward_forcing.training.sequence_parallel import split_sequence


def sharded_student(cfg, info, dtype):
    """The causal student: architecture from the Wan folder `model_name`, weights from `generator_ckpt` when given
    (strict), else that folder's; sharded block by block."""
    base = asset_path(cfg.checkpoint_dir, cfg.model_name)
    init = asset_path(cfg.checkpoint_dir, cfg.generator_ckpt) if cfg.generator_ckpt else None
    build = partial(CausalWanModel.from_config, read_wan_config(base), num_frame_per_block=int(cfg.num_frame_per_block),
                    local_attn_size=int(cfg.local_attn_size))
    weights = (lambda: load_generator_state_dict(init)) if init else (lambda: load_wan_folder(base)[1])
    return split_sequence(load_sharded(build, weights, info, dtype, str(init or base)), info)


def sharded_wan(cfg, info, dtype, name):
    """The bidirectional Wan model of folder `name` (under checkpoint_dir) and its config.json, sharded per block."""
    folder = asset_path(cfg.checkpoint_dir, name)
    config = read_wan_config(folder)
    model = load_sharded(partial(WanModel.from_config, config), lambda: load_wan_folder(folder)[1], info, dtype,
                         str(folder))
    return split_sequence(model, info), config


def configured_reward(cfg, info, dtype):
    """The scorer the `reward:` section names (reward_forcing/rewards/registry.py); a pixel reward reads what the
    configured `decoder` makes of the latents."""
    from reward_forcing.models.decoder import load_decoder
    from reward_forcing.rewards.registry import build_reward, check_reward

    pixels = check_reward(cfg.reward).input == "pixels"
    decoder = load_decoder(cfg, info.device, dtype) if pixels else None
    return build_reward(cfg.reward, cfg.checkpoint_dir, cfg.fps, info, dtype, decoder)


def frozen_text_encoder(cfg, info, dtype):
    """The umT5 encoder of `model_name`, frozen. No fp32 master copy: in bf16 the file's (mmapped, bf16) tensors are
    adopted without a copy, and ranks on one node share those pages until sharding moves each rank's part."""
    from reward_forcing.models.text_encoder import TextEncoder

    encoder = TextEncoder.from_wan_folder(asset_path(cfg.checkpoint_dir, cfg.model_name), cfg.text_encoder, device="cpu",
                                          dtype=dtype)
    shard_model(encoder.model, info, dtype)  # the umT5 stack; the wrapper only tokenises
    return encoder
