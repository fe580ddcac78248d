"""FSDP2 machinery on a toy under torchrun (gloo, CPU): gradients match a plain single-process oracle for
1 and 2 ranks at the same global batch; DCP resume replays exactly; the export loads with weights_only."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _training_dist_worker import GLOBAL_BATCH, Toy  # noqa: E402

from reward_forcing.training.rng import keyed_randn  # noqa: E402
from reward_forcing.training.state import latest_checkpoint  # noqa: E402

WORKER = Path(__file__).with_name("_training_dist_worker.py")
ROOT = Path(__file__).parents[1]


def _run(nproc, mode, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(WORKER), mode, str(out)] if nproc > 1 else [sys.executable, str(WORKER), mode, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def _oracle_grads():
    torch.manual_seed(0)
    model = Toy()
    x = torch.stack([keyed_randn((6,), 7, "x", 0, i) for i in range(GLOBAL_BATCH)])
    (model(x) ** 2).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("nproc", [1, 2])
def test_first_step_gradients_match_plain_autograd(tmp_path, nproc):
    _run(nproc, "grads", tmp_path)
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    for name, grad in _oracle_grads().items():
        assert torch.allclose(got[name], grad, atol=1e-6), name


def test_resume_replays_exactly_and_export_loads(tmp_path):
    _run(2, "resume", tmp_path)
    result = torch.load(tmp_path / "resume.pt", weights_only=True)
    for straight, resumed in zip(result["straight"], result["resumed"]):
        assert straight.keys() == resumed.keys() and len(straight) == 6
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), key
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    exported = torch.load(tmp_path / "generator.pt", weights_only=True)
    assert set(exported) == {"generator", "generator_ema"}
    assert torch.equal(exported["generator"]["head.weight"], result["resumed"][0]["head.weight"])
    assert torch.equal(load_file(tmp_path / "generator_ema.safetensors")["head.weight"],
                       result["resumed"][1]["head.weight"])
    assert set(load_file(tmp_path / "generator.safetensors")) == set(exported["generator"])


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / "step_00000005.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000003").mkdir()
    (tmp_path / "checkpoints" / "step_00000003" / "meta.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000004").mkdir()  # no meta.json: not complete
    assert latest_checkpoint(tmp_path).name == "step_00000003"
