"""train.py end to end on tiny random models (CPU, gloo): torchrun with 2 ranks trains, saves and resumes
to the same metrics as an uninterrupted run; 1 rank with batch 2 matches 2 ranks with batch 1; a NaN
stops the run with a one-line error and the last good checkpoint intact; inference.py loads the export."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reward_forcing.checkpoints import load_generator_state_dict
from reward_forcing.config import load_config
from reward_forcing.training.state import latest_checkpoint

ROOT = Path(__file__).parents[1]
TIMING = {"step_time", "wall_time"}
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"  # see test_training_parallel.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_training_assets):
    return write_training_assets(tmp_path_factory.mktemp("tiny_training_assets"))


def _train(assets, logdir, *overrides, nproc=2, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [
        str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"), "--logdir", str(logdir),
        "--disable-wandb", f"checkpoint_dir={assets}", f"prompt_path={assets / 'prompts.txt'}", "seed=7", *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if result.returncode != 0 and GLOO_TEARDOWN_ABORT in result.stderr:  # rare gloo abort at exit: retry once
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _rows(logdir):
    return [json.loads(line) for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("uninterrupted")
    _train(assets, logdir)  # max_steps 4, save_every 2, generator on steps 1 and 3
    return logdir


def test_metrics_schema_and_checkpoints(uninterrupted):
    rows = _rows(uninterrupted)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"critic_loss", "critic_grad_norm", "step_time", "wall_time"} <= row.keys()
        assert (row["lr_generator"], row["lr_critic"]) == (1.0e-3, 1.0e-3)  # configs/tiny_train.yaml
        generator = row["step"] in (1, 3)  # dfake_gen_update_ratio 2: optimiser steps 0 and 2
        assert ({"generator_loss", "reward_mq", "reward_weight", "dmd_grad_norm", "generator_grad_norm",
                 "reward_weight_min", "reward_weight_max"} <= row.keys()) == generator
    # w = exp(beta * MQ_norm) per sample (beta 2): with one sample on each of the 2 ranks, min and max are the two
    # samples' weights, so their logs / beta average to the logged mean MQ_norm and they average to the mean w
    beta = load_config(ROOT / "configs" / "tiny_train.yaml").reward.beta
    for row in rows[::2]:
        low, high = row["reward_weight_min"], row["reward_weight_max"]
        assert (math.log(low) + math.log(high)) / (2 * beta) == pytest.approx(row["reward_mq_norm"], rel=1e-6)
        assert (low + high) / 2 == pytest.approx(row["reward_weight"], rel=1e-12)
    assert [p.name for p in sorted((uninterrupted / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    meta = json.loads((uninterrupted / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["seed"] == 7 and meta["has_ema"] and meta["world_size"] == 2


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(assets, uninterrupted, tmp_path):
    _train(assets, tmp_path, "max_steps=3")
    # the run "crashed" after logging step 3 but before its checkpoint finished: only step 2 is complete
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000003")
    (tmp_path / "checkpoints" / "step_00000003.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    resumed = _train(assets, tmp_path)  # the same command: resumes from step 2, rewrites steps 3 and 4
    assert "resumed from step 2" in resumed.stdout
    assert f"exported the generator to {tmp_path}: generator.pt, generator.safetensors, generator_ema.safetensors" \
        in resumed.stdout
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text()
    assert _without_timing(_rows(tmp_path)) == _without_timing(_rows(uninterrupted))
    for use_ema in (False, True):  # the EMA (really updated at step 2, see below) resumes too
        a = load_generator_state_dict(tmp_path / "generator.pt", use_ema=use_ema)
        b = load_generator_state_dict(uninterrupted / "generator.pt", use_ema=use_ema)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_generator_ema_is_updated_in_the_tiny_run(uninterrupted, tmp_path):
    """Bug caught: an EMA that is created but never updated (the export's generator_ema would equal the
    generator), or decay and 1 - decay exchanged. ema_start 0: the EMA copies the generator after optimiser step 0
    (= the step-2 checkpoint's generator, as step 1 has no generator update) and blends in the generator after
    step 2 (= the final export's generator): ema = d * gen_ckpt2 + (1 - d) * gen_final."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    decay = load_config(ROOT / "configs" / "tiny_train.yaml").ema_decay
    dcp_to_torch_save(uninterrupted / "checkpoints" / "step_00000002", tmp_path / "step2.pt")
    step2 = torch.load(tmp_path / "step2.pt", weights_only=True)
    assert torch.equal(step2["generator_ema"]["blocks.0.ffn.0.weight"], step2["generator"]["blocks.0.ffn.0.weight"])
    final = load_generator_state_dict(uninterrupted / "generator.pt")
    ema = load_generator_state_dict(uninterrupted / "generator.pt", use_ema=True)
    moved = 0
    for name, value in step2["generator_ema"].items():
        expected = decay * step2["generator"][name].double() + (1 - decay) * final[name].double()
        torch.testing.assert_close(ema[name].double(), expected, rtol=0, atol=1e-6)
        moved += not torch.equal(ema[name], final[name])
    assert moved == len(step2["generator_ema"])  # every parameter: the EMA lags the generator


def test_one_rank_batch_two_matches_two_ranks_batch_one(assets, uninterrupted, tmp_path):
    _train(assets, tmp_path, "batch_size=2", "max_steps=1", "--no_save", nproc=1)
    one, two = _without_timing(_rows(tmp_path))[0], _without_timing(_rows(uninterrupted))[0]
    assert one.keys() == two.keys()
    # fp32 GEMMs over a batch of 2 and over two batches of 1 sum in different orders (~1e-6 relative here);
    # the reward weight exp(beta * MQ_norm) then amplifies that by beta * |MQ - mean| / std, measured up to
    # 1.2e-5 relative on one machine. A wrong sample, rank or reduction would differ by O(1).
    # Normalised scores are O(1) and may sit near 0, where a relative bound means nothing: abs 1e-5 there.
    for key in one:
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "generator.pt").exists()


def test_nan_stops_with_one_line_and_keeps_the_last_checkpoint(assets, tmp_path):
    # a huge critic learning rate makes the critic's weights non-finite after its first step
    result = _train(assets, tmp_path, "lr_critic=1e30", "save_every=1", "distill_loss=dmd", nproc=1, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: critic loss is nan")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [r["step"] for r in _rows(tmp_path)] == [1]


def test_exported_generator_generates_with_inference_py(assets, uninterrupted, tmp_path):
    (tmp_path / "p.txt").write_text("a cat walks on grass\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "inference.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--checkpoint_path", str(uninterrupted / "generator.pt"), "--use_ema", "--data_path", str(tmp_path / "p.txt"),
           "--output_folder", str(tmp_path / "out"), "--num_output_frames", "3", f"checkpoint_dir={assets}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "out").rglob("*.mp4"))
    # the safetensors export holds the same non-EMA weights as the .pt
    from safetensors.torch import load_file
    pt = load_generator_state_dict(uninterrupted / "generator.pt")
    st = load_file(uninterrupted / "generator.safetensors")
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)


def test_two_rank_checkpoint_resumes_on_one_rank(assets, uninterrupted, tmp_path):
    # DCP reshards by parameter name: the same global batch on 1 rank continues the 2-rank run
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(uninterrupted / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "step_00000002")
    rows = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    _train(assets, tmp_path, "batch_size=2", "--no_save", nproc=1)
    resumed, straight = _without_timing(_rows(tmp_path)), _without_timing(_rows(uninterrupted))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for one, two in zip(resumed[2:], straight[2:]):
        assert one.keys() == two.keys()
        # reduction order differs between 1 and 2 ranks; w = exp(beta * MQ_norm) amplifies the fp noise that the
        # first, sign-like AdamW steps leave in the weights to ~2e-5 relative; normalised scores near 0
        # (reward_ta_norm 0.0109 vs 0.0109 + 2e-6 measured) need an absolute bound on their O(1) scale
        assert {k: (one[k], two[k]) for k in one if one[k] != pytest.approx(two[k], rel=1e-4, abs=1e-5)} == {}


def test_a_checkpoint_error_read_on_rank_0_stops_every_rank(assets, tmp_path):
    # only rank 0 reads weights; the others must learn of the error instead of waiting for the broadcast
    result = _train(assets, tmp_path, "generator_ckpt=missing.pt", check=False)
    assert result.returncode != 0
    # every rank stops with the error; rank 0 alone prints it (reward_forcing/errors.py run_cli)
    assert result.stderr.count(f"error: checkpoint not found: {assets / 'missing.pt'}") == 1

