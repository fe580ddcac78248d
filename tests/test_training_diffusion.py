"""train.py with `trainer: diffusion`: flow matching of the bidirectional Wan model on a latent dataset.
The loss is zero for the exact flow of a one-point dataset; draws are keyed per sample; a run exports Wan
folders and resumes after a crash to the metrics of an uninterrupted run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reward_forcing.checkpoints import load_wan_folder
from reward_forcing.sampling import FlowMatchSchedule
from reward_forcing.training.diffusion import dropped_text, flow_matching_loss, sample_timesteps
from reward_forcing.training.ode_data import prepare_output_dir, write_shard
from reward_forcing.training.state import latest_checkpoint

ROOT = Path(__file__).parents[1]


class _ExactFlow(torch.nn.Module):
    """The true flow of a dataset holding the single latent x0: v(x_t, t) = (x_t - x0) / sigma(t)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x_t, t, context):
        sigma = self.schedule.sigma(t).view(-1, 1, 1, 1, 1)
        return ((x_t.double() - self.x0.double()) / sigma).float()


def test_the_exact_flow_of_a_one_point_dataset_has_zero_loss():
    schedule = FlowMatchSchedule(3.0)
    x0 = torch.randn(1, 4, 3, 2, 2).expand(5, -1, -1, -1, -1)
    noise = torch.randn(5, 4, 3, 2, 2)
    t = sample_timesteps(seed=1, step=0, sample_ids=range(5), shift=3.0).clamp(min=50)  # sigma > 0
    assert flow_matching_loss(_ExactFlow(x0, schedule), schedule, x0, noise, t, None) < 1e-8
    wrong = _ExactFlow(x0 + 1, schedule)
    assert flow_matching_loss(wrong, schedule, x0, noise, t, None) > 0.1


def test_draws_are_keyed_per_sample():
    both = sample_timesteps(7, 3, [10, 11], shift=3.0)
    assert both[1] == sample_timesteps(7, 3, [11], shift=3.0)[0]
    assert ((both >= 0) & (both <= 1000)).all()
    assert dropped_text(7, 3, range(50), 0.0) == [False] * 50 and dropped_text(7, 3, range(50), 1.0) == [True] * 50
    assert 0.4 < sum(dropped_text(7, 3, range(2000), 0.5)) / 2000 < 0.6


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_training_assets):
    root = write_training_assets(tmp_path_factory.mktemp("diffusion_assets"))
    data = root / "latents"
    prepare_output_dir(data, {"num_prompts": 8, "shard_size": 8})
    prompts = (root / "prompts.txt").read_text().splitlines()
    latents = torch.randn(8, 1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    write_shard(data, 0, [prompts[i % len(prompts)] for i in range(8)], list(range(8)), latents)
    return root


def _train(assets, logdir, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--logdir", str(logdir), "--disable-wandb", f"checkpoint_dir={assets}", f"data_path={assets / 'latents'}",
           "trainer=diffusion", "seed=5", "max_steps=4", "save_every=2", "batch_size=2", "ema_start=1", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _rows(logdir):
    return [{k: v for k, v in json.loads(line).items() if k not in ("step_time", "wall_time")}
            for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]


def test_diffusion_run_exports_wan_folders_and_resumes_exactly(assets, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    result = _train(assets, straight)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported the model to {straight / 'model_ema'}" in result.stdout
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert all(r["lr_model"] == 1.0e-3 for r in rows)  # configs/tiny_train.yaml lr_generator
    config, weights = load_wan_folder(straight / "model")
    _, ema = load_wan_folder(straight / "model_ema")
    _, start = load_wan_folder(assets / "Wan2.1-T2V-1.3B")
    assert config == json.loads((assets / "Wan2.1-T2V-1.3B" / "config.json").read_text())
    assert weights.keys() == start.keys() == ema.keys()
    changed = [k for k in weights if not torch.equal(weights[k], start[k])]
    assert changed and any(not torch.equal(ema[k], weights[k]) for k in changed)  # EMA lags the weights

    assert _train(assets, crashed, "max_steps=3").returncode == 0
    shutil.rmtree(crashed / "checkpoints" / "step_00000003")  # the crash came before step 3's checkpoint completed
    assert latest_checkpoint(crashed).name == "step_00000002"
    assert _train(assets, crashed).returncode == 0
    assert _rows(crashed) == rows
    _, resumed = load_wan_folder(crashed / "model_ema")
    assert all(torch.equal(resumed[k], ema[k]) for k in ema)


def test_diffusion_without_data_is_one_line(assets, tmp_path):
    result = _train(assets, tmp_path, "data_path=null")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: trainer 'diffusion' needs data_path=<latent dataset> (reward_forcing/training/ode_data.py)"]


def test_cosine_schedule_with_warmup_follows_its_closed_form_across_a_resume(assets, tmp_path):
    # warm-up 2 of 4 steps: (s + 1) / 2 for s < 2, then 0.5 * (1 + cos(pi * (s - 2) / 2)): 0.5, 1, 1, 0.5
    expected = [0.5e-3, 1.0e-3, 1.0e-3, 0.5e-3]
    schedule = ("lr_schedule=cosine", "lr_warmup_steps=2")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _train(assets, straight, *schedule).returncode == 0
    assert [r["lr_model"] for r in _rows(straight)] == pytest.approx(expected, rel=1e-12)
    assert _train(assets, crashed, *schedule, "max_steps=2").returncode == 0
    result = _train(assets, crashed, *schedule)  # resumes at step 2 and continues on the same curve
    assert result.returncode == 0, result.stderr[-2000:]
    assert _rows(crashed) == _rows(straight)
