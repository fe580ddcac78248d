"""lr_schedule / lr_warmup_steps: the closed form of the factor and the one-line refusal of a negative warm-up
(an unknown schedule is refused by its type: tests/test_settings.py)."""
import math

import pytest

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.training.lr_schedule import check_lr_schedule, lr_factor


def test_cosine_factor_is_half_a_cosine_after_a_linear_warmup():
    assert [lr_factor("cosine", s, 10, 0) for s in range(10)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    assert [lr_factor("constant", s, 10, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("cosine", 3, 10, 4) == 1.0
    assert lr_factor("cosine", 7, 10, 4) == pytest.approx(0.5)  # (7 - 4) / 6 of the way down


def test_a_negative_warmup_is_refused_in_one_line():
    cfg = load_config("configs/tiny_train.yaml", ["lr_warmup_steps=-1"])
    with pytest.raises(ConfigError) as err:
        check_lr_schedule(cfg)
    assert str(err.value) == "lr_warmup_steps must be an integer >= 0; got -1"
