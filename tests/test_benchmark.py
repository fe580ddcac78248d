"""The streaming benchmark (reward_forcing/benchmarks/streaming.py, run by scripts/benchmark.py) stays runnable:
the FPS harness's JSON, the real-size random-weights mode, the EMA/static latency report (DiT calls counted
through the shared StreamingGenerator)."""
import json
from pathlib import Path

import pytest

from reward_forcing.benchmarks import streaming

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"dit_fps", "e2e_fps", "ttff_s", "chunk_p50_s", "chunk_p99_s", "peak_memory_mb", "compiled_graphs",
        "recompiles", "env", "aten_ops_per_chunk", "copy_ops_per_chunk"}


def test_latency_report_counts_five_forwards_per_chunk(capsys):
    result = streaming.main(["--ema_vs_static", "--chunks", "5", "--repeats", "1", "--dim", "32", "--ffn_dim",
                                 "64", "--num_heads", "2", "--num_layers", "1", "--text_len", "4", "--height", "16",
                                 "--width", "32", "--device", "cpu"])
    assert result["forwards_per_chunk"] == [5]
    out = capsys.readouterr().out
    assert "last/early:" in out and "EMA/static:" in out and "DiT forwards per chunk: [5]" in out


def test_random_weights_build_the_released_1p3b_student_and_stream_a_chunk(tmp_path, capsys):
    """configs/reward_forcing.yaml at a reduced size: the 1.3B architecture (1,418,996,800 parameters, as published
    for Wan2.1-T2V-1.3B) streams a chunk (DiT only: the decoders are covered by the small harness test below)."""
    out = tmp_path / "out.json"
    result = streaming.main(["--config", str(ROOT / "configs" / "reward_forcing.yaml"), "--random_weights",
                                 "--chunks", "1", "--dit_only", "--device", "cpu", "--json", str(out),
                                 "checkpoint_dir=" + str(tmp_path), "height=16", "width=16"])
    assert set(json.loads(out.read_text())) == KEYS
    env = result["env"]
    assert env["parameters"] == 1_418_996_800 and env["model"].endswith("released Wan2.1-T2V-1.3B architecture")
    assert env["size"] == "16x16 (latent 2x2)" and env["window"] == 9 and env["sink"] == 3
    assert result["dit_fps"] > 0 and result["e2e_fps"] is None
    assert result["compiled_graphs"] == 0 and result["recompiles"] == 0 and result["aten_ops_per_chunk"] > 0
    assert "expected on this device" in capsys.readouterr().out


def test_harness_reports_every_key_and_identical_overlapped_frames(tmp_path):
    """The default harness on a small model: DiT and end-to-end passes, sequential vs overlapped decoding
    (the script stops with an error if their frames differ)."""
    out = tmp_path / "out.json"
    result = streaming.main(["--compare", "--chunks", "4", "--dim", "32", "--ffn_dim", "64", "--num_heads", "2",
                                 "--num_layers", "1", "--text_len", "4", "--height", "32", "--width", "32",
                                 "--vae_base_dim", "4", "--device", "cpu", "--json", str(out)])
    assert set(json.loads(out.read_text())) == KEYS | {"sequential_vs_overlapped"}
    assert result["env"]["steady_chunks"] == 1 and result["e2e_fps"] > 0 and 0 < result["ttff_s"]
    assert result["chunk_p50_s"] <= result["chunk_p99_s"] and result["sequential_vs_overlapped"] > 0


def test_upstream_repo_that_is_not_an_upstream_checkout_is_a_one_line_error(tmp_path):
    (tmp_path / "wan").mkdir()  # a folder named like upstream's package, without its causal model
    with pytest.raises(SystemExit, match=r"^error: --upstream_repo .*: no wan/modules/causal_model\.py there "
                                         r"\(expected a checkout of https://github\.com/JaydenLyh/Reward-Forcing\)$"):
        streaming.main(["--dit_only", "--chunks", "1", "--dim", "32", "--ffn_dim", "64", "--num_heads", "2",
                            "--num_layers", "1", "--text_len", "4", "--height", "16", "--width", "16", "--device",
                            "cpu", "--upstream_repo", str(tmp_path)])
