"""`reward_input`: VideoAlign as trained (`native`) and the input of the run behind the released weights
(`upstream`: 255 * x of [-1, 1] pixels read as [0, 255], all frames, sample 0 weights the batch), on the tiny
VideoReward (reward_forcing/testing/videoreward.py)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.rewards import qwen_video
from reward_forcing.models.decoder import IdentityDecoder
from reward_forcing.rewards.videoalign import VideoReward
from reward_forcing.rewards.videoalign_scorer import VideoAlignReward
from reward_forcing.testing.videoreward import write_tiny_videoreward
from reward_forcing.training.losses import re_dmd_loss, reward_weight

ROOT = Path(__file__).parents[1]
FRAMES, H, W = 9, 56, 112  # an odd frame count (padded to even); 56 x 112 is the tiny budget, so no resize


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tiny = write_tiny_videoreward(tmp_path_factory.mktemp("videoreward"))
    return VideoReward.from_checkpoint(tiny["root"], tiny["qwen_dir"], verify_template=False)


def _videos(seed, batch=2):
    return torch.rand(batch, 3, FRAMES, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _scorer(model, reward_input):
    return VideoAlignReward(model, IdentityDecoder(), fps=16.0, reward_input=reward_input)


def _seen(model, monkeypatch, scorer, videos, prompts):
    """The inputs the reward model receives, and the scores."""
    calls, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda **inputs: (calls.append(inputs), forward(**inputs))[1])
    scores = scorer.score(videos, prompts)
    monkeypatch.undo()
    return calls, scores


def test_upstream_input_is_255x_of_every_frame_of_sample_0(model, monkeypatch):
    videos = _videos(0)
    calls, _ = _seen(model, monkeypatch, _scorer(model, "upstream"), videos, ["a cat", "a dog"])
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 1  # sample 0 only
    # 255 x read as [0, 255], then VideoAlign's (v / 255 - mean) / std: (x - mean) / std, x in [-1, 1] unclamped,
    # all 9 frames (the last repeated to an even 10)
    spec = model.spec
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.image_mean, spec.image_std))
    frames = videos[0].transpose(0, 1)
    expected, grid = qwen_video.patchify((frames - mean) / std, spec)
    assert grid == (5, H // 14, W // 14)
    torch.testing.assert_close(calls[0]["pixel_values_videos"], expected, rtol=1e-5, atol=1e-5)
    # native: every sample, [0, 255] on uint8 levels, VideoAlign's 2 fps (4 of the 9 frames at 16 fps)
    calls, _ = _seen(model, monkeypatch, _scorer(model, "native"), videos, ["a cat", "a dog"])
    assert calls[0]["input_ids"].shape[0] == 2 and calls[0]["video_grid_thw"][:, 0].tolist() == [2, 2]


def test_upstream_weights_the_batch_with_sample_0s_reward(model):
    beta, prompts = 2.0, ["a cat walks on grass", "waves on a beach"]
    upstream, native = _scorer(model, "upstream"), _scorer(model, "native")
    one = upstream.score(_videos(1, batch=1), prompts[:1])["MQ_norm"]
    both = upstream.score(_videos(1), prompts)["MQ_norm"]
    other = upstream.score(torch.cat([_videos(1)[:1], _videos(2)[1:]]), [prompts[0], "a red car at night"])["MQ_norm"]
    assert both.tolist() == [one.item()] * 2 == other.tolist()  # sample 1 and its prompt play no part
    per_sample = native.score(_videos(1), prompts)["MQ_norm"]
    alone = torch.cat([native.score(_videos(1)[b:b + 1], prompts[b:b + 1])["MQ_norm"] for b in range(2)])
    torch.testing.assert_close(per_sample, alone)
    assert per_sample[0] != per_sample[1]
    # upstream's loss: 0.5 * exp(beta * MQ_norm[0]) * mse over the whole batch (model/re_dmd.py)
    x, grad = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    upstream_loss = 0.5 * torch.exp(beta * one.double()) * F.mse_loss(x.double(), (x - grad).double())
    torch.testing.assert_close(re_dmd_loss(x, grad, reward_weight(both, beta)), upstream_loss.reshape(()))


def test_unknown_reward_input_is_refused():
    with pytest.raises(ConfigError, match=r"invalid value for 'reward.input' in command-line overrides: Invalid "
                                          r"value 'raw', expected one of \[native, upstream\]"):
        load_config(ROOT / "configs" / "tiny_train.yaml", ["reward.input=raw"])
