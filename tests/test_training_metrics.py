"""metrics.jsonl rows, truncation on resume, wandb offline, and the prompt stream's keyed order."""
import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from reward_forcing.training.data import PromptStream, read_prompt_texts
from reward_forcing.training.metrics import MetricsLogger, learning_rates
from reward_forcing.video import PromptFileError


def test_rows_and_resume_truncation(tmp_path):
    logger = MetricsLogger(tmp_path, is_main=True)
    for step in (1, 2, 3):
        logger.log(step, {"critic_loss": 0.5 * step, "flag": True})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "critic_lo')  # a row cut short by a crash
    MetricsLogger(tmp_path, is_main=True, resume_step=2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(row.pop("wall_time") - time.time()) < 60 for row in rows)  # Unix seconds
    assert rows == [{"step": 1, "critic_loss": 0.5, "flag": True}, {"step": 2, "critic_loss": 1.0, "flag": True}]


def test_config_notices_and_learning_rates(tmp_path, capsys):
    config = OmegaConf.create({"max_steps": 4, "lr_generator": 2.0e-6})
    MetricsLogger(tmp_path, is_main=True, config=config)
    assert OmegaConf.load(tmp_path / "config.yaml") == config
    assert capsys.readouterr().out == ""  # a fresh run has nothing to announce
    MetricsLogger(tmp_path, is_main=True, config=config, resume_step=2)
    assert capsys.readouterr().out == f"resumed from step 2 ({tmp_path})\n"
    MetricsLogger(tmp_path / "other", is_main=False, config=config, resume_step=4)
    assert capsys.readouterr().out == "" and not (tmp_path / "other").exists()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr_generator)
    assert learning_rates(generator=optimizer) == {"lr_generator": 2.0e-6}


def test_other_ranks_write_nothing(tmp_path):
    MetricsLogger(tmp_path, is_main=False).log(1, {"critic_loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_run_keeps_its_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = MetricsLogger(tmp_path, is_main=True, wandb_mode="offline", project="rf-test")
    logger.log(1, {"critic_loss": 1.0})
    logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    MetricsLogger(tmp_path, is_main=True, wandb_mode="offline", project="rf-test", resume_step=1).close()
    assert (tmp_path / "wandb_id.txt").read_text() == run_id


def test_prompt_stream_reshuffles_each_epoch_and_drops_nothing(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\nc\nd\n")
    prompts = read_prompt_texts(tmp_path / "p.txt")
    stream = PromptStream(prompts, seed=1, stream="critic")
    epochs = [[stream[e * 4 + i] for i in range(4)] for e in range(6)]
    assert all(sorted(e) == ["a", "b", "c", "d"] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    fresh = PromptStream(prompts, seed=1, stream="critic")
    assert [fresh[p] for p in (13, 2, 21)] == [epochs[3][1], epochs[0][2], epochs[5][1]]  # random access


def test_prompt_texts_skip_blank_lines_and_refuse_missing_or_empty_files(tmp_path):
    (tmp_path / "p.txt").write_text(" a cat \n\nb\n\n")
    assert read_prompt_texts(tmp_path / "p.txt") == ["a cat", "b"]
    with pytest.raises(PromptFileError, match="prompt file not found"):
        read_prompt_texts(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(PromptFileError, match="contains no prompts"):
        read_prompt_texts(tmp_path / "e.txt")
