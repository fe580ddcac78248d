"""Miniature world: the method's claims measured end to end on CPU, through the project's own entry points.

    python scripts/miniworld.py --output_dir runs/miniworld [--quick] [--stages data,teacher,...] [--jobs 2]

A latent world (reward_forcing/miniworld/world.py: a coloured blob moving on a textured torus, colour named by the
prompt, speed not) stands in for video, so every stage of Reward Forcing (arXiv 2512.04678) runs on 2 CPU cores
through the real code: train.py (trainer: diffusion for the teacher, ode, distill, reward_feedback), the ODE pair
generator, the streaming sampler with its KV cache and sink, and a tiny random umT5 text encoder. The stages are
reward_forcing/miniworld/stages.py's; each is skipped once it has finished, so an interrupted run resumes where it
stopped (the training runs also resume inside train.py from their last checkpoint).
Settings: configs/miniworld/experiment.yaml (with quick.yaml for --quick: a pipeline check at toy sizes, not a
result); the trainers read configs/miniworld/common.yaml merged with their stage file, written to
<output_dir>/configs/. Figures need matplotlib (pip install -e ".[miniworld]").
"""
import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld import stages
from reward_forcing.miniworld.experiment import Run, experiment_settings

STAGES = {"data": stages.stage_data, "teacher": stages.stage_teacher, "ode_pairs": stages.stage_ode_pairs,
          "ode_init": stages.stage_ode_init, "ar_teacher": stages.stage_ar_teacher, "cf_pairs": stages.stage_cf_pairs,
          "cf_ode_init": stages.stage_cf_ode_init, "arms": stages.stage_arms, "evaluate": stages.stage_evaluate,
          "image": stages.stage_image, "long": stages.stage_long,
          "report": None}  # report: reward_forcing/miniworld/report.py (imported lazily)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="run folder (created; rerunning resumes it)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes (configs/miniworld/quick.yaml): a pipeline check in minutes, not a result")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--reward", default="latent_motion", help="Re-DMD reward (reward_forcing/rewards/registry.py)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="processes at once (training runs, evaluation) and the threads of a lone training run")
    return parser.parse_args(argv)


def check_reward(name: str) -> None:
    from reward_forcing.rewards.registry import REWARDS

    if name not in REWARDS:
        raise ConfigError(f"--reward must be one of {', '.join(REWARDS)}; got '{name}'")
    if REWARDS[name].input != "latents":
        raise ConfigError(f"reward '{name}' scores decoded pixels; the miniature world has no decoder "
                          "(use a latent reward such as latent_motion)")


def selected_stages(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise ConfigError(f"unknown stage '{unknown[0] if unknown else text}'; stages are {', '.join(STAGES)}")
    return chosen


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file, not a folder")
    chosen = selected_stages(args.stages)
    check_reward(args.reward)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    # absolute: the stage configs name the assets by path
    run = Run(out.resolve(), experiment_settings(args.quick), args.reward, args.quick, args.jobs)
    settings_file = out / "settings.yaml"
    if settings_file.is_file() and OmegaConf.load(settings_file) != run.settings:
        raise ConfigError(f"{out} was started with other settings (see {settings_file}); use a new --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run.settings, settings_file)
    for stage in STAGES:
        if stage not in chosen:
            continue
        if stage != "report" and run.done(stage):
            print(f"stage {stage}: done before ({run.record(stage)['seconds']:.1f} s), skipped", flush=True)
            continue
        began = time.perf_counter()
        if stage == "report":
            from reward_forcing.miniworld.report import stage_report

            results = stage_report(run)
        else:
            results = STAGES[stage](run)
        seconds = time.perf_counter() - began
        run.save_record(stage, seconds, results)
        print(f"stage {stage}: {seconds:.1f} s", flush=True)
    return 0
