"""The miniature world's experiment: its settings (configs/miniworld/experiment.yaml, quick.yaml), its arms and
the run folder (paths, stage records, the stage configs written for train.py).

An arm is a student trained by train.py from named initial weights with one stage config and a list of overrides,
once per seed, and evaluated after each of its `updates` (generator optimiser steps). Adding an arm is one entry
under `arms:` in experiment.yaml:

    re_dmd_bm:                          # the row names are <arm>@<updates>: re_dmd_bm@40, re_dmd_bm@160
      stage: distill                    # configs/miniworld/<stage>.yaml, merged over common.yaml
      init: ode_init                    # weights it starts from (Run.weights: ode_init, cf_ode_init); default ode_init
      overrides: [distill_loss=re_dmd, reward.weight_norm=batch_mean]
      updates: [40, 160]
      seeds: [1, 2, 3]                  # default: the experiment's seeds
      label: "Re-DMD, batch_mean w"     # legend / table text
"""
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "miniworld"
REPO = CONFIGS.parents[1]
ARM_KEYS = {"stage", "init", "overrides", "updates", "seeds", "label"}


def experiment_settings(quick: bool):
    settings = OmegaConf.load(CONFIGS / "experiment.yaml")
    if quick:
        settings = OmegaConf.merge(settings, OmegaConf.load(CONFIGS / "quick.yaml"))
    return settings


@dataclass(frozen=True)
class Arm:
    name: str
    stage: str
    init: str
    overrides: tuple
    updates: tuple
    seeds: tuple
    label: str

    def row(self, updates: int) -> str:
        return f"{self.name}@{updates}"


def arms_of(settings) -> dict:
    """{name: Arm} from the settings' `arms:` table, checked."""
    arms = {}
    for name, entry in settings.arms.items():
        unknown = set(entry) - ARM_KEYS
        if unknown:
            raise ConfigError(f"arm '{name}' has unknown key(s) {', '.join(sorted(unknown))} ({', '.join(ARM_KEYS)})")
        if "@" in name or not entry.get("updates"):
            raise ConfigError(f"arm '{name}' needs a name without '@' and a non-empty updates list")
        updates = tuple(int(n) for n in entry.updates)
        if list(updates) != sorted(set(updates)) or updates[0] < 1:
            raise ConfigError(f"arm '{name}': updates must be increasing positive counts, got {list(updates)}")
        arms[name] = Arm(name, str(entry.get("stage", "distill")), str(entry.get("init", "ode_init")),
                         tuple(entry.get("overrides", [])), updates, tuple(int(s) for s in entry.get("seeds", settings.seeds)),
                         str(entry.get("label", name)))
    return arms


class Run:
    """The output folder: stage records, paths, and the stage configs written for train.py."""

    def __init__(self, out: Path, settings, reward: str, quick: bool, jobs: int = 1):
        self.out, self.settings, self.reward, self.quick, self.jobs = out, settings, reward, quick, jobs
        self.arms = arms_of(settings)
        self.assets, self.world_path = out / "assets", out / "world.json"
        self.data, self.pairs, self.cf_pairs = out / "data", out / "ode_pairs", out / "cf_pairs"
        self.prompts, self.pair_prompts = out / "prompts" / "colours.txt", out / "prompts" / "pairs.txt"

    # ---- stage records ----
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

    # ---- configs for train.py ----
    def stage_config(self, name: str) -> Path:
        """common.yaml + <name>.yaml, written to <out>/configs/<name>.yaml (what train.py reads)."""
        merged = OmegaConf.merge(OmegaConf.load(CONFIGS / "common.yaml"), OmegaConf.load(CONFIGS / f"{name}.yaml"))
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: the arms' threads rewrite it while other arms' train.py read it
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            OmegaConf.save(merged, tmp)
        os.replace(tmp.name, path)
        return path

    def overrides(self, stage: str) -> list[str]:
        return [f"checkpoint_dir={self.assets}", *self.settings.stage_overrides.get(stage, [])]

    def world(self):
        from reward_forcing.miniworld.world import World

        return World.from_file(self.world_path)

    # ---- weights ----
    @property
    def separate_base(self) -> bool:
        """A teacher wider or deeper than the student (`teacher_dit`), as the paper's 14B teacher over its 1.3B
        student and critic: the student's architecture then gets its own base model, trained on the data."""
        return bool(self.settings.get("teacher_dit"))

    def trained(self, name: str) -> Path:
        """The weights of a Wan model trained on the data (<out>/<name>/model_ema, else model)."""
        logdir = self.out / name
        return logdir / "model_ema" if (logdir / "model_ema").is_dir() else logdir / "model"

    @property
    def teacher(self) -> Path:
        return self.trained("teacher")

    @property
    def ar_teacher(self) -> Path:
        """Causal Forcing's autoregressive teacher (stage ar_teacher): the cf_pairs teacher and cf_ode_init's start."""
        return self.trained("ar_teacher")

    @property
    def base(self) -> Path:
        """The student architecture's pretrained weights: the ODE init's start and the critic's."""
        return self.trained("base") if self.separate_base else self.teacher

    def weights(self, name: str) -> Path:
        """Named weights an arm starts from."""
        known = {name: self.out / name / "ode_init.pt" for name in ("ode_init", "cf_ode_init")}
        if name not in known:
            raise ConfigError(f"unknown init '{name}' ({', '.join(known)})")
        return known[name]

    def arm_dir(self, arm: Arm, seed: int) -> Path:
        return self.out / "arms" / f"{arm.name}_s{seed}"

    def arm_weights(self, arm: Arm, seed: int, updates: int) -> Path:
        return self.arm_dir(arm, seed) / f"generator@{updates}.pt"

    def arm_command(self, arm: Arm, seed: int) -> tuple[Path, list[str]]:
        """The stage config and train.py overrides of one (arm, seed), without max_steps."""
        # data_path: the ODE pairs the distill trainer takes clean first frames from; read only when
        # first_frame_prob > 0 (reward_forcing/training/distill.py), so the other distill arms train as without it
        specific = ([f"reward.name={self.reward}", f"real_name={self.teacher}", f"fake_name={self.base}",
                     f"data_path={self.pairs}"]
                    if arm.stage == "distill" else [])  # reward feedback's reward is its own config's
        return self.stage_config(arm.stage), [
            *arm.overrides, *specific, f"seed={seed}", f"reward.world_path={self.world_path}",
            f"prompt_path={self.prompts}", f"generator_ckpt={self.weights(arm.init)}", *self.overrides(arm.stage)]

    def max_steps(self, arm: Arm, updates: int) -> int:
        """train.py's max_steps for `updates` generator updates: the distill trainer steps the generator on every
        dfake_gen_update_ratio-th step (schedule corrected, reward_forcing/training/schedule.py), the others on
        every step."""
        config, overrides = self.arm_command(arm, seed=arm.seeds[0])
        cfg = load_config(config, overrides)
        return updates * (int(cfg.dfake_gen_update_ratio) if cfg.trainer == "distill" else 1)
