"""`schedule: corrected | upstream` through the real Distiller on tiny models: optimiser steps, samples per step
and EMA updates against counts worked out by hand from each loop (reward_forcing/training/schedule.py)."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from reward_forcing.config import load_config
from reward_forcing.training import distill, ema
from reward_forcing.training.loop import train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_training_assets):
    return write_training_assets(tmp_path_factory.mktemp("schedule_assets"))


def _run(assets, tmp_path, monkeypatch, *overrides):
    """Trains with `overrides`; returns the event log: (network, 'micro', samples) / (network, 'step' | 'zero') /
    ('ema', 'create' | 'update')."""
    log = []

    class CountingEMA(ema.EMA):
        def __init__(self, *args):
            log.append(("ema", "create"))
            super().__init__(*args)

        def update(self, model):
            log.append(("ema", "update"))
            super().update(model)

    class Recording(distill.Distiller):
        def __init__(self, *args):
            super().__init__(*args)
            for name, optimizer in (("generator", self.generator_optimizer), ("critic", self.critic_optimizer)):
                optimizer.register_step_pre_hook(lambda *_, name=name: log.append((name, "step")))
                zero_grad = optimizer.zero_grad
                optimizer.zero_grad = lambda *a, name=name, zero_grad=zero_grad, **k: (
                    log.append((name, "zero")), zero_grad(*a, **k))

        def generator_micro(self, step, micro):
            log.append(("generator", "micro", len(self.run.sample_ids(micro))))
            return super().generator_micro(step, micro)

        def critic_micro(self, step, micro):
            log.append(("critic", "micro", len(self.run.sample_ids(micro))))
            return super().critic_micro(step, micro)

    monkeypatch.setattr(ema, "EMA", CountingEMA)
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", [
        f"checkpoint_dir={assets}", f"prompt_path={assets / 'prompts.txt'}", "seed=7", "distill_loss=dmd",
        "batch_size=2", "grad_accum=2", "dfake_gen_update_ratio=2", "max_steps=5", "ema_start=2",
        "num_training_frames=3", *overrides])
    train(Recording, cfg, tmp_path, SimpleNamespace(resume=None, disable_wandb=True, no_save=True))
    return log


def _samples_per_step(log, network):
    """Samples in the gradient at each optimiser step of `network` (micro-batches since its last zero_grad)."""
    held, per_step = 0, []
    for event in log:
        if event[0] != network:
            continue
        if event[1] == "micro":
            held += event[2]
        elif event[1] == "step":
            per_step.append(held)
        else:
            held = 0
    return per_step


def _ema(log):
    return [event[1] for event in log if event[0] == "ema"]


def test_corrected_schedule_counts(assets, tmp_path, monkeypatch):
    # 5 optimiser steps, generator on steps 0, 2, 4; each step on grad_accum 2 x batch 2 = 4 samples; the EMA is
    # made at the first generator step at or after ema_start 2 and updated on step 4
    log = _run(assets, tmp_path, monkeypatch, "schedule=corrected")
    assert _samples_per_step(log, "generator") == [4, 4, 4]
    assert _samples_per_step(log, "critic") == [4, 4, 4, 4, 4]
    assert _ema(log) == ["create", "update"]


def test_upstream_schedule_counts(assets, tmp_path, monkeypatch):
    # 5 iterations of upstream's loop, grad_accum 2, ratio 2: generator events on iterations 0 and 4, two steps
    # each on one micro-batch (2 samples); the critic steps every iteration on its unzeroed sum and again on
    # iterations 0, 2, 4 before zeroing: sums of 1, 1 | 1 | 2, 2 | 1 | 2, 2 micro-batches. The EMA is made at the
    # end of iteration 1 (2 iterations done = ema_start) and follows both steps of the event at iteration 4.
    log = _run(assets, tmp_path, monkeypatch, "schedule=upstream")
    assert _samples_per_step(log, "generator") == [2, 2, 2, 2]
    assert _samples_per_step(log, "critic") == [2, 2, 2, 4, 4, 2, 4, 4]
    assert _ema(log) == ["create", "update", "update"]
