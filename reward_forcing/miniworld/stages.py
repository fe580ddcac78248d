"""The miniature world's stages (reward_forcing/miniworld/run.py runs them in order; scripts/miniworld.py is the
command). Training goes through the project's own command lines, train.py and scripts/generate_ode_pairs.py, as
separate processes; sampling through the streaming generator of reward_forcing/inference.

  data      assets (DiT folder, T5, tokenizer), world.json, the latent dataset, prompt files, the data row
  teacher   flow-matching training of the bidirectional teacher (configs/miniworld/teacher.yaml) and, when it is
            wider than the student (`teacher_dit`), of the student architecture's base model beside it
  ode_pairs the teacher's trajectories with CFG (configs/miniworld/ode.yaml): also the teacher row
  ode_init  ODE regression of the causal student, from the base weights (the teacher's, or the base model's)
  ar_teacher  Causal Forcing's autoregressive teacher: the student's architecture fine-tuned from the base weights
            with teacher forcing (causal: true)
  cf_pairs  the AR teacher's chunk-by-chunk ODE pairs (ode_teacher_causal): also the ar_teacher row
  cf_ode_init  the causal ODE init: ODE regression on cf_pairs from the AR teacher's weights
  arms      every arm of experiment.yaml, each seed, exported after each of its `updates`
  evaluate  samples of the ODE inits and of every arm at every point, scored by the world's detector
  image     image-to-video: the `image.arms` students continue the first frames of held-out world videos
  long      long rollouts of the `long.arms` students with each sink
  report    metrics.json, the claims, report.md and the figures
"""
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

import torch
from omegaconf import OmegaConf

from reward_forcing.errors import UserError
from reward_forcing.miniworld.evaluation import (balanced_prompts, long_curves, sample_student, score_continuations,
                                                 score_videos)
from reward_forcing.miniworld.experiment import CONFIGS, REPO

DATA_SHARD = 256
TEACHER_INIT = "teacher_init"  # the asset folder of the teacher's architecture when it is not the student's
TRAINED_ONCE_INITS = ("ode_init", "cf_ode_init")  # the student inits the evaluate stage scores once each
STRIP_COLOUR = 0  # every strip shows the world's first colour, so the rows compare
IMAGE_ROW = "image:"  # prefix of the image-to-video rows: image:<arm>@<updates>


class StageFailed(UserError):
    """A stage's own process (a training run) failed; its log says why."""


def run_logged(command: list[str], log_path, threads: int = 1, env: dict | None = None) -> None:
    """One of the project's command lines (train.py, generate_ode_pairs.py) as a process, its output appended to
    log_path; StageFailed (with the log's last line) when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), **(env or {}))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        code = subprocess.run([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        last = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise StageFailed(f"{command[0]} failed ({last[0]}); see {log_path}")


def train(run, config, logdir, overrides: list[str], threads: int = 1) -> None:
    run_logged([str(REPO / "train.py"), "--config_path", str(config), "--logdir", str(logdir), "--disable-wandb",
                *overrides], logdir / "train.log", threads)


def save_strip(run, row: str, latent: torch.Tensor, prompt: str) -> None:
    path = run.out / "samples" / f"{row}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latent": latent.float().cpu(), "prompt": prompt}, path)


def _strip_index(world, prompts: list[str]) -> int:
    return prompts.index(world.prompt(STRIP_COLOUR))


# ---- data, teacher, ODE pairs, ODE init ----------------------------------------------------------

def stage_data(run) -> dict:
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
    architectures = {common.model_name: OmegaConf.to_container(settings.dit)}
    if run.separate_base:
        architectures[TEACHER_INIT] = OmegaConf.to_container(OmegaConf.merge(settings.dit, settings.teacher_dit))
    for name, dit in architectures.items():  # random initial weights, the text encoder and tokenizer beside them
        folder = run.assets / name
        torch.manual_seed(world.spec.seed)
        write_wan_folder(folder, dit, {k: v.contiguous() for k, v in WanModel.from_config(dit).state_dict().items()})
        write_tokenizer(folder, common.text_encoder.vocab_size)
        write_t5(folder / "models_t5_umt5-xxl-enc-bf16.pth", common.text_encoder, world.spec.seed)

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

    # the data row: held-out world samples (indices past the training set); the reference of speed_w1_data
    held_out = [world.sample(count + i) for i in range(settings.data_reference_per_colour * len(world.spec.colours))]
    latents, prompts = torch.stack([s["latent"] for s in held_out]), [s["prompt"] for s in held_out]
    # the strip: the first held-out video of the strip's colour that moves at least half the top speed
    strip = next((i for i, s in enumerate(held_out) if s["colour"] == STRIP_COLOUR
                  and s["speed"] >= world.spec.max_speed / 2), _strip_index(world, prompts))
    save_strip(run, "data", latents[strip], prompts[strip])
    return {"data": {"seeds": [world.spec.seed], "trained_once": True, "videos": [score_videos(world, latents, prompts)]}}


def stage_teacher(run) -> dict:
    """The teacher; with `teacher_dit`, also the student architecture's base model (its own stage overrides,
    `base`), the two at once when there are two jobs."""
    jobs = [("teacher", [f"model_name={TEACHER_INIT}"] if run.separate_base else [])]
    if run.separate_base:
        jobs.append(("base", run.settings.stage_overrides.get("base", [])))
    threads = max(1, run.jobs // len(jobs))
    with ThreadPoolExecutor(max_workers=min(run.jobs, len(jobs))) as pool:
        futures = [pool.submit(train, run, run.stage_config("teacher"), run.out / name,
                               [f"data_path={run.data}", *run.overrides("teacher"), *extra], threads)
                   for name, extra in jobs]
    for future in futures:
        future.result()
    return {"teacher": str(run.teacher), "base": str(run.base)}


def stage_ode_pairs(run) -> dict:
    return ode_pairs(run, run.teacher, run.pairs, "teacher")


def ode_pairs(run, teacher, output, row: str, extra: tuple = ()) -> dict:
    """generate_ode_pairs.py (configs/miniworld/ode.yaml) from `teacher` into `output`, on `jobs` ranks; its final
    latents are the row `row` (a model trained once), scored."""
    from reward_forcing.training.ode_data import OdePairDataset

    command = [str(REPO / "scripts" / "generate_ode_pairs.py"), "--config_path", str(run.stage_config("ode")),
               "--data_path", str(run.pair_prompts), "--output_dir", str(output), f"ode_teacher_name={teacher}",
               *extra, *run.overrides("ode")]
    # `jobs` ranks without a process group: the generator deals its shards by RANK / WORLD_SIZE alone
    with ThreadPoolExecutor(max_workers=run.jobs) as pool:
        futures = [pool.submit(run_logged, command, run.out / f"{output.name}_rank{rank}.log", 1,
                               {"RANK": str(rank), "WORLD_SIZE": str(run.jobs)}) for rank in range(run.jobs)]
    for future in futures:
        future.result()
    pairs = OdePairDataset(output)
    rows = [pairs[i] for i in range(len(pairs))]
    latents = torch.stack([row["ode_latent"][-1] for row in rows]).float()
    prompts = [row["prompts"] for row in rows]
    world = run.world()
    strip = _strip_index(world, prompts)
    save_strip(run, row, latents[strip], prompts[strip])
    return {row: {"seeds": [int(run.settings.world.seed)], "trained_once": True,
                  "videos": [score_videos(world, latents, prompts)]}}


def stage_ode_init(run) -> dict:
    return ode_init(run, "ode_init", run.pairs, run.base)


def ode_init(run, name: str, pairs, start) -> dict:
    """ODE regression of the causal student (configs/miniworld/ode.yaml) on `pairs` from the weights `start`, into
    <out>/<name>/ode_init.pt."""
    train(run, run.stage_config("ode"), run.out / name,
          [f"data_path={pairs}", f"generator_ckpt={start}", *run.overrides("ode")], threads=run.jobs)
    return {"weights": str(run.weights(name))}


# ---- Causal Forcing (arXiv 2602.02214 §4): the autoregressive teacher, its ODE pairs, the causal ODE init ----

def stage_ar_teacher(run) -> dict:
    """The autoregressive teacher: the student's architecture fine-tuned from its base weights as a diffusion model
    with teacher forcing (configs/miniworld/teacher.yaml with causal: true; configs/causal_forcing_teacher.yaml),
    for `causal_forcing.ar_teacher_steps` steps."""
    steps = int(run.settings.causal_forcing.ar_teacher_steps)
    train(run, run.stage_config("teacher"), run.out / "ar_teacher",
          [f"data_path={run.data}", *run.overrides("teacher"), "causal=true", f"generator_ckpt={run.base}",
           f"max_steps={steps}", *run.settings.stage_overrides.get("ar_teacher", [])], threads=run.jobs)
    return {"ar_teacher": str(run.ar_teacher)}


def stage_cf_pairs(run) -> dict:
    """Each chunk's ODE trajectory from the autoregressive teacher, conditioned on the clean chunks it generated
    before (ode_teacher_causal; configs/causal_forcing_ode.yaml): also the row `ar_teacher`."""
    return ode_pairs(run, run.ar_teacher, run.cf_pairs, "ar_teacher", ("ode_teacher_causal=true",))


def stage_cf_ode_init(run) -> dict:
    """The causal ODE init: regression on the autoregressive teacher's pairs from its own weights (upstream's
    generator_ckpt of stage 2 is the stage-1 teacher)."""
    return ode_init(run, "cf_ode_init", run.cf_pairs, run.ar_teacher)


# ---- arms ----------------------------------------------------------------------------------------

def _train_arm(run, arm, seed: int, failed: threading.Event) -> None:
    """One (arm, seed): train.py up to each point's max_steps in turn (a resumed run continues exactly where the
    last stopped), exporting generator@<updates>.pt after each."""
    config, overrides = run.arm_command(arm, seed)
    logdir = run.arm_dir(arm, seed)
    for updates in arm.updates:
        target = run.arm_weights(arm, seed, updates)
        if target.is_file():
            continue
        if failed.is_set():
            return
        train(run, config, logdir, [*overrides, f"max_steps={run.max_steps(arm, updates)}"])
        shutil.copyfile(logdir / "generator.pt", target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)


def stage_arms(run) -> dict:
    """Every (arm, seed), `jobs` at a time as separate one-thread processes (small models keep two cores busier as
    two runs than as two threads of one); each logs to <its folder>/train.log."""
    failed = threading.Event()

    def job(arm, seed):
        try:
            _train_arm(run, arm, seed, failed)
        except StageFailed:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=run.jobs) as pool:
        futures = [pool.submit(job, arm, seed) for arm in run.arms.values() for seed in arm.seeds]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return {arm.row(n): {str(s): str(run.arm_weights(arm, s, n)) for s in arm.seeds}
            for arm in run.arms.values() for n in arm.updates}


# ---- evaluation (in worker processes) ------------------------------------------------------------

def _evaluate_one(out: str, config: str, overrides: list, checkpoint: str, per_colour: int, seed: int) -> tuple:
    """Worker: one checkpoint's videos, scored, and the strip's video."""
    from reward_forcing.miniworld.world import World

    torch.set_num_threads(1)
    world = World.from_file(f"{out}/world.json")
    prompts = balanced_prompts(world, per_colour)
    latents = sample_student(config, overrides, checkpoint, prompts, world.spec.frames, seed=seed)
    strip = _strip_index(world, prompts)
    return score_videos(world, latents, prompts), latents[strip], prompts[strip]


def _long_one(out: str, config: str, overrides: list, checkpoint: str, per_colour: int, frames: int, sink: str,
              chunk: int) -> dict:
    from reward_forcing.miniworld.world import World

    torch.set_num_threads(1)
    world = World.from_file(f"{out}/world.json")
    prompts = balanced_prompts(world, per_colour)
    latents = sample_student(config, overrides, checkpoint, prompts, frames, seed=2000, sink=sink)
    return long_curves(world, latents, prompts, chunk)


def _pool(run):
    return ProcessPoolExecutor(max_workers=run.jobs, mp_context=get_context("spawn"))


def _student_config(run) -> tuple[str, list[str]]:
    return str(run.stage_config("distill")), [f"checkpoint_dir={run.assets}"]


def stage_evaluate(run) -> dict:
    """Every student row: the ODE inits (once each) and each arm at each point, one video set per seed."""
    config, overrides = _student_config(run)
    per_colour = int(run.settings.eval_per_colour)
    jobs = {(name, run.settings.seeds[0]): run.weights(name) for name in TRAINED_ONCE_INITS}
    for arm in run.arms.values():
        jobs.update({(arm.row(n), s): run.arm_weights(arm, s, n) for n in arm.updates for s in arm.seeds})
    with _pool(run) as pool:
        futures = {key: pool.submit(_evaluate_one, str(run.out), config, overrides, str(path), per_colour,
                                    1000 + key[1]) for key, path in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    rows = {}
    for (row, seed), (videos, strip, prompt) in results.items():
        once = {"trained_once": True} if row in TRAINED_ONCE_INITS else {}
        entry = rows.setdefault(row, {"seeds": [], "videos": []} | once)
        if not entry["seeds"]:
            save_strip(run, row, strip, prompt)
        entry["seeds"].append(seed)
        entry["videos"].append(videos)
    return rows


def given_videos(world, start: int, per_colour: int) -> list[int]:
    """Indices of held-out world videos from `start` on, the first per_colour of each colour, in index order."""
    chosen, counts, index = [], [0] * len(world.spec.colours), start
    while len(chosen) < per_colour * len(counts):
        colour = world.sample(index)["colour"]
        if counts[colour] < per_colour:
            counts[colour] += 1
            chosen.append(index)
        index += 1
    return chosen


def _image_one(out: str, config: str, overrides: list, checkpoint: str, indices: list, frame: int,
               seed: int) -> tuple:
    """Worker: one checkpoint's continuations of the given frames, scored, and the first video of the strip's
    colour."""
    from reward_forcing.miniworld.world import World

    torch.set_num_threads(1)
    world = World.from_file(f"{out}/world.json")
    videos = [world.sample(i) for i in indices]
    given = torch.stack([v["latent"][:, frame:frame + 1] for v in videos])
    prompts = [v["prompt"] for v in videos]
    latents = sample_student(config, overrides, checkpoint, prompts, world.spec.frames, seed=seed, first_frame=given)
    strip = _strip_index(world, prompts)
    return score_continuations(world, given, latents, prompts), latents[strip]


def stage_image(run) -> dict:
    """Image-to-video: each `image.arms` student at the last update point they all share, every seed, continues the
    first frames of held-out world videos (indices past the training set, the data row's and the long rollouts'
    truth) under their colour's prompts. Rows image:<arm>@<updates>; the strip holds the world's own video and each
    arm's continuation of its first video of the strip's colour."""
    settings, world = run.settings.image, run.world()
    unknown = [name for name in settings.arms if name not in run.arms]
    if unknown:
        raise UserError(f"image.arms names '{unknown[0]}', which is not an arm ({', '.join(run.arms)})")
    arms = [run.arms[name] for name in settings.arms]
    shared = set.intersection(*(set(arm.updates) for arm in arms))
    if not shared:
        raise UserError(f"image.arms {list(settings.arms)} share no update point; give them a common one")
    updates, frame = max(shared), int(settings.frame)
    if not 0 <= frame < world.spec.frames:
        raise UserError(f"image.frame must be a frame of the world's videos (0 to {world.spec.frames - 1}), got {frame}")
    start = int(run.settings.data_samples) + int(run.settings.data_reference_per_colour) * len(world.spec.colours)
    indices = given_videos(world, start, int(settings.per_colour))
    config, overrides = _student_config(run)
    jobs = {(IMAGE_ROW + arm.row(updates), seed): run.arm_weights(arm, seed, updates) for arm in arms
            for seed in arm.seeds}
    with _pool(run) as pool:
        futures = {key: pool.submit(_image_one, str(run.out), config, overrides, str(path), indices, frame,
                                    3000 + key[1]) for key, path in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    strips = run.out / "samples" / "image"
    strips.mkdir(parents=True, exist_ok=True)
    truth = world.sample(indices[_strip_index(world, [world.sample(i)["prompt"] for i in indices])])
    torch.save({"latent": truth["latent"][:, frame:], "prompt": truth["prompt"], "frame": frame},
               strips / "world.pt")
    rows = {}
    for (row, seed), (videos, strip) in results.items():
        entry = rows.setdefault(row, {"seeds": [], "videos": []})
        if not entry["seeds"]:
            torch.save({"latent": strip.float().cpu(), "prompt": truth["prompt"]}, strips / f"{row}.pt")
        entry["seeds"].append(seed)
        entry["videos"].append(videos)
    return rows


def stage_long(run) -> dict:
    """Long rollouts of each `long.arms` student (at its last point, every seed) with each sink, and the world's own
    videos of that length (how the curves look when nothing is copied and nothing drifts)."""
    settings, world = run.settings.long, run.world()
    chunk = OmegaConf.load(CONFIGS / "common.yaml").num_frame_per_block
    prompts = balanced_prompts(world, settings.per_colour)
    start = int(run.settings.data_samples) + 10 ** 6
    truth = [world.sample(start + i, frames=settings.frames) for i in range(len(prompts))]
    results = {"data": {"world": {"seeds": [world.spec.seed], "curves": {
        key: [value] for key, value in long_curves(world, torch.stack([s["latent"] for s in truth]),
                                                   [s["prompt"] for s in truth], chunk).items()}}}}
    config, overrides = _student_config(run)
    jobs = {}
    for name in settings.arms:
        if name not in run.arms:
            raise UserError(f"long.arms names '{name}', which is not an arm ({', '.join(run.arms)})")
        arm = run.arms[name]
        for sink in settings.sinks:
            for seed in arm.seeds:
                jobs[(name, sink, seed)] = str(run.arm_weights(arm, seed, arm.updates[-1]))
    with _pool(run) as pool:
        futures = {key: pool.submit(_long_one, str(run.out), config, overrides, path, settings.per_colour,
                                    settings.frames, key[1], chunk) for key, path in jobs.items()}
        for (name, sink, seed), future in futures.items():
            entry = results.setdefault(name, {}).setdefault(sink, {"seeds": [], "curves": {}})
            entry["seeds"].append(seed)
            for key, curve in future.result().items():
                entry["curves"].setdefault(key, []).append(curve)
    return results
