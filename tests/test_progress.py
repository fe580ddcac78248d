"""Progress output: tqdm on a terminal, plain lines in a log file; and the README's demo prompts are not cut."""
import io
import re
import warnings
from pathlib import Path

import pytest
from tqdm import tqdm

from reward_forcing.config import load_config
from reward_forcing.progress import progress

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_one_plain_line_per_step():
    log = io.StringIO()
    bar = progress(["a", "b", "c"], "prompts", unit="prompt", file=log)
    seen = []
    for item in bar:
        seen.append(item)
        bar.set_postfix(fps=f"{len(seen)}.00")
    lines = log.getvalue().splitlines()
    assert seen == ["a", "b", "c"] and "\r" not in log.getvalue() and len(lines) == 3
    for number, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"prompts: {number}/3 prompt \(\d+\.\d s, \d+\.\d\d s/prompt\) fps={number}\.00", line)


def test_line_mode_keeps_the_last_line_whatever_the_interval_and_resumes_its_count():
    log = io.StringIO()
    assert list(progress(range(5), "train", unit="step", initial=10, total=15, min_interval_s=1e9, file=log)) == [
        0, 1, 2, 3, 4]
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["train: 11/15 step", "train: 15/15 step"]  # first and last


@pytest.mark.parametrize("enabled, nested", [(False, False), (True, True)])
def test_disabled_and_nested_loops_print_nothing_to_a_log_file(enabled, nested):
    log = io.StringIO()
    assert list(progress(iter(range(3)), "chunks", total=3, enabled=enabled, nested=nested, file=log)) == [0, 1, 2]
    assert log.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    screen = Terminal()
    bar = progress(range(4), "chunks", unit="chunk", file=screen)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2, 3]
    assert "\r" in screen.getvalue() and "4/4" in screen.getvalue()


@pytest.mark.parametrize("preset", ["tiny", "tiny_train", "tiny_ode", "tiny_reward_feedback"])
def test_the_demo_prompts_fit_the_tiny_presets_text_len(tmp_path, preset):
    """prompts/demo.txt (the README's demo and tiny_train.yaml's prompt_path) is encoded without a cut-prompt
    warning by the tiny text encoder, and the tiny DiT takes the text encoder's text_len tokens."""
    from reward_forcing.models.text_encoder import TextEncoder
    from reward_forcing.testing.assets import TINY_WAN_CONFIG, write_t5, write_tokenizer

    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    write_tokenizer(tmp_path, cfg.text_encoder.vocab_size)
    write_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", cfg.text_encoder)
    encoder = TextEncoder.from_wan_folder(tmp_path, cfg.text_encoder)
    prompts = [line for line in (REPO / "prompts" / "demo.txt").read_text().splitlines() if line.strip()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = encoder.tokenize(prompts)
    assert ids.shape == (len(prompts), cfg.text_encoder.text_len)
    assert cfg.text_encoder.text_len <= TINY_WAN_CONFIG["text_len"]
