"""scripts/benchmark.py stays runnable and counts DiT calls through the shared StreamingGenerator."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_report_counts_five_forwards_per_chunk(capsys):
    result = load_script().main(["--chunks", "5", "--repeats", "1", "--dim", "32", "--ffn_dim", "64",
                                 "--num_heads", "2", "--num_layers", "1", "--text_len", "4", "--height", "16",
                                 "--width", "32"])
    assert result["forwards_per_chunk"] == [5]
    out = capsys.readouterr().out
    assert "last/early:" in out and "EMA/static:" in out and "DiT forwards per chunk: [5]" in out
