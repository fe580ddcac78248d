"""Sampling and scoring the miniature world's models: the streaming student (inference code, with the distill
stage's KV cache and sink) and per-video statistics read back by the world's detector."""
import torch

from reward_forcing.errors import ConfigError

EVAL_BATCH = 64
SINKS = {"none": ["sink_size=0", "sink_mode=none"], "static": ["sink_mode=static"], "ema": ["sink_mode=ema"]}
COPY_SIMILARITY = 0.95  # a frame whose foreground has cosine >= this to the first chunk's is a copy of it


def sink_overrides(sink: str) -> list[str]:
    """A long-rollout sink setting: none / static / ema (the config's compression_alpha) or ema_a<alpha>."""
    if sink.startswith("ema_a"):
        return ["sink_mode=ema", f"compression_alpha={float(sink[len('ema_a'):])}"]
    if sink not in SINKS:
        raise ConfigError(f"unknown sink '{sink}' (none, static, ema or ema_a<alpha>)")
    return SINKS[sink]


def balanced_prompts(world, per_colour: int) -> list[str]:
    return [world.prompt(i % len(world.spec.colours)) for i in range(per_colour * len(world.spec.colours))]


def score_videos(world, latents: torch.Tensor, prompts: list[str]) -> dict:
    """Per-video lists: color_correct, validity, speed, path_speed, straightness, reward (the world's motion score,
    Re-DMD's) and quality (blob_quality over every frame, reward feedback's)."""
    from reward_forcing.miniworld.blob_reward import BlobQualityReward
    from reward_forcing.miniworld.detector import video_stats
    from reward_forcing.miniworld.reward import LatentMotionReward

    stats = video_stats(world, latents, [world.colour_of(p) for p in prompts])
    reward = LatentMotionReward(world).score(latents, prompts)["motion"]
    quality = BlobQualityReward(world).score(latents, prompts)["quality"]
    keys = ("color_correct", "validity", "speed", "path_speed", "straightness")
    return {key: stats[key].tolist() for key in keys} | {"reward": reward.tolist(), "quality": quality.tolist()}


def sample_student(config, overrides: list[str], checkpoint, prompts: list[str], frames: int, seed: int,
                   sink: str | None = None) -> torch.Tensor:
    """Latents [N, C, frames, h, w] of the streaming sampler (reward_forcing/inference) with the stage config's
    cache, optionally with another sink."""
    from reward_forcing.config import load_config
    from reward_forcing.inference.generator import StreamingGenerator, latent_size
    from reward_forcing.inference.pipeline import load_student, load_text_encoder

    extra = sink_overrides(sink) if sink is not None else []
    cfg = load_config(config, [*overrides, *extra])
    model, _ = load_student(cfg, checkpoint)
    encoder = load_text_encoder(cfg, torch.device("cpu"), torch.float32)
    sampler = StreamingGenerator.from_config(model, cfg)
    hw = latent_size(cfg, model.patch_size)
    generator = torch.Generator().manual_seed(seed)
    videos = []
    with torch.no_grad():
        for first in range(0, len(prompts), EVAL_BATCH):
            context = encoder.encode(prompts[first:first + EVAL_BATCH])
            videos.append(torch.cat(list(sampler.stream(context, frames, hw, generator=generator)), dim=2))
    return torch.cat(videos)


def long_curves(world, latents: torch.Tensor, prompts: list[str], chunk: int) -> dict:
    """Per-frame curves over a batch of long rollouts (means over the videos): validity (fraction of valid
    frames), color_drift (fraction whose colour is not the prompt's), first_chunk_similarity (cosine of each
    frame's foreground, latent minus background, to the first chunk's mean foreground) and copies (fraction of
    videos whose frame is a near-copy of the first chunk, similarity >= COPY_SIMILARITY)."""
    from reward_forcing.miniworld.detector import detect_frames

    frames = detect_frames(world, latents)
    target = torch.tensor([world.colour_of(p) for p in prompts])[:, None]
    rest = (latents - world.background[None, :, None]).transpose(1, 2).flatten(2)  # [B, F, C*H*W]
    first = rest[:, :chunk].mean(dim=1, keepdim=True)
    similarity = torch.nn.functional.cosine_similarity(rest, first.expand_as(rest), dim=2)
    return {"validity": frames["valid"].float().mean(0).tolist(),
            "color_drift": (frames["colour"] != target).float().mean(0).tolist(),
            "first_chunk_similarity": similarity.mean(0).tolist(),
            "copies": (similarity >= COPY_SIMILARITY).float().mean(0).tolist()}
