"""What limits the miniature world's teacher: train variants of it and measure each (scripts/miniworld_teacher_sweep.py).

    python scripts/miniworld_teacher_sweep.py --output_dir runs/teacher_sweep --variant d128 \\
        --settings dit.dim=128 dit.ffn_dim=512 --evals 1000,2000,3000 [--train lr_generator=2e-3 ...]

A variant is the experiment's settings (configs/miniworld/experiment.yaml) with `--settings` overrides (the world,
the DiT, data_samples) and the teacher stage's train.py overrides with `--train` ones. Its folder holds the data
stage's output and the teacher, trained by train.py in increments (a resumed run continues exactly), and after each
`--evals` step count the teacher's EMA weights are sampled (the ODE-pair sampler's Euler steps and shift, no CFG,
batched) and scored against the data. `--sdedit` also starts the sampler from held-out data noised to each sigma:
the speed it keeps shows at which noise levels the teacher loses motion. Each measurement is one line of
<output_dir>/sweep.jsonl, and sweep.md tabulates them all.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld import stages
from reward_forcing.miniworld.evaluation import balanced_prompts
from reward_forcing.miniworld.experiment import Run, experiment_settings
from reward_forcing.miniworld.stats import wasserstein1

SAMPLE_SEED = 7
REFERENCE_VIDEOS = 2000  # held-out data videos: the speed distribution W1 is measured against


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="sweep folder; one sub-folder per variant")
    parser.add_argument("--variant", required=True, help="the variant's name (its folder)")
    parser.add_argument("--settings", nargs="*", default=[], help="experiment.yaml overrides key=value")
    parser.add_argument("--train", nargs="*", default=[], help="the teacher's train.py overrides key=value")
    parser.add_argument("--evals", default="1000,2000,3000", help="teacher steps after which it is measured")
    parser.add_argument("--per_colour", type=int, default=48, help="teacher samples per colour")
    parser.add_argument("--sampler_steps", type=int, default=None, help="Euler steps (default: ode.yaml's)")
    parser.add_argument("--sampler_shift", type=float, default=None, help="sigma shift (default: ode.yaml's)")
    parser.add_argument("--sdedit", default="", help="comma-separated sigmas to start from noised data (last eval)")
    return parser.parse_args(argv)


def variant_run(out: Path, overrides: list[str]) -> Run:
    settings = OmegaConf.merge(experiment_settings(quick=False), OmegaConf.from_dotlist(overrides))
    run = Run(out.resolve(), settings, "latent_motion", quick=False)
    saved = out / "variant.json"
    if saved.is_file() and json.loads(saved.read_text()) != list(overrides):
        raise ConfigError(f"{out} holds a variant with other --settings; name this one differently")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(list(overrides)))
    OmegaConf.save(settings, out / "settings.yaml")
    if not run.done("data"):
        run.save_record("data", 0.0, stages.stage_data(run))
    return run


def load_teacher(run, folder):
    from reward_forcing.checkpoints import load_into, load_wan_folder
    from reward_forcing.models.text_encoder import TextEncoder
    from reward_forcing.models.wan import WanModel

    config, state_dict = load_wan_folder(folder)
    model = load_into(WanModel.from_config(config), state_dict, str(folder)).eval().requires_grad_(False)
    common = OmegaConf.load(run.stage_config("teacher"))
    encoder = TextEncoder.from_wan_folder(run.assets / common.model_name, common.text_encoder, device="cpu")
    return model, encoder


@torch.no_grad()
def euler(model, context, x, sigmas):
    """The ODE-pair generator's Euler steps (reward_forcing/training/ode_pairs.py) without CFG, for a batch."""
    for k in range(len(sigmas) - 1):
        t = torch.full((x.shape[0],), float(1000 * sigmas[k]))
        x = x + model(x, t, context).float() * float(sigmas[k + 1] - sigmas[k])
    return x


def sample_teacher(run, folder, per_colour: int, steps: int, shift: float) -> tuple:
    from reward_forcing.training.ode_pairs import euler_sigmas

    model, encoder = load_teacher(run, folder)
    world = run.world()
    spec = world.spec
    prompts = balanced_prompts(world, per_colour)
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    noise = torch.randn(len(prompts), spec.channels, spec.frames, spec.height, spec.width, generator=generator)
    latents = euler(model, encoder.encode(prompts).float(), noise, euler_sigmas(steps, shift))
    return latents, prompts


def reference_speeds(run) -> list:
    world = run.world()
    first = int(run.settings.data_samples) + 10 ** 6
    return [world.sample(first + i)["speed"] for i in range(REFERENCE_VIDEOS)]


def measure(run, latents, prompts, reference) -> dict:
    from reward_forcing.miniworld.detector import video_stats

    world = run.world()
    stats = video_stats(world, latents, [world.colour_of(p) for p in prompts])
    return {"color_accuracy": stats["color_correct"].mean().item(), "validity": stats["validity"].mean().item(),
            "speed": stats["speed"].mean().item(), "speed_w1_data": wasserstein1(stats["speed"].tolist(), reference),
            "data_speed": sum(reference) / len(reference), "path_speed": stats["path_speed"].mean().item(),
            "straightness": stats["straightness"].mean().item(), "videos": len(prompts)}


def sdedit(run, folder, sigma: float, steps: int, videos: int = 96) -> dict:
    """From held-out data noised to `sigma`, `steps` Euler steps linear in sigma down to 0: the speed kept."""
    from reward_forcing.miniworld.detector import video_stats

    model, encoder = load_teacher(run, folder)
    world = run.world()
    first = int(run.settings.data_samples) + 2 * 10 ** 6
    samples = [world.sample(first + i) for i in range(videos)]
    x0 = torch.stack([s["latent"] for s in samples])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    sigmas = torch.linspace(sigma, 0.0, steps + 1, dtype=torch.float64)
    out = euler(model, encoder.encode([s["prompt"] for s in samples]).float(), (1 - sigma) * x0 + sigma * noise,
                sigmas)
    stats = video_stats(world, out)
    true = torch.tensor([s["speed"] for s in samples], dtype=torch.float32)
    return {"sdedit_sigma": sigma, "validity": stats["validity"].mean().item(),
            "speed_kept": (stats["speed"].mean() / true.mean()).item()}


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    keys = ("variant", "settings", "train", "step", "sampler", "color_accuracy", "validity", "speed", "data_speed",
            "speed_w1_data", "straightness", "train_s")
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    for row in rows:
        if "sdedit_sigma" in row:
            continue
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    sdedit_rows = [row for row in rows if "sdedit_sigma" in row]
    if sdedit_rows:
        lines += ["", "| variant | step | start sigma | validity | speed kept (fraction of the data's) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['step']} | {r['sdedit_sigma']} | {r['validity']:.3f} | {r['speed_kept']:.3f} |"
                  for r in sdedit_rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def write_figure(out: Path) -> None:
    """sweep.png: each variant's speed W1 to the data against its training steps (default sampler only)."""
    from reward_forcing.miniworld.claims import SPEED_W1_MAX
    from reward_forcing.miniworld.figures import AXIS, _pyplot, style

    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    default = rows[0]["sampler"] if rows else ""
    curves = {}
    for row in rows:
        if "sdedit_sigma" not in row and row["sampler"] == default:
            label = " ".join(filter(None, [row["variant"] + ":", row["settings"] or "experiment.yaml", row["train"]]))
            curves.setdefault(label, {})[row["step"]] = row
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    for index, (label, points) in enumerate(curves.items()):
        steps = sorted(points)
        for ax, key in zip(axes, ("speed_w1_data", "speed")):
            ax.plot(steps, [points[n][key] for n in steps], label=label, **style(index))
    axes[0].axhline(SPEED_W1_MAX, color="#999999", linestyle=":", linewidth=1)
    axes[0].set(xlabel="teacher training steps (batch 16)", ylabel="speed W1 to the data (px / latent frame)",
                title="(a) distance to the data's speeds")
    if rows:
        axes[1].axhline(rows[0]["data_speed"], color="#999999", linestyle="--", linewidth=1, label="data")
    axes[1].set(xlabel="teacher training steps (batch 16)", ylabel=AXIS["speed"], title="(b) mean speed")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    run = variant_run(out / args.variant, args.settings)
    ode = OmegaConf.load(run.stage_config("ode"))
    steps = args.sampler_steps or int(ode.ode_num_steps)
    shift = args.sampler_shift if args.sampler_shift is not None else float(ode.ode_shift)
    reference = reference_speeds(run)
    logdir = run.out / "teacher"
    folder = None
    for count in [int(n) for n in args.evals.split(",")]:
        folder = run.out / f"teacher_ema@{count}"
        began = time.perf_counter()
        if not folder.is_dir():
            stages.train(run, run.stage_config("teacher"), logdir,
                         [f"data_path={run.data}", *run.overrides("teacher"), *args.train, f"max_steps={count}"])
            shutil.copytree(run.teacher, folder)
        trained = time.perf_counter() - began
        latents, prompts = sample_teacher(run, folder, args.per_colour, steps, shift)
        row = {"variant": args.variant, "settings": " ".join(args.settings), "train": " ".join(args.train),
               "step": count, "sampler": f"euler {steps}, shift {shift:g}", **measure(run, latents, prompts, reference),
               "train_s": round(trained, 1)}
        _append(out, row)
    for sigma in [float(s) for s in args.sdedit.split(",") if s]:
        _append(out, {"variant": args.variant, "step": count, **sdedit(run, folder, sigma, steps)})
    write_table(out)
    write_figure(out)
    return 0


def _append(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(out / "sweep.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
