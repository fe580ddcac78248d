"""Miniature world: the method's claims measured end to end on CPU, through the project's own entry points.

    python scripts/miniworld.py --output_dir runs/miniworld [--quick] [--stages teacher,ode_pairs,...]

A latent world (reward_forcing/miniworld: a coloured blob moving on a textured torus, colour named by the
prompt, speed not) stands in for video, so every stage of Reward Forcing (arXiv 2512.04678) runs on 2 CPU
cores through the real code: train.py (trainer: diffusion for the teacher, ode, distill), the ODE pair
generator, the streaming sampler with its KV cache and sink, and the tiny random umT5 text encoder.

Stages (each is skipped once it has finished, so an interrupted run resumes where it stopped; the
training stages also resume inside train.py from their last checkpoint):
  data      assets (DiT folder, T5, tokenizer), world.json, the latent dataset, prompt files
  teacher   flow-matching training of the bidirectional teacher (configs/miniworld/teacher.yaml)
  ode_pairs teacher trajectories with CFG (scripts/generate_ode_pairs.py): also the teacher's samples
  ode_init  ODE regression of the causal student, from the teacher's weights (configs/miniworld/ode.yaml)
  distill   DMD (beta 0) and Re-DMD at each beta with the `--reward` scorer, for each seed (distill.yaml)
  evaluate  student samples of every arm, scored by the world's detector
  long      long rollouts of the DMD and Re-DMD students with sink none / static / ema
  report    metrics.json, report.md and PNG plots in --output_dir
Settings: configs/miniworld/experiment.yaml (and quick.yaml with --quick); the trainers read
configs/miniworld/common.yaml merged with their stage file, written to <output_dir>/configs/.
Plots need matplotlib (pip install matplotlib).
"""
import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from reward_forcing.errors import ConfigError, UserError, run_cli  # noqa: E402

CONFIGS = ROOT / "configs" / "miniworld"
STAGES = ("data", "teacher", "ode_pairs", "ode_init", "distill", "evaluate", "long", "report")
METRICS = ("color_accuracy", "validity", "speed", "speed_w1_teacher", "reward", "quality", "path_speed",
           "straightness")
CURVES = ("validity", "color_drift", "first_chunk_similarity")
SINKS = {"none": ["sink_size=0", "sink_mode=none"], "static": ["sink_mode=static"], "ema": ["sink_mode=ema"]}
DATA_SHARD = 256
EVAL_BATCH = 64


def sink_overrides(sink: str) -> list[str]:
    """A long-rollout sink setting: none / static / ema (the config's compression_alpha) or ema_a<alpha>."""
    if sink.startswith("ema_a"):
        return ["sink_mode=ema", f"compression_alpha={float(sink[len('ema_a'):])}"]
    if sink not in SINKS:
        raise ConfigError(f"unknown sink '{sink}' (none, static, ema or ema_a<alpha>)")
    return SINKS[sink]


class StageFailed(UserError):
    """A stage's own process (a training run) failed; its log says why."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="run folder (created; rerunning resumes it)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (configs/miniworld/quick.yaml): minutes")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--reward", default="latent_motion", help="Re-DMD reward (reward_forcing/rewards/registry.py)")
    return parser.parse_args(argv)


# ---- settings ------------------------------------------------------------------------------------

def experiment_settings(quick: bool):
    settings = OmegaConf.load(CONFIGS / "experiment.yaml")
    if quick:
        settings = OmegaConf.merge(settings, OmegaConf.load(CONFIGS / "quick.yaml"))
    return settings


def check_reward(name: str) -> None:
    from reward_forcing.rewards.registry import REWARDS

    if name not in REWARDS:
        raise ConfigError(f"--reward must be one of {', '.join(REWARDS)}; got '{name}'")
    if REWARDS[name].input != "latents":
        raise ConfigError(f"reward '{name}' scores decoded pixels; the miniature world has no decoder "
                          "(use a latent reward such as latent_motion)")


class Run:
    """The output folder: stage records, paths, and the stage configs written for the trainers."""

    def __init__(self, out: Path, settings, reward: str):
        self.out, self.settings, self.reward = out, settings, reward
        self.assets, self.world_path = out / "assets", out / "world.json"
        self.data, self.pairs = out / "data", out / "ode_pairs"
        self.prompts, self.pair_prompts = out / "prompts" / "colours.txt", out / "prompts" / "pairs.txt"

    def record_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.record_path(stage).is_file()

    def record(self, stage: str) -> dict:
        if not self.done(stage):
            raise ConfigError(f"stage '{stage}' has not run in {self.out}; run it first (or all stages)")
        return json.loads(self.record_path(stage).read_text())

    def save_record(self, stage: str, seconds: float, results: dict) -> None:
        path = self.record_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": seconds, "results": results}))
        tmp.replace(path)

    def stage_config(self, name: str) -> Path:
        """common.yaml + <name>.yaml, written to <out>/configs/<name>.yaml (what train.py reads)."""
        merged = OmegaConf.merge(OmegaConf.load(CONFIGS / "common.yaml"), OmegaConf.load(CONFIGS / f"{name}.yaml"))
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(merged, path)
        return path

    def overrides(self, stage: str) -> list[str]:
        return [f"checkpoint_dir={self.assets}", *self.settings.stage_overrides[stage]]

    def world(self):
        from reward_forcing.miniworld.world import World

        return World.from_file(self.world_path)

    @property
    def teacher(self) -> Path:
        logdir = self.out / "teacher"
        return logdir / "model_ema" if (logdir / "model_ema").is_dir() else logdir / "model"

    def arms(self) -> dict:
        """Student arms trained from the ODE init -> (stage config, train.py overrides): DMD, Re-DMD at each beta,
        Re-DMD at `cache_grad_beta` with each further `rollout_cache_grad` mode (the others use the default,
        straight_through), and reward-only fine-tuning (arXiv 2601.16933) on each `reward_feedback_frames` choice."""
        arms = {"dmd": ("distill", ["distill_loss=dmd"])}
        arms.update({f"re_dmd_b{beta:g}": ("distill", ["distill_loss=re_dmd", f"reward.beta={beta}"])
                     for beta in self.settings.betas})
        beta = self.settings.cache_grad_beta
        arms.update({f"re_dmd_b{beta:g}_{mode}": ("distill", ["distill_loss=re_dmd", f"reward.beta={beta}",
                                                               f"rollout_cache_grad={mode}"])
                     for mode in self.settings.cache_grad_modes})
        arms.update({f"rf_{frame}": ("reward_feedback", [f"reward.frame={frame}"])
                     for frame in self.settings.reward_feedback_frames})
        return arms

    def arm_seeds(self, arm: str) -> list[int]:
        """Every seed for DMD and the beta arms; the first one only for the rollout_cache_grad arms."""
        seeds = list(self.settings.distill_seeds)
        return seeds[:1] if arm.endswith(tuple(self.settings.cache_grad_modes)) else seeds

    def distill_dir(self, arm: str, seed: int) -> Path:
        return self.out / "distill" / f"{arm}_s{seed}"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(config: Path, logdir: Path, overrides: list[str]) -> None:
    """train.py's own main, in this process (the same code path as the command line, without its start-up)."""
    import train as train_py

    train_py.main(["--config_path", str(config), "--logdir", str(logdir), "--disable-wandb", *overrides])


# ---- world videos -> statistics ------------------------------------------------------------------

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


def balanced_prompts(world, per_colour: int) -> list[str]:
    return [world.prompt(i % len(world.spec.colours)) for i in range(per_colour * len(world.spec.colours))]


def sample_student(run: Run, checkpoint: Path, prompts: list[str], frames: int, seed: int, sink=None):
    """Latents [N, C, frames, h, w] from the streaming sampler (inference code) with the distill stage's cache."""
    from reward_forcing.config import load_config
    from reward_forcing.inference.generator import StreamingGenerator, latent_size
    from reward_forcing.inference.pipeline import load_student, load_text_encoder

    extra = sink_overrides(sink) if sink is not None else []
    cfg = load_config(run.stage_config("distill"), [f"checkpoint_dir={run.assets}", *extra])
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


# ---- stages --------------------------------------------------------------------------------------

def stage_data(run: Run) -> dict:
    from reward_forcing.miniworld.world import World, WorldSpec
    from reward_forcing.models.wan import WanModel
    from reward_forcing.testing.assets import write_t5, write_tokenizer, write_wan_folder
    from reward_forcing.training.ode_data import prepare_output_dir, shard_done, write_shard

    settings = run.settings
    spec = OmegaConf.to_container(settings.world)
    world = World(WorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}))
    run.out.mkdir(parents=True, exist_ok=True)
    world.save(run.world_path)

    common = OmegaConf.load(CONFIGS / "common.yaml")
    base = run.assets / common.model_name
    dit = OmegaConf.to_container(settings.dit)
    torch.manual_seed(world.spec.seed)
    write_wan_folder(base, dit, {k: v.contiguous() for k, v in WanModel.from_config(dit).state_dict().items()})
    write_tokenizer(base, common.text_encoder.vocab_size)
    write_t5(base / "models_t5_umt5-xxl-enc-bf16.pth", common.text_encoder, world.spec.seed)

    count = int(settings.data_samples)
    prepare_output_dir(run.data, {"num_prompts": count, "shard_size": DATA_SHARD, "world": spec,
                                  "note": "one state per row: the world's clean latents"})
    for k, first in enumerate(range(0, count, DATA_SHARD)):
        if shard_done(run.data, k):
            continue
        samples = [world.sample(i) for i in range(first, min(first + DATA_SHARD, count))]
        latents = torch.stack([s["latent"] for s in samples])[:, None].to(torch.float16)
        write_shard(run.data, k, [s["prompt"] for s in samples], list(range(first, first + len(samples))), latents)

    run.prompts.parent.mkdir(parents=True, exist_ok=True)
    run.prompts.write_text("".join(world.prompt(i) + "\n" for i in range(len(world.spec.colours))))
    run.pair_prompts.write_text("".join(p + "\n" for p in balanced_prompts(world, settings.pairs_per_colour)))

    # the data arm: held-out world samples (indices past the training set), as many as a student arm gets
    held_out = [world.sample(count + i) for i in range(settings.eval_per_colour * len(world.spec.colours))]
    latents = torch.stack([s["latent"] for s in held_out])
    save_strip(run, "data", latents[:1], [held_out[0]["prompt"]])
    return {"data": [score_videos(world, latents, [s["prompt"] for s in held_out])]}


def stage_teacher(run: Run) -> dict:
    train(run.stage_config("teacher"), run.out / "teacher", [f"data_path={run.data}", *run.overrides("teacher")])
    return {"weights": str(run.teacher)}


def stage_ode_pairs(run: Run) -> dict:
    from reward_forcing.training.ode_data import OdePairDataset

    generate = _load_script("generate_ode_pairs")
    generate.main(["--config_path", str(run.stage_config("ode")), "--data_path", str(run.pair_prompts),
                   "--output_dir", str(run.pairs), f"ode_teacher_name={run.teacher}", *run.overrides("ode")])
    pairs = OdePairDataset(run.pairs)
    rows = [pairs[i] for i in range(len(pairs))]
    latents = torch.stack([row["ode_latent"][-1] for row in rows])
    prompts = [row["prompts"] for row in rows]
    save_strip(run, "teacher", latents[:1], prompts[:1])
    return {"teacher": [score_videos(run.world(), latents, prompts)]}


def stage_ode_init(run: Run) -> dict:
    train(run.stage_config("ode"), run.out / "ode_init",
          [f"data_path={run.pairs}", f"generator_ckpt={run.teacher}", *run.overrides("ode")])
    return {"weights": str(run.out / "ode_init" / "ode_init.pt")}


def stage_distill(run: Run) -> dict:
    """Every (arm, seed) run of train.py, `distill_jobs` at a time as separate processes of one thread each (small
    models keep two cores busier as two runs than as two threads of one); each logs to <its logdir>/train.log."""
    import os
    import subprocess

    todo, runs = [], {}
    for arm, (stage, arm_overrides) in run.arms().items():
        config = run.stage_config(stage)
        # DMD's reward is --reward (it weights Re-DMD); reward feedback's is its own config's differentiable one
        specific = ([f"reward.name={run.reward}", f"real_name={run.teacher}", f"fake_name={run.teacher}"]
                    if stage == "distill" else [])
        for seed in run.arm_seeds(arm):
            logdir = run.distill_dir(arm, seed)
            runs[f"{arm}_s{seed}"] = str(logdir / "generator.pt")
            if not (logdir / "finished").is_file():
                todo.append((logdir, config, [*arm_overrides, *specific, f"seed={seed}",
                                              f"reward.world_path={run.world_path}", f"prompt_path={run.prompts}",
                                              f"generator_ckpt={run.out / 'ode_init' / 'ode_init.pt'}",
                                              *run.overrides(stage)]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    running = []

    def wait_one():
        logdir, process, log = running.pop(0)
        code = process.wait()
        log.close()
        if code != 0:
            for _, other, _ in running:  # the finished runs are kept; a rerun redoes (resumes) the others
                other.terminate()
                other.wait()
            last = (logdir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise StageFailed(f"distill run {logdir.name} failed ({last[0]}); see {logdir / 'train.log'}")
        (logdir / "finished").write_text("")

    for logdir, config, overrides in todo:
        if len(running) >= run.settings.distill_jobs:
            wait_one()
        logdir.mkdir(parents=True, exist_ok=True)
        log = (logdir / "train.log").open("w")
        command = [sys.executable, str(ROOT / "train.py"), "--config_path", str(config), "--logdir", str(logdir),
                   "--disable-wandb", *overrides]
        running.append((logdir, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    while running:
        wait_one()
    return runs


def stage_evaluate(run: Run) -> dict:
    world, settings = run.world(), run.settings
    prompts = balanced_prompts(world, settings.eval_per_colour)
    students = {"ode_init": [(0, run.out / "ode_init" / "ode_init.pt")]}
    for arm in run.arms():
        students[arm] = [(seed, run.distill_dir(arm, seed) / "generator.pt") for seed in run.arm_seeds(arm)]
    results = {}
    for arm, checkpoints in students.items():
        results[arm] = []
        for seed, checkpoint in checkpoints:
            latents = sample_student(run, checkpoint, prompts, world.spec.frames, seed=1000 + seed)
            results[arm].append(score_videos(world, latents, prompts))
            if len(results[arm]) == 1:
                save_strip(run, arm, latents[:1], prompts[:1])
    return results


def long_curves(world, latents: torch.Tensor, prompts: list[str], chunk: int) -> dict:
    """Per-frame curves over a batch of long rollouts: fraction of valid frames, fraction whose colour is not the
    prompt's, and cosine similarity of each frame's foreground (latent minus background) to the first chunk's."""
    from reward_forcing.miniworld.detector import detect_frames

    frames = detect_frames(world, latents)
    target = torch.tensor([world.colour_of(p) for p in prompts])[:, None]
    rest = (latents - world.background[None, :, None]).transpose(1, 2).flatten(2)  # [B, F, C*H*W]
    first = rest[:, :chunk].mean(dim=1, keepdim=True)
    similarity = torch.nn.functional.cosine_similarity(rest, first.expand_as(rest), dim=2)
    return {"validity": frames["valid"].float().mean(0).tolist(),
            "color_drift": (frames["colour"] != target).float().mean(0).tolist(),
            "first_chunk_similarity": similarity.mean(0).tolist()}


def stage_long(run: Run) -> dict:
    world, settings = run.world(), run.settings
    prompts = balanced_prompts(world, settings.long_per_colour)
    seed = settings.distill_seeds[0]
    chunk = OmegaConf.load(CONFIGS / "common.yaml").num_frame_per_block
    # the world's own videos of that length: how the curves look when nothing is copied and nothing drifts
    truth = [world.sample(settings.data_samples + i, frames=settings.long_frames) for i in range(len(prompts))]
    results = {"data": {"world": long_curves(world, torch.stack([s["latent"] for s in truth]),
                                             [s["prompt"] for s in truth], chunk)}}
    sinks = [*settings.sinks, *[f"ema_a{alpha:g}" for alpha in settings.ema_alphas]]
    for arm in settings.long_arms:
        if arm not in run.arms():
            raise ConfigError(f"long_arms names '{arm}', which is not an arm ({', '.join(run.arms())})")
        results[arm] = {}
        for sink in sinks:
            latents = sample_student(run, run.distill_dir(arm, seed) / "generator.pt", prompts,
                                     settings.long_frames, seed=2000, sink=sink)
            results[arm][sink] = long_curves(world, latents, prompts, chunk)
    return results


# ---- report --------------------------------------------------------------------------------------

def wasserstein1(a, b) -> float:
    """W1 between two empirical 1-D distributions: the integral of |F_a - F_b|."""
    a, b = sorted(a), sorted(b)
    grid = sorted(a + b)
    total, i, j = 0.0, 0, 0
    for left, right in zip(grid[:-1], grid[1:]):
        while i < len(a) and a[i] <= left:
            i += 1
        while j < len(b) and b[j] <= left:
            j += 1
        total += abs(i / len(a) - j / len(b)) * (right - left)
    return total


def arm_metrics(per_seed: list[dict], teacher_speeds: list[float]) -> dict:
    """{metric: {"mean": over seeds, "seeds": [per-seed mean over videos]}}."""
    out = {}
    for metric in METRICS:
        values = []
        for videos in per_seed:
            if metric == "speed_w1_teacher":
                values.append(wasserstein1(videos["speed"], teacher_speeds))
            else:
                key = "color_correct" if metric == "color_accuracy" else metric
                values.append(sum(videos[key]) / len(videos[key]))
        out[metric] = {"mean": sum(values) / len(values), "seeds": values}
    return out


def save_strip(run: Run, arm: str, latents: torch.Tensor, prompts: list[str]) -> None:
    path = run.out / "samples" / f"{arm}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents.float().cpu(), "prompts": prompts}, path)


def detector_image(world, latent: torch.Tensor):
    """[C, F, H, W] -> an RGB strip [H, F*(W+1), 3]: each frame's detected colour, brightness its response."""
    import matplotlib.colors as mcolors

    from reward_forcing.miniworld.detector import colour_maps

    maps = colour_maps(world, latent[None])[0].clamp(min=0) / world.spec.blob_amplitude  # [K, F, H, W]
    rgb = torch.tensor([mcolors.to_rgb(name) for name in world.spec.colours])       # [K, 3]
    image = torch.einsum("kfhw,kc->fhwc", maps, rgb).clamp(0, 1)
    gap = torch.ones(image.shape[0], image.shape[1], 1, 3)
    return torch.cat([torch.cat([frame, g], dim=1) for frame, g in zip(image, gap)], dim=1).numpy()


def write_plots(run: Run, metrics: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, files = metrics["arms"], []
    betas = [(0.0, "dmd")] + [(float(beta), f"re_dmd_b{beta:g}") for beta in run.settings.betas]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for beta, arm in betas:
        seeds = arms[arm]["speed"]["seeds"]
        ax.scatter([beta] * len(seeds), seeds, color="grey", s=12)
    ax.plot([b for b, _ in betas], [arms[a]["speed"]["mean"] for _, a in betas], marker="o", label="students")
    for arm, style in (("teacher", "--"), ("data", ":")):
        ax.axhline(arms[arm]["speed"]["mean"], linestyle=style, color="k", label=arm)
    ax.set(xlabel="beta (0 = DMD)", ylabel="mean speed (px / latent frame)", title="Re-DMD dose-response")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.out / "dose_response.png", dpi=120)
    plt.close(fig)
    files.append("dose_response.png")

    if metrics["long"]:
        fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.5))
        for ax, curve in zip(axes, CURVES):
            for arm, sinks in metrics["long"].items():
                for sink, curves in sinks.items():
                    ax.plot(curves[curve], label=f"{arm} / {sink}")
            ax.set(xlabel="latent frame", title=curve)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run.out / "long_rollouts.png", dpi=120)
        plt.close(fig)
        files.append("long_rollouts.png")

    world = run.world()
    strips = [(arm, torch.load(run.out / "samples" / f"{arm}.pt", weights_only=True)) for arm in arms
              if (run.out / "samples" / f"{arm}.pt").is_file()]
    fig, axes = plt.subplots(len(strips), 1, figsize=(10, 1.1 * len(strips)), squeeze=False)
    for ax, (arm, sample) in zip(axes[:, 0], strips):
        ax.imshow(detector_image(world, sample["latents"][0, :, :run.settings.strip_frames]), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{arm}: {sample['prompts'][0]}", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(run.out / "strips.png", dpi=120)
    plt.close(fig)
    files.append("strips.png")
    return files


def _cell(entry: dict) -> str:
    seeds = entry["seeds"]
    if len(seeds) == 1:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {(max(seeds) - min(seeds)) / 2:.3f}"


def write_report(run: Run, metrics: dict, plots: list[str]) -> None:
    lines = ["# Miniature world: Reward Forcing measured end to end", "",
             f"World: {run.world_path.name}; reward `{run.reward}`; seeds {list(run.settings.distill_seeds)} "
             "(± = half the range over seeds).", "",
             "| arm | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for arm, entry in metrics["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(_cell(entry[m]) for m in METRICS) + " |")
    if metrics["long"]:
        lines += ["", f"Long rollouts ({run.settings.long_frames} latent frames): mean over the last third of the "
                  "frames.", "", "| arm | sink | " + " | ".join(CURVES) + " |", "|---" * (len(CURVES) + 2) + "|"]
        for arm, sinks in metrics["long"].items():
            for sink, curves in sinks.items():
                tail = {c: curves[c][-max(1, len(curves[c]) // 3):] for c in CURVES}
                means = [f"{sum(v) / len(v):.3f}" for v in tail.values()]
                lines.append(f"| {arm} | {sink} | " + " | ".join(means) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {entry['seconds']:.1f} |" for stage, entry in metrics["stages"].items()]
    lines += ["", *[f"![{name}]({name})" for name in plots], ""]
    (run.out / "report.md").write_text("\n".join(lines))


def stage_report(run: Run) -> dict:
    arms = {**run.record("data")["results"], **run.record("ode_pairs")["results"], **run.record("evaluate")["results"]}
    teacher_speeds = arms["teacher"][0]["speed"]
    metrics = {"arms": {arm: arm_metrics(per_seed, teacher_speeds) for arm, per_seed in arms.items()},
               "long": run.record("long")["results"] if run.done("long") else {},
               "stages": {stage: {"seconds": run.record(stage)["seconds"]} for stage in STAGES[:-1] if run.done(stage)}}
    plots = write_plots(run, metrics)
    write_report(run, metrics, plots)
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"plots": plots}


STAGE_FUNCTIONS = {"data": stage_data, "teacher": stage_teacher, "ode_pairs": stage_ode_pairs,
                   "ode_init": stage_ode_init, "distill": stage_distill, "evaluate": stage_evaluate,
                   "long": stage_long, "report": stage_report}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file, not a folder")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage '{unknown[0] if unknown else args.stages}'; stages are {', '.join(STAGES)}")
    check_reward(args.reward)
    run = Run(out.resolve(), experiment_settings(args.quick), args.reward)  # absolute: configs name assets by path
    settings_file = out / "settings.yaml"
    if settings_file.is_file() and OmegaConf.load(settings_file) != run.settings:
        raise ConfigError(f"{out} was started with other settings (see {settings_file}); use a new --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run.settings, settings_file)
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage != "report" and run.done(stage):
            print(f"stage {stage}: done before ({run.record(stage)['seconds']:.1f} s), skipped", flush=True)
            continue
        began = time.perf_counter()
        results = STAGE_FUNCTIONS[stage](run)
        seconds = time.perf_counter() - began
        run.save_record(stage, seconds, results)
        print(f"stage {stage}: {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
