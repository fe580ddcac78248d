"""Training configs and train.py's front door: paper values, overridable loop keys, one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from reward_forcing.config import load_config

ROOT = Path(__file__).parents[1]
# Wan2.1's standard negative prompt, as written in Wan's wan/configs/shared_config.py (sample_neg_prompt)
WAN_NEGATIVE_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"


def test_reward_forcing_config_has_the_paper_settings():
    cfg = load_config(ROOT / "configs" / "reward_forcing.yaml", ["max_steps=7", "save_every=3"])
    assert (cfg.max_steps, cfg.save_every) == (7, 3)
    assert (cfg.distill_loss, cfg.reward.beta, cfg.guidance_scale) == ("re_dmd", 2.0, 3.0)
    assert (cfg.lr_generator, cfg.lr_critic, list(cfg.adam_betas), cfg.weight_decay) == (2e-6, 4e-7, [0.0, 0.999], 0.01)
    assert (cfg.grad_accum, cfg.dfake_gen_update_ratio, cfg.grad_clip) == (8, 5, 10.0)
    assert (cfg.ema_decay, cfg.ema_start, cfg.min_score_timestep, cfg.max_score_timestep) == (0.99, 45, 20, 980)
    assert (cfg.local_attn_size, cfg.sink_size, cfg.sink_mode, cfg.rollout_cache) == (9, 3, "ema", "full")
    assert (cfg.schedule, cfg.rollout_cache_grad) == ("corrected", "straight_through")
    assert cfg.real_name == "Wan2.1-T2V-14B" and cfg.num_training_frames == 21


def test_upstream_preset_differs_from_the_default_only_by_its_switches():
    rf = load_config(ROOT / "configs" / "reward_forcing.yaml")
    up = load_config(ROOT / "configs" / "reward_forcing_upstream.yaml")
    assert {k for k in rf if rf[k] != up[k]} == {"schedule", "max_steps", "ema_start", "save_every", "reward"}
    assert {k for k in rf.reward if rf.reward[k] != up.reward[k]} == {"input"}
    assert (rf.reward.input, up.reward.input) == ("native", "upstream")
    # upstream's configs/reward_forcing.yaml: full_training_steps 601, ema_start_step 200, both in loop iterations
    assert (up.schedule, up.max_steps, up.ema_start, up.rollout_cache_grad) == ("upstream", 601, 200, "straight_through")


def test_reward_feedback_config_has_the_paper_settings():
    # arXiv 2601.16933: from the ODE init, ImageReward on the last frame; batch 8, AdamW (0, 0.999), wd 0.01,
    # lr 2e-6, EMA 0.99; no teacher or critic
    cfg = load_config(ROOT / "configs" / "reward_feedback.yaml")
    assert (cfg.trainer, cfg.generator_ckpt, cfg.reward.name, cfg.reward.frame) == (
        "reward_feedback", "ode_init.pt", "imagereward", "last")
    assert (8 * cfg.batch_size * cfg.grad_accum, cfg.lr_generator, list(cfg.adam_betas), cfg.weight_decay) == (
        8, 2e-6, [0.0, 0.999], 0.01)
    assert cfg.ema_decay == 0.99 and cfg.reward.feedback_weight == 0.0
    tiny = load_config(ROOT / "configs" / "tiny_reward_feedback.yaml")
    assert (tiny.trainer, tiny.reward.name, tiny.reward.score_key) == ("reward_feedback", "imagereward", "ImageReward")


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_gives_the_teacher_wans_negative_prompt(preset):
    assert load_config(ROOT / "configs" / preset).negative_prompt == WAN_NEGATIVE_PROMPT


def test_the_negative_prompt_is_defined_once():
    yamls = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "reward_forcing" / "defaults").glob("*.yaml"))
    holders = [p.relative_to(ROOT).as_posix() for p in yamls if "静止不动的画面" in p.read_text(encoding="utf-8")]
    assert holders == ["reward_forcing/defaults/training.yaml"]


def test_self_forcing_differs_only_in_loss_and_attention():
    rf = load_config(ROOT / "configs" / "reward_forcing.yaml")
    sf = load_config(ROOT / "configs" / "self_forcing.yaml")
    differ = {k for k in rf if rf[k] != sf[k]}
    assert differ == {"distill_loss", "local_attn_size", "sink_size", "sink_mode"}


@pytest.mark.parametrize("args, message", [
    (["trainer=gan"], "error: invalid value for 'trainer' in command-line overrides: Invalid value 'gan', expected "
                      "one of [distill, ode, diffusion, reward_feedback]"),
    (["max_stepz=3"], "error: unknown config key 'max_stepz' in command-line overrides"),
    (["--resume", "/nonexistent/ckpt"], "error: --resume folder not found: /nonexistent/ckpt"),
])
def test_train_py_bad_input_is_one_line(tmp_path, args, message):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--logdir", str(tmp_path), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == message


def test_train_py_usage_errors_are_one_line(tmp_path):
    """A missing flag is one `error:` line (no usage block), so torchrun's processes print nothing else."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--logdir", str(tmp_path)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: the following arguments are required: --config_path"
