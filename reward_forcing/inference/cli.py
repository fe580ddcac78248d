"""inference.py: a prompt file in, one mp4 per (prompt, sample) out, sharded over torchrun ranks.

Flags keep upstream's names; each sets the `inference.*` config key of the same name (`--seed` sets
`seed`), so defaults come from the config and trailing `key=value` overrides work for every key.
Everything the user can get wrong is checked before any file is written.
"""
import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from reward_forcing.checkpoints import download_hint
from reward_forcing.config import load_config, save_config
from reward_forcing.errors import CheckpointError, ConfigError, OneLineParser
from reward_forcing.inference.conditioning import CheckedCondition, Conditioning, check_condition
from reward_forcing.inference.generator import check_num_frames, pixel_frames
from reward_forcing.inference.jobs import shard, video_seed
from reward_forcing.distributed import compute_dtype
from reward_forcing.inference.pipeline import VideoPipeline, resolve_device
from reward_forcing.inference.provenance import (certain_weights, check_output_folder, finished_before,
                                                 settings_before_loading, video_record, video_settings)
from reward_forcing.inference.segments import Segment, read_switch_prompts, segment_records, switch_schedule, total_frames
from reward_forcing.progress import progress
from reward_forcing.video import (ConditionFile, Mp4Writer, Prompt, PromptFileError, append_manifest, compact_manifest,
                                  read_manifest, read_prompts, remove_stale_partials, unique_by_stem, video_name,
                                  video_stem)

MANIFEST = "manifest.jsonl"
SAVED_CONFIG = "config.yaml"

# flag -> config key it sets
FLAG_KEYS = {
    "checkpoint_path": "inference.checkpoint_path",
    "data_path": "inference.data_path",
    "switch_prompts": "inference.switch_prompts",
    "extended_prompt_path": "inference.extended_prompt_path",
    "output_folder": "inference.output_folder",
    "num_output_frames": "inference.num_output_frames",
    "use_ema": "inference.use_ema",
    "seed": "seed",
    "num_samples": "inference.num_samples",
    "save_with_index": "inference.save_with_index",
    "overwrite": "inference.overwrite",
    "image_path": "inference.image_path",
    "extend_video": "inference.extend_video",
    "keep_prefix": "inference.keep_prefix",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Stream text-to-video with the Reward Forcing student.")
    p.add_argument("--config_path", help="YAML merged over the packaged defaults: a path, or a preset's name "
                                         "(tiny, reward_forcing, ...: the repository's configs/, installed with "
                                         "the package)")
    p.add_argument("--checkpoint_path", help="student weights: flat, or with generator / generator_ema sections")
    p.add_argument("--data_path", help="prompt file, one prompt per line; or JSONL (FILE.jsonl), one object per "
                                       'line: {"prompt": "...", "image": "start.png"} or {..., "video": "clip.mp4"} '
                                       "(image / video optional, paths relative to the JSONL file)")
    p.add_argument("--switch_prompts", metavar="FILE.jsonl",
                   help="instead of --data_path: one video per line, a JSON array of segments "
                        '[{"prompt": "...", "latent_frames": 21}, ...] (multiples of the chunk); '
                        "the prompt switches at each segment; the file is named after the first")
    p.add_argument("--extended_prompt_path", help="line-aligned extended prompts (used for generation)")
    p.add_argument("--output_folder", help="where videos, manifest.jsonl and config.yaml are written")
    p.add_argument("--num_output_frames", type=int,
                   help="latent frames (21 -> 81 video frames: 1 + 4*(n-1)); a multiple of num_frame_per_block")
    p.add_argument("--image_path", metavar="FILE",
                   help="every video starts from this picture: its centred crop, resized to height x width, is "
                        "frame 0 (a JSONL line's own image or video wins)")
    p.add_argument("--extend_video", metavar="FILE",
                   help="every video continues this video: its last whole chunks (resampled to fps) are encoded and "
                        "--num_output_frames new latent frames follow; the file holds the new frames only")
    p.add_argument("--keep_prefix", action="store_true", default=None,
                   help="with a video to continue: the output repeats it (as decoded) before the new frames")
    p.add_argument("--i2v", action="store_true", help="upstream's flag; use --image_path FILE instead")
    p.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA weights where the checkpoint has them (the default, inference.use_ema): the "
                        "generator_ema section, or generator_ema.safetensors beside an exported "
                        "generator.safetensors; a file without them is used as it is (the `weights:` line says "
                        "which were read). --no-use_ema: the generator weights")
    p.add_argument("--seed", type=int,
                   help="base seed; each video's seed is a hash of (seed, prompt index, sample index), the index "
                        "counting non-blank lines: not the prompt text, so different prompts on the same line get "
                        "the same seeds; any number of processes, in any order, makes the same videos")
    p.add_argument("--num_samples", type=int, help="videos per prompt")
    p.add_argument("--save_with_index", action="store_true", default=None, help="name files by prompt index")
    p.add_argument("--overwrite", action="store_true", default=None, help="regenerate existing videos")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. height=256 width=384")
    return p


def load_run_config(argv=None):
    args = build_parser().parse_args(argv)
    if args.i2v:
        raise ConfigError("--i2v is not supported: give --image_path FILE, or \"image\" on the lines of a JSONL "
                          "prompt file")
    cfg = load_config(args.config_path, args.overrides)
    apply_flags(cfg, args)
    validate(cfg)
    return cfg


def apply_flags(cfg, args) -> None:
    """Each flag given sets its config key (FLAG_KEYS); the server (reward_forcing.serve) loads the same way."""
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            OmegaConf.update(cfg, key, value, merge=False)


def validate_model(cfg) -> None:
    """The checks every user of the loaded model shares (inference.py and the server); types are the config's."""
    if cfg.inference.checkpoint_path is not None and not Path(cfg.inference.checkpoint_path).exists():
        path = cfg.inference.checkpoint_path
        raise CheckpointError(f"checkpoint not found: {path}{download_hint(path)}")


def validate(cfg) -> None:
    run = cfg.inference
    if not run.output_folder:
        raise ConfigError("--output_folder is required (or inference.output_folder in the config)")
    if bool(run.data_path) == bool(run.switch_prompts):
        raise ConfigError("give exactly one of --data_path and --switch_prompts (or inference.* in the config)")
    if run.switch_prompts and run.extended_prompt_path:
        raise ConfigError("--extended_prompt_path pairs with --data_path; --switch_prompts segments hold the prompts")
    if run.num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {run.num_samples}")
    if run.image_path and run.extend_video:
        raise ConfigError("give at most one of --image_path (start from a picture) and --extend_video (continue a "
                          "video)")
    validate_model(cfg)
    check_num_frames(run.num_output_frames, cfg.num_frame_per_block)
    if Path(run.output_folder).exists() and not Path(run.output_folder).is_dir():
        raise ConfigError(f"output folder {run.output_folder} exists and is not a directory")


@dataclass(frozen=True)
class Job:
    prompt: Prompt
    stem: str
    segments: tuple[Segment, ...] = ()  # --switch_prompts: the prompt changes at each segment
    condition: CheckedCondition | None = None  # the picture it starts from or the video it continues

    def num_frames(self, default: int) -> int:
        return total_frames(self.segments) if self.segments else default


def plan_jobs(cfg) -> tuple[list[Job], int]:
    """Unique prompts with their file stems, and the number of blank lines skipped. Every picture or video to start
    from is read through here, before anything is generated."""
    run = cfg.inference
    last_sample = int(run.num_samples) - 1

    def stem_of(prompt):
        return str(prompt.index) if run.save_with_index else video_stem(prompt.text, last_sample)

    flag = _flag_condition(run)
    if run.switch_prompts:
        jobs, blank = plan_switch_jobs(cfg, stem_of), 0
        jobs = [replace(job, prompt=replace(job.prompt, condition=flag)) for job in jobs]
    else:
        prompts, blank = read_prompts(run.data_path, run.extended_prompt_path)
        prompts = [prompt if prompt.condition else replace(prompt, condition=flag) for prompt in prompts]
        jobs = [Job(p, stem_of(p)) for p in unique_by_stem(prompts, stem_of)]
    conditioning = Conditioning.from_config(cfg)
    files = [file for file in dict.fromkeys(job.prompt.condition for job in jobs) if file is not None]
    checked = {file: check_condition(conditioning, file) for file in files}
    return [replace(job, condition=checked.get(job.prompt.condition)) for job in jobs], blank


def _flag_condition(run) -> ConditionFile | None:
    if run.image_path:
        return ConditionFile("image", Path(run.image_path), "--image_path")
    if run.extend_video:
        return ConditionFile("video", Path(run.extend_video), "--extend_video")
    return None


def plan_switch_jobs(cfg, stem_of) -> list[Job]:
    """One job per line of --switch_prompts, named after its first segment's prompt."""
    videos = read_switch_prompts(cfg.inference.switch_prompts, int(cfg.num_frame_per_block))
    jobs, line_of_stem = [], {}
    for index, segments in enumerate(videos):
        prompt = Prompt(index, segments[0].prompt)
        job = Job(prompt, stem_of(prompt), segments)
        if job.stem in line_of_stem:
            raise PromptFileError(f"videos {line_of_stem[job.stem] + 1} and {index + 1} of {cfg.inference.switch_prompts} "
                                  f"would both be named {job.stem!r} (same first prompt); use --save_with_index")
        line_of_stem[job.stem] = index
        jobs.append(job)
    return jobs


def init_distributed(device_name: str):
    """(rank, world_size, device). torchrun sets WORLD_SIZE; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _sum_over_ranks(values: list[float], device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def planned_videos(cfg, jobs: list[Job], settings: dict) -> dict:
    """{file name: what shapes it} for every video of this run (all ranks)."""
    return {video_name(job.stem, sample): video_record(settings, video_seed(int(cfg.seed), job.prompt.index, sample),
                                                       segment_records(job.segments) if job.segments
                                                       else job.prompt.generation_text,
                                                       _condition_record(cfg, job))
            for job in jobs for sample in range(int(cfg.inference.num_samples))}


def _condition_record(cfg, job: Job) -> dict | None:
    return job.condition.record(bool(cfg.inference.keep_prefix)) if job.condition else None


def generate(cfg, pipeline, jobs: list[Job], rank: int, settings: dict) -> list[float]:
    """Write this rank's videos; returns [written, skipped, frames, seconds spent generating]."""
    run = cfg.inference
    out = Path(run.output_folder)
    written = skipped = frames_total = busy = 0
    bar = progress(jobs, f"prompts (rank {rank})", unit="prompt", enabled=rank == 0)
    for job in bar:
        context = None
        num_frames = job.num_frames(int(run.num_output_frames))
        condition, keep_prefix = job.condition, bool(run.keep_prefix)
        expected = condition.pixel_frames(cfg, num_frames, keep_prefix) if condition else pixel_frames(cfg, num_frames)
        chunks_out = (num_frames + (condition.prefix_latent_frames if condition and keep_prefix else 0)) \
            // int(cfg.num_frame_per_block)
        for sample in range(int(run.num_samples)):
            name = video_name(job.stem, sample)
            if (out / name).exists() and not run.overwrite:
                skipped += 1
                continue
            if context is None:
                context = pipeline.encode(job.prompt.generation_text)
                switch = switch_schedule(job.segments, pipeline.encode) if job.segments else None
                video_start = pipeline.start_from(**condition.start_arguments(keep_prefix)) if condition else None
            seed = video_seed(int(cfg.seed), job.prompt.index, sample)
            start = time.perf_counter()
            with Mp4Writer(out / name, fps=int(cfg.fps)) as writer:
                chunks = progress(pipeline.frames(context, num_frames, seed, switch=switch, start=video_start),
                                  f"  {name[:40]}", total=chunks_out, unit="chunk", nested=True, enabled=rank == 0)
                for frames in chunks:
                    writer.append(frames)
            elapsed = time.perf_counter() - start
            if writer.frames != expected:
                raise RuntimeError(f"{name}: decoded {writer.frames} frames, expected {expected}")
            append_manifest(out / MANIFEST, {
                "prompt_index": job.prompt.index, "sample": sample, "prompt": job.prompt.text,
                "extended_prompt": job.prompt.extended, "seed": seed, "file": name, "video_frames": writer.frames,
                "latent_frames": num_frames, "seconds": writer.frames / int(cfg.fps),
                "generation_seconds": round(elapsed, 3),
                **({"segments": segment_records(job.segments)} if job.segments else {}),
                **({"conditioning": condition.record(keep_prefix)} if condition else {}),
                "settings": settings,
            })
            written += 1
            frames_total += writer.frames
            busy += elapsed
            bar.set_postfix(fps=f"{writer.frames / elapsed:.2f}")
    return [written, skipped, frames_total, busy]


def nothing_to_do(cfg, jobs: list[Job], device) -> bool:
    """Every video of this run is in the output folder, made with these settings: decided from manifest.jsonl
    alone, before any model is loaded (provenance.finished_before)."""
    run = cfg.inference
    if run.overwrite:
        return False
    out = Path(run.output_folder)
    planned = planned_videos(cfg, jobs, settings_before_loading(cfg, compute_dtype(cfg.mixed_precision, device)))
    return finished_before(out, read_manifest(out / MANIFEST), planned,
                           certain_weights(cfg, run.checkpoint_path, bool(run.use_ema)))


def main(argv=None) -> int:
    cfg = load_run_config(argv)
    jobs, blank = plan_jobs(cfg)
    rank, world, device = init_distributed(str(cfg.inference.device))
    try:
        out = Path(cfg.inference.output_folder)
        if nothing_to_do(cfg, jobs, device):
            if rank == 0:
                count = len(jobs) * int(cfg.inference.num_samples)
                print(f"nothing to do: the {count} video(s) of this run are in {out}, made with these settings "
                      "(--overwrite regenerates them)")
            return 0
        pipeline = VideoPipeline.from_config(cfg, cfg.inference.checkpoint_path, bool(cfg.inference.use_ema), device)
        settings = video_settings(cfg, pipeline.weights, pipeline.dtype)
        # Every rank checks (same files, same verdict), so a refusal stops all of them before the barrier.
        check_output_folder(out, read_manifest(out / MANIFEST), planned_videos(cfg, jobs, settings), settings,
                            bool(cfg.inference.overwrite))
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            removed = remove_stale_partials(out)
            if removed:
                print(f"removed {len(removed)} partial video(s) left by killed runs in {out}")
        if rank == 0:
            print(f"weights: {pipeline.weights}")
            if blank:
                print(f"skipped {blank} blank line(s) in {cfg.inference.data_path}")
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / SAVED_CONFIG)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        counts = generate(cfg, pipeline, shard(jobs, rank, world), rank, settings)
        written, skipped, frames, busy = _sum_over_ranks(counts, device)
        if world > 1:
            dist.barrier()
        if rank == 0:
            compact_manifest(out / MANIFEST)
            wall = time.perf_counter() - start
            fps = frames / busy if busy else 0.0
            print(f"done: {int(written)} video(s) written, {int(skipped)} skipped as existing, {len(jobs)} prompt(s) "
                  f"on {world} process(es), {int(frames)} video frames at {fps:.2f} fps per process, {wall:.1f} s "
                  f"-> {out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
