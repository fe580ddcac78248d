"""scripts/miniworld.py end to end at toy sizes (--quick): every stage runs through train.py, the ODE pair
generator and the streaming sampler, metrics.json holds every row's per-seed videos and summaries, the claims are
computed from it, report.md explains itself (with the --quick banner) and the figures are written, a rerun skips
finished stages, and bad input is one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reward_forcing.rewards.registry import REWARDS

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "miniworld.py"
STAGES = ["data", "teacher", "ode_pairs", "ode_init", "ar_teacher", "cf_pairs", "cf_ode_init", "arms", "evaluate",
          "image", "long", "report"]
FIGURES = ["fidelity.png", "re_dmd.png", "long_rollouts.png", "reward_feedback.png", "cache_grad.png",
           "causal_forcing.png", "image_to_video.png", "strips.png"]


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


def test_quick_run_writes_metrics_report_and_figures(quick):
    out, stdout = quick
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("stage ")] == [
        f"stage {s}" for s in STAGES]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"quick", "reward", "settings", "rows", "long", "stages"} and metrics["quick"] is True
    # configs/miniworld/quick.yaml: dmd at updates 1 and 2, re_dmd, cf_dmd and dmd_ff at 1, on seeds 1 and 2; the
    # others seed 1; the teachers' rows from their ODE pairs, the two ODE inits evaluated once; image-to-video: dmd
    # and dmd_ff at 1, the last update point they share
    two_seeds = ("dmd@1", "dmd@2", "re_dmd@1", "cf_dmd@1", "dmd_ff@1", "image:dmd@1", "image:dmd_ff@1")
    assert list(metrics["rows"]) == ["data", "teacher", "ar_teacher", "ode_init", "cf_ode_init", "dmd@1", "dmd@2",
                                     "re_dmd@1", "re_dmd_bm@1", "dmd_detached@1", "rf_last@1", "rf_random@1",
                                     "cf_dmd@1", "cf_re_dmd_b4@1", "dmd_ff@1", "image:dmd@1", "image:dmd_ff@1"]
    for name, row in metrics["rows"].items():
        assert len(row["seeds"]) == len(row["videos"]) == (2 if name in two_seeds else 1)
        assert row.get("trained_once", False) == (name in ("data", "teacher", "ar_teacher", "ode_init",
                                                           "cf_ode_init"))
        videos_per_seed = {"data": 24, "image:dmd@1": 6, "image:dmd_ff@1": 6}.get(name, 12)
        assert all(len(videos["speed"]) == videos_per_seed for videos in row["videos"])
        assert ("position_jump" in row["summary"]) == name.startswith("image:")
        for key, entry in row["summary"].items():
            assert entry["low"] <= entry["high"] or entry["n"] == 1
            # a mean lies in its interval; a W1's basic bootstrap interval (a one-seed row's, reward_forcing/miniworld/
            # stats.py) is reflected about it and may exclude it when the resampled W1s fall below it
            assert entry["low"] <= entry["mean"] <= entry["high"] or entry["n"] == 1 or key.startswith("speed_w1")
    assert "speed_w1_teacher" not in metrics["rows"]["teacher"]["summary"]  # no row's W1 to itself
    assert "speed_w1_data" not in metrics["rows"]["data"]["summary"]
    assert "speed_w1_ar_teacher" not in metrics["rows"]["ar_teacher"]["summary"]
    assert metrics["rows"]["data"]["summary"]["validity"]["mean"] == 1
    assert set(metrics["long"]) == {"data", "dmd"}
    assert set(metrics["long"]["dmd"]) == {"none", "static", "ema", "ema_a0.9"}
    for record in metrics["long"]["dmd"].values():
        assert record["seeds"] == [1, 2] and set(record["curves"]) == {"validity", "color_drift",
                                                                       "first_chunk_similarity", "copies"}
        assert all(len(curve) == 12 for curves in record["curves"].values() for curve in curves)
    assert set(metrics["stages"]) == set(STAGES[:-1]) and all(s > 0 for s in metrics["stages"].values())
    claims = json.loads((out / "claims.json").read_text())
    assert [c["key"] for c in claims] == ["C0", "C1@1", "C1@2", "C2@1", "C2@2", "C2b@1", "C2b@2", "C3", "C4", "C5",
                                          "C6a", "C6b@1", "C6b@2", "C7"]
    # quick.yaml trains re_dmd, re_dmd_bm and cf_dmd for one update only: their claims at 2 updates name the
    # missing rows
    assert {c["key"]: c["missing"] for c in claims if c["verdict"] == "not run"} == {
        "C2@2": ["re_dmd@2"], "C2b@2": ["re_dmd_bm@2"], "C6b@2": ["cf_dmd@2"]}
    # C6a: two models trained once, a bootstrap over both rows' videos gives its interval
    (c6a,) = [c for c in claims if c["key"] == "C6a"]
    assert c6a["checks"][0]["method"] == "bootstrap over videos" and c6a["checks"][0]["low"] is not None
    assert all(c["verdict"] in ("reproduced", "not reproduced", "inconclusive") for c in claims if not c["missing"])
    report = (out / "report.md").read_text()
    assert "`--quick` run: a pipeline check at toy sizes, not a result" in report
    for text in ("## Claims", "| C2b@2 |", "| re_dmd_bm@1 |", "| C6a |", "| cf_ode_init |", "| dmd | ema_a0.9 |",
                 "## Metrics", "| speed_w1_data |", "| speed_w1_ar_teacher |", "## Wall time per stage", "| arms |",
                 "Student's t over seeds", "## Image-to-video", "| image:dmd_ff@1 | 2 |", "| C7 |"):
        assert text in report, text
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name})" in report


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
