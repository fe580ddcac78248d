"""VBench aggregation against the Reward Forcing README's VBench table (Total = (4 Quality + Semantic) / 5)
and hand-computed examples."""
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from reward_forcing.errors import run_cli
from reward_forcing.vbench import (DIMENSIONS, QUALITY, SEMANTIC, VBenchResultsError, aggregate, group_weight_sum,
                                   load_results, main, parse_results, total_score)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "vbench_aggregate.py"

# The 16 names VBench's `VBench.build_full_dimension_list` writes into `*_eval_results.json`.
VBENCH_NAMES = {
    "subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality", "object_class",
    "multiple_objects", "color", "spatial_relationship", "scene", "temporal_style", "overall_consistency",
    "human_action", "temporal_flickering", "motion_smoothness", "dynamic_degree", "appearance_style",
}

# The Reward Forcing README's VBench table: method -> (Total, Quality, Semantic), each rounded to 2 decimals.
PUBLISHED = {
    "SkyReels-V2": (82.67, 84.70, 74.53), "MAGI-1": (79.18, 82.04, 67.74), "NOVA": (80.12, 80.39, 79.05),
    "Pyramid Flow": (81.72, 84.74, 69.62), "CausVid": (82.88, 83.93, 78.69), "Self Forcing": (83.80, 84.59, 80.64),
    "LongLive": (83.22, 83.68, 81.37), "Reward Forcing": (84.13, 84.84, 81.32),
}


def _write(path, data):
    path.write_text(json.dumps(data, indent=4))
    return path


def _entry(score):
    """One dimension as VBench writes it: [average score, per-video results]."""
    return [score, [{"video_path": "videos/a cat-0.mp4", "video_results": score}]]


def test_table_matches_spec():
    assert set(DIMENSIONS) == VBENCH_NAMES
    assert group_weight_sum(QUALITY) == 6.5 and group_weight_sum(SEMANTIC) == 9
    assert DIMENSIONS["dynamic_degree"].weight == 0.5
    assert (DIMENSIONS["motion_smoothness"].min, DIMENSIONS["motion_smoothness"].max) == (0.706, 0.9975)
    assert (DIMENSIONS["appearance_style"].min, DIMENSIONS["appearance_style"].max) == (0.0009, 0.2855)
    assert DIMENSIONS["overall_consistency"].group == SEMANTIC and DIMENSIONS["imaging_quality"].group == QUALITY


def test_spec_check_values():
    assert total_score(84.84, 81.32) == pytest.approx((4 * 84.84 + 81.32) / 5) == pytest.approx(84.136)
    assert total_score(84.59, 80.64) == pytest.approx(83.80)


@pytest.mark.parametrize("method", PUBLISHED)
def test_published_totals_consistent(method):
    total, quality, semantic = PUBLISHED[method]
    # Inputs rounded to +-0.005 move the total by at most 0.005; the published total adds another 0.005.
    assert abs(total_score(quality, semantic) - total) <= 0.01 + 1e-9


def test_extremes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best = aggregate({name: d.max for name, d in DIMENSIONS.items()})
        worst = aggregate({name: d.min for name, d in DIMENSIONS.items()})
    assert (best.total, best.quality, best.semantic) == pytest.approx((100, 100, 100))
    assert (worst.total, worst.quality, worst.semantic) == pytest.approx((0, 0, 0), abs=1e-12)


def test_hand_computed_partial():
    scores = {"subject_consistency": 0.9, "dynamic_degree": 0.6, "imaging_quality": 0.7,
              "scene": 0.4111, "appearance_style": 0.1432}
    with pytest.warns(UserWarning, match="missing") as record:
        result = aggregate(scores)
    # Quality: (0.9 - 0.1462) / (1 - 0.1462) + 0.5 * 0.6 + 0.7, over 6.5.
    quality = 100 * ((0.9 - 0.1462) / (1 - 0.1462) + 0.5 * 0.6 + 0.7) / 6.5
    # Semantic: 0.4111 / 0.8222 + (0.1432 - 0.0009) / (0.2855 - 0.0009) = 0.5 + 0.5, over 9.
    semantic = 100 * (0.5 + 0.5) / 9
    assert result.quality == pytest.approx(quality) and quality == pytest.approx(28.96731)
    assert result.semantic == pytest.approx(semantic)
    assert result.total == pytest.approx((4 * quality + semantic) / 5) and result.total == pytest.approx(25.39609, abs=1e-5)
    assert result.normalised["dynamic_degree"] == pytest.approx(0.6)  # weight applied in the sum, not stored
    missing = set(DIMENSIONS) - set(scores)
    assert set(result.missing) == missing and len(missing) == 11
    assert all(result.normalised[name] == 0 for name in missing)
    message = str(record[0].message)
    assert all(name in message for name in missing) and "subject_consistency" not in message


def test_missing_counts_zero_not_raw_zero():
    # temporal_flickering has Min 0.6293: raw 0 would give n < 0, a missing one must contribute exactly 0.
    full = {name: d.max for name, d in DIMENSIONS.items()}
    del full["temporal_flickering"]
    with pytest.warns(UserWarning, match="temporal_flickering"):
        result = aggregate(full)
    assert result.quality == pytest.approx(100 * 5.5 / 6.5)
    assert result.semantic == pytest.approx(100)


def test_parse_vbench_files(tmp_path):
    a = _write(tmp_path / "rf_quality_eval_results.json", {
        "subject_consistency": _entry(0.9), "dynamic_degree": _entry(0.6), "imaging_quality": _entry(70.0)})
    b = _write(tmp_path / "rf_semantic_eval_results.json", {
        "scene": _entry(0.4111), "appearance_style": _entry(0.1432), "aesthetic_quality": _entry(0.55)})
    scores = load_results([a, b])
    assert scores == pytest.approx({"subject_consistency": 0.9, "dynamic_degree": 0.6, "imaging_quality": 0.7,
                                    "scene": 0.4111, "appearance_style": 0.1432, "aesthetic_quality": 0.55})


@pytest.mark.parametrize("value, expected", [(0.0, 0.0), (1.0, 1.0), (0.6512, 0.6512), (65.12, 0.6512), (100, 1.0)])
def test_percent_scale_for_aesthetic_and_imaging(value, expected):
    for name in ("aesthetic_quality", "imaging_quality"):
        assert parse_results({name: [value, []]})[name] == pytest.approx(expected)


@pytest.mark.parametrize("data, match", [
    ({"subject_consistency": [95.3, []]}, r"expected a fraction in \[0, 1\]"),
    ({"imaging_quality": [101, []]}, r"percentage in \(1, 100\]"),
    ({"aesthetic_quality": [-0.1, []]}, "expected a fraction"),
    ({"color": [float("nan"), []]}, "not a finite number"),
    ({"color": [True, []]}, "not a finite number"),
    ({"color": ["0.5", []]}, "not a finite number"),
    ({"color": 0.5}, r"should be \[score, per-video results\]"),
    ({"color": []}, r"should be \[score, per-video results\]"),
    ({"colour": [0.5, []]}, "unknown VBench dimension 'colour'"),
    ({"subject consistency": [0.9, []]}, "unknown VBench dimension"),
    ([0.5], "expected a JSON object"),
])
def test_parse_refuses(data, match):
    with pytest.raises(VBenchResultsError, match=match):
        parse_results(data, "x.json")


def test_conflicting_files(tmp_path):
    a = _write(tmp_path / "a_eval_results.json", {"color": _entry(0.8)})
    b = _write(tmp_path / "b_eval_results.json", {"color": _entry(0.7)})
    same = _write(tmp_path / "c_eval_results.json", {"color": _entry(0.8)})
    assert load_results([a, same]) == {"color": 0.8}
    with pytest.raises(VBenchResultsError, match="'color' is 0.8 in .* but 0.7 in"):
        load_results([a, b])


def test_cli_table_and_json(tmp_path, capsys):
    folder = tmp_path / "vbench_out"
    folder.mkdir()
    _write(folder / "rf_eval_results.json", {name: _entry(d.max) for name, d in DIMENSIONS.items()
                                             if name != "color"})
    _write(folder / "rf_full_info.json", [{"prompt_en": "a cat"}])  # VBench's other output, not a results file
    out = tmp_path / "scores.json"
    assert run_cli(main, [str(folder), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "warning: VBench dimensions missing, counted as 0: color"
    semantic = 100 * 8 / 9
    lines = captured.out.splitlines()
    assert f"Total    {(4 * 100 + semantic) / 5:6.2f}" in lines and f"Semantic {semantic:6.2f}" in lines
    assert any(line.split()[:2] == ["color", "missing"] for line in lines)
    assert any(line.split() == ["dynamic_degree", "1.0000", "1.0000", "0.5", "Quality"] for line in lines)
    written = json.loads(out.read_text())
    assert written["missing"] == ["color"] and written["semantic"] == pytest.approx(semantic)
    assert written["dimensions"]["scene"] == {"raw": 0.8222, "normalised": pytest.approx(1.0), "weight": 1,
                                              "group": "Semantic", "missing": False}


@pytest.mark.parametrize("make_args, match", [
    (lambda p: [str(p / "absent_eval_results.json")], "does not exist"),
    (lambda p: [str(_write_text(p / "bad_eval_results.json", "{not json"))], "cannot read VBench results"),
    (lambda p: [str(_write(p / "x_eval_results.json", {"camera_motion": _entry(0.5)}))], "unknown VBench dimension"),
    (lambda p: [str(p)], "holds no \\*_eval_results.json"),
])
def test_cli_errors(tmp_path, capsys, make_args, match):
    assert run_cli(main, make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(match, err)


def _write_text(path, text):
    path.write_text(text)
    return path


def test_cli_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nothing.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: VBench results file {tmp_path / 'nothing.json'} does not exist"]
