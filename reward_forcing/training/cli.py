"""Train the streaming student: `[torchrun ...] train.py --config_path CFG --logdir DIR [key=value ...]`.

The config key `trainer` picks the method: `distill` (DMD / Re-DMD, reward_forcing.training.distill), `ode`
(ODE-regression initialisation, reward_forcing.training.ode), `diffusion` (flow-matching training of the
bidirectional Wan model on a latent dataset, or with `causal: true` of the autoregressive teacher,
reward_forcing.training.diffusion) or `reward_feedback`
(ImageReward on a decoded frame, reward_forcing.training.reward_feedback). Each runs inside the one training loop,
reward_forcing.training.loop.train(method, config, logdir, args). Re-running with the same --logdir resumes from
its latest complete checkpoint.
"""
import importlib
from pathlib import Path

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError, OneLineParser
from reward_forcing.training.lr_schedule import check_lr_schedule

TRAINERS = {"distill": ("reward_forcing.training.distill", "Distiller"),
            "ode": ("reward_forcing.training.ode", "OdeRegression"),
            "diffusion": ("reward_forcing.training.diffusion", "FlowMatching"),
            "reward_feedback": ("reward_forcing.training.reward_feedback", "RewardFeedback")}


def parse_args(argv):
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="YAML config (e.g. configs/reward_forcing.yaml)")
    parser.add_argument("--logdir", required=True, help="run folder: checkpoints, metrics.jsonl, exported weights")
    parser.add_argument("--disable-wandb", "--disable_wandb", dest="disable_wandb", action="store_true",
                        help="no wandb logging (metrics.jsonl is still written)")
    parser.add_argument("--no_save", "--no-save", dest="no_save", action="store_true",
                        help="write no checkpoints or exported weights")
    parser.add_argument("--no_visualize", "--no-visualize", dest="no_visualize", action="store_true",
                        help="accepted for upstream command compatibility; this trainer logs no videos")
    parser.add_argument("--resume", default=None,
                        help="resume from this checkpoint folder (default: the latest complete one in --logdir)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_intermixed_args(argv)  # flags may follow key=value overrides


def main(argv=None):
    args = parse_args(argv)
    config = load_config(args.config_path, args.overrides)
    check_lr_schedule(config)
    if args.resume is not None and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume folder not found: {args.resume}")
    from reward_forcing.training.loop import train

    module, method = TRAINERS[config.trainer]
    train(getattr(importlib.import_module(module), method), config, Path(args.logdir), args)  # only this trainer
    return 0
