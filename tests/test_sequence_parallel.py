"""Ulysses sequence parallelism (reward_forcing/training/sequence_parallel.py) under torchrun (gloo, CPU): 2 ranks
splitting every sequence equal one process running it whole (outputs and parameter gradients of the teacher, the
student's teacher forcing, its training rollout and a streaming chunk); the tiny distillation preset trains the same
3 steps with sequence_parallel 2 on 2 ranks as on 1 rank and resumes exactly; bad settings stop in one line before
anything loads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from test_training_e2e import _rows, _train, _without_timing
from test_training_parallel import ROOT, _run

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.testing.sequence_parallel_worker import results, student, teacher
from reward_forcing.training.sequence_parallel import check_sequence_parallel


def test_two_ranks_splitting_the_sequence_equal_one_process(tmp_path):
    _run(2, "2", tmp_path, worker=["-m", "reward_forcing.testing.sequence_parallel_worker"])
    got = torch.load(tmp_path / "sequence_parallel.pt", weights_only=True)
    want = results(teacher(), student())  # plain modules, one process, whole sequences
    assert got.keys() == want.keys()
    for name, expected in want.items():
        output = expected["output"]
        torch.testing.assert_close(got[name]["output"], output, rtol=0, atol=1e-6 * float(output.abs().max()),
                                   msg=name)
        for key, grad in expected["grads"].items():
            assert grad.abs().max() > 0, (name, key)
            # each rank holds its tokens' share of a gradient; their sum differs from one sum by fp32 rounding
            torch.testing.assert_close(got[name]["grads"][key], grad, rtol=0, atol=1e-5 * float(grad.abs().max()),
                                       msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_training_assets):
    return write_training_assets(tmp_path_factory.mktemp("sp_training_assets"))


def test_sequence_parallel_two_ranks_train_as_one_rank_and_resume_exactly(assets, tmp_path):
    """configs/tiny_train.yaml for 3 steps (generator steps 0 and 2, the critic every step): 1 rank, and 2 ranks
    that split every sequence (one data-parallel rank: the same samples, the same global batch)."""
    one, split = tmp_path / "one", tmp_path / "split"
    _train(assets, one, "max_steps=3", "--no_save", nproc=1)
    _train(assets, split, "max_steps=3", "sequence_parallel=2")
    single, parallel = _without_timing(_rows(one)), _without_timing(_rows(split))
    assert [row["step"] for row in parallel] == [1, 2, 3]
    for a, b in zip(single, parallel):
        assert a.keys() == b.keys()
        # the same sums in another order (each rank sums its tokens' share of the gradient): fp32 round-off, which
        # the first sign-like AdamW steps and w = exp(beta * MQ_norm) amplify (see test_training_e2e.py)
        assert {k: (a[k], b[k]) for k in a if a[k] != pytest.approx(b[k], rel=1e-4, abs=1e-5)} == {}
    # a crash after step 3 was logged but before its checkpoint was complete: the same command resumes from step 2
    shutil.rmtree(split / "checkpoints" / "step_00000003")
    uninterrupted = split / "uninterrupted.jsonl"
    shutil.copy(split / "metrics.jsonl", uninterrupted)
    resumed = _train(assets, split, "max_steps=3", "sequence_parallel=2")
    assert "resumed from step 2" in resumed.stdout
    straight = [json.loads(line) for line in uninterrupted.read_text().splitlines()]
    assert _without_timing(_rows(split)) == _without_timing(straight)


def _settings(assets, **overrides):
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", [f"checkpoint_dir={assets}"])
    return OmegaConf.merge(cfg, overrides)


@pytest.mark.parametrize("overrides, world, message", [
    (dict(sequence_parallel=4), 2, "sequence_parallel 4 must be >= 1 and divide the world size 2"),
    (dict(sequence_parallel=3), 6, "sequence_parallel 3 must divide Wan2.1-T2V-1.3B's heads 4 and tokens per "
                                   "frame 4"),
    # the tiny teacher has 6 heads; 48 x 32 pixels are 6 x 4 latents, 3 x 2 = 6 tokens per frame
    (dict(sequence_parallel=4), 4, "sequence_parallel 4 must divide Wan2.1-T2V-14B's heads 6"),
    (dict(sequence_parallel=2, height=48, width=16), 2, "sequence_parallel 2 must divide Wan2.1-T2V-1.3B's "
                                                        "tokens per frame 3"),
])
def test_bad_settings_are_one_line(assets, overrides, world, message):
    with pytest.raises(ConfigError) as err:
        check_sequence_parallel(_settings(assets, **overrides), ("model_name", "fake_name", "real_name"), world)
    assert str(err.value) == message


def test_a_model_that_cannot_split_is_refused():
    from reward_forcing.training.sequence_parallel import _split_blocks

    with pytest.raises(ConfigError, match="sequence_parallel cannot split Linear"):
        _split_blocks(torch.nn.Linear(2, 2), group=None)


def test_train_py_refuses_before_loading_anything(assets, tmp_path):
    """In a world of 4 (WORLD_SIZE as torchrun sets it), the tiny teacher's 6 heads do not split 4 ways: one line
    and exit 2 before any process group, weights or run folder exist."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WORLD_SIZE="4")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--logdir", str(tmp_path / "run"), "sequence_parallel=4", f"checkpoint_dir={assets}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (result.returncode, result.stderr) == (2, "error: sequence_parallel 4 must divide Wan2.1-T2V-14B's "
                                                     "heads 6\n")
    assert not (tmp_path / "run").exists()
