"""Sampling and scoring the miniature world's models: the streaming student (inference code, with the distill
stage's KV cache and sink) and per-video statistics read back by the world's detector."""
import torch

from reward_forcing.errors import ConfigError

EVAL_BATCH = 64
SINKS = {"none": ["sink_size=0", "sink_mode=none"], "static": ["sink_mode=static"], "ema": ["sink_mode=ema"]}
COPY_SIMILARITY = 0.95
# a continuation keeps the given first frame's blob when it moves at most this many times the world's max_speed
# from frame 0 to frame 1: the world's own step is at most 1 x max_speed, and the detector's position error on a
# generated frame takes about another step (world.py, detector.py); a bigger jump is a blob placed anew
JUMP_SPEEDS = 2.0  # a frame whose foreground has cosine >= this to the first chunk's is a copy of it


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
                   sink: str | None = None, first_frame: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [N, C, frames, h, w] of the streaming sampler (reward_forcing/inference) with the stage config's
    cache, optionally with another sink; with first_frame (clean latents [N, C, 1, h, w]) each video starts from
    its own (image-to-video: chunk 0 keeps it as frame 0, reward_forcing/inference/generator.py)."""
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
            picture = {} if first_frame is None else {"first_frame": first_frame[first:first + EVAL_BATCH]}
            videos.append(torch.cat(list(sampler.stream(context, frames, hw, generator=generator, **picture)), dim=2))
    return torch.cat(videos)


def score_continuations(world, given: torch.Tensor, latents: torch.Tensor, prompts: list[str]) -> dict:
    """Image-to-video videos latents [N, C, F, h, w] started from the frames given [N, C, 1, h, w]: score_videos of
    the generated frames 1.. and, per video, position_jump (torus distance in pixels between the blob detected in
    the given frame and in generated frame 1) and position_kept (1.0 when position_jump <= JUMP_SPEEDS x the
    world's max_speed)."""
    from reward_forcing.miniworld.detector import detect_frames, torus_steps

    position = detect_frames(world, torch.cat([given, latents[:, :, 1:2]], dim=2))["position"]
    jump = torus_steps(world, position)[:, 0].norm(dim=-1)
    kept = (jump <= JUMP_SPEEDS * world.spec.max_speed).float()
    return score_videos(world, latents[:, :, 1:], prompts) | {"position_jump": jump.tolist(),
                                                                "position_kept": kept.tolist()}


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
