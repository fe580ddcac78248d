"""scripts/miniworld.py end to end at toy sizes (--quick): every stage runs through train.py, the ODE pair
generator and the streaming sampler, metrics.json has the documented schema, report.md and the plots are
written, a rerun skips finished stages, and bad input is one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reward_forcing.rewards.registry import REWARDS

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "miniworld.py"
STAGES = ["data", "teacher", "ode_pairs", "ode_init", "distill", "evaluate", "long", "report"]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("miniworld") / "run"
    result = _run("--output_dir", "run", "--quick", cwd=out.parent)  # a relative path, as a user types it
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_quick_run_writes_metrics_report_and_plots(quick):
    out, stdout = quick
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("stage ")] == [
        f"stage {s}" for s in STAGES]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"arms", "long", "stages"}
    # configs/miniworld/quick.yaml: one seed, beta 4 only, both reward-feedback frames; data / teacher / ode_init
    # have one sample set each
    assert list(metrics["arms"]) == ["data", "teacher", "ode_init", "dmd", "re_dmd_b4", "rf_last", "rf_random"]
    for arm, entry in metrics["arms"].items():
        assert {"color_accuracy", "validity", "speed", "speed_w1_teacher", "reward", "quality"} <= set(entry)
        for value in entry.values():
            assert len(value["seeds"]) == 1 and value["mean"] == pytest.approx(value["seeds"][0])
    assert metrics["arms"]["teacher"]["speed_w1_teacher"]["mean"] == 0
    assert metrics["arms"]["data"]["color_accuracy"]["mean"] == 1 and metrics["arms"]["data"]["validity"]["mean"] == 1
    assert list(metrics["long"]["data"]) == ["world"] and metrics["long"]["data"]["world"]["validity"] == [1.0] * 12
    for arm in ("dmd", "re_dmd_b4"):
        assert set(metrics["long"][arm]) == {"none", "static", "ema", "ema_a0.99", "ema_a0.9"}
        for curves in metrics["long"][arm].values():
            assert set(curves) == {"validity", "color_drift", "first_chunk_similarity"}
            assert all(len(curve) == 12 for curve in curves.values())  # long_frames 12 in quick.yaml
    assert set(metrics["stages"]) == set(STAGES[:-1]) and all(s["seconds"] > 0 for s in metrics["stages"].values())
    report = (out / "report.md").read_text()
    assert "| re_dmd_b4 |" in report and "| rf_random |" in report and "| dmd | ema_a0.9 |" in report
    for name in ("dose_response.png", "long_rollouts.png", "strips.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages(quick):
    out, _ = quick
    result = _run("--output_dir", str(out), "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.endswith("skipped")]
    assert [line.split(":")[0] for line in skipped] == [f"stage {s}" for s in STAGES[:-1]]


@pytest.mark.parametrize("args, message", [
    (["--stages", "teacher,bake"], "error: unknown stage 'bake'; stages are " + ", ".join(STAGES)),
    (["--reward", "nope"], f"error: --reward must be one of {', '.join(REWARDS)}; got 'nope'"),
    (["--reward", "videoalign"], "error: reward 'videoalign' scores decoded pixels; the miniature world has no "
                                 "decoder (use a latent reward such as latent_motion)"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = _run("--output_dir", str(tmp_path / "run"), "--quick", *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists()


def test_an_output_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _run("--output_dir", str(tmp_path / "file"), "--quick")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --output_dir {tmp_path / 'file'} is a file, not a folder"]


def test_a_later_stage_alone_needs_the_earlier_ones(tmp_path):
    result = _run("--output_dir", str(tmp_path / "run"), "--quick", "--stages", "report")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: stage 'data' has not run in {tmp_path / 'run'}; run it first (or all stages)"]
