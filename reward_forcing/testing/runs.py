"""Running the project in child processes, for tests: train.py on the tiny training assets, the torchrun workers of
reward_forcing/testing/ (gloo, CPU), and reading the metrics.jsonl a run writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
DIST_WORKER = ["-m", "reward_forcing.testing.dist_worker"]
# A gloo rank very rarely aborts in teardown on this shared CPU box (seen once in ~30 runs, see ENVIRONMENT.md)
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"
TIMING = {"step_time", "wall_time"}


def run_retrying_gloo_abort(cmd, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) with its output captured as text, run once more if a gloo rank aborted at exit."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0 and GLOO_TEARDOWN_ABORT in result.stderr:
        result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result


def run_worker(nproc, mode, out, worker=DIST_WORKER):
    """`worker [mode] out` in one process, or under torchrun on `nproc` ranks; asserts that it succeeded."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = [*worker, *([mode] if mode else []), str(out)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
           if nproc > 1 else [sys.executable, *args])
    result = run_retrying_gloo_abort(cmd, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def train_py(assets, logdir, *overrides, nproc=2, check=True) -> subprocess.CompletedProcess:
    """train.py with configs/tiny_train.yaml (seed 7) on the tiny training assets (conftest's write_training_assets)
    into `logdir`, under torchrun on `nproc` ranks or in one process; asserts success when `check`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [
        str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"), "--logdir", str(logdir),
        "--disable-wandb", f"checkpoint_dir={assets}", f"prompt_path={assets / 'prompts.txt'}", "seed=7", *overrides]
    result = run_retrying_gloo_abort(cmd, env=env, timeout=300, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics_rows(logdir) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows) -> list[dict]:
    """The rows without their wall-clock fields, which no two runs share."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
