"""The one training loop (reward_forcing/training/loop.py) every trainer runs inside: the EMA policy against a
hand-worked table, a finished run that says so without building a model, learning-rate schedules applied to a
two-network trainer, and the final summary line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.training.ema import EmaPolicy
from reward_forcing.training.loop import Method, train

ROOT = Path(__file__).parents[1]


def test_ema_policy_starts_at_the_first_step_at_or_after_start_and_blends_after():
    """decay 0.5, start 2; the weight is set to the step number before each stepped() call. Made at step 2 (a copy:
    2), then 0.5 * 2 + 0.5 * 3 = 2.5 at step 3 and 0.5 * 2.5 + 0.5 * 4 = 3.25 at step 4."""
    model = torch.nn.Linear(1, 1, bias=False)
    policy = EmaPolicy(model, decay=0.5, start=2)
    seen = []
    for step in range(5):
        with torch.no_grad():
            model.weight.fill_(float(step))
        policy.stepped(step)
        seen.append(None if policy.average is None else float(policy.average.shadow["weight"]))
    assert seen == [None, None, 2.0, 2.5, 3.25]
    off = EmaPolicy(model, decay=None, start=0)
    off.stepped(3)
    assert off.average is None and not off.enabled
    untracked = EmaPolicy(None, decay=0.9, start=0)  # a method whose EMA follows no network (ODE regression)
    untracked.stepped(3)
    assert untracked.average is None


def test_a_finished_run_says_so_before_building_anything(tmp_path, capsys):
    """A logdir whose latest checkpoint is at max_steps: one line, no process group, no model (the method's
    constructor would raise)."""
    class Exploding(Method):
        def __init__(self, run):
            raise AssertionError("the method was built")

        def step(self, step):
            raise AssertionError

        def export(self, average):
            raise AssertionError

    folder = tmp_path / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 4, "seed": 7, "world_size": 1}))
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", ["max_steps=4"])
    train(Exploding, cfg, tmp_path, SimpleNamespace(resume=None, disable_wandb=True, no_save=False))
    assert capsys.readouterr().out.strip() == f"{tmp_path}: already at step 4 (max_steps=4), nothing to do"
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def cosine_distill(tmp_path_factory, write_training_assets):
    assets = write_training_assets(tmp_path_factory.mktemp("loop_assets"))
    logdir = tmp_path_factory.mktemp("loop_run")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--logdir", str(logdir), "--disable-wandb", f"checkpoint_dir={assets}",
           f"prompt_path={assets / 'prompts.txt'}", "seed=7", "distill_loss=dmd", "num_training_frames=3",
           "max_steps=4", "save_every=4", "lr_schedule=cosine", "lr_warmup_steps=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir, result


def test_a_schedule_sets_both_networks_rates_of_a_distillation_run(cosine_distill):
    """lr = base * factor(step): a linear warm-up of 1 step, then half a cosine over the remaining 3 to 0 (SGDR,
    arXiv 1608.03983), for the generator (1e-3) and the critic (1e-3) alike."""
    logdir, _ = cosine_distill
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    factors = [1.0] + [0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in range(1, 4)]
    assert [r["lr_generator"] for r in rows] == pytest.approx([1e-3 * f for f in factors], rel=1e-12)
    assert [r["lr_critic"] for r in rows] == pytest.approx([1e-3 * f for f in factors], rel=1e-12)


def test_training_ends_with_one_summary_line(cosine_distill):
    logdir, result = cosine_distill
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("distill: trained steps 1..4 of 4 in ") and last.endswith(
        f"weights: {logdir / 'generator.pt'}, {logdir / 'generator.safetensors'}, "
        f"{logdir / 'generator_ema.safetensors'}")
