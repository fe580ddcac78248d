"""The pluggable Re-DMD reward: the `reward:` config section, the registry, and the Reward interface
(decode for pixel rewards, hand latents to latent rewards, no graph unless differentiable)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.distributed import DistInfo
from reward_forcing.errors import ConfigError
from reward_forcing.rewards.base import Reward
from reward_forcing.models.decoder import IdentityDecoder, load_decoder
from reward_forcing.rewards.registry import REWARDS, build_reward, check_reward

ROOT = Path(__file__).parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


class _Decoder:
    """Doubles the latents and records that it ran (a decoder whose output is known in closed form)."""

    calls = 0

    def decode(self, latents):
        self.calls += 1
        return latents * 2


class _MeanPixels(Reward):
    input = "pixels"
    keys = ("mean",)

    def score(self, videos, prompts):
        return {"mean": videos.flatten(1).mean(1)}


class _MeanLatents(_MeanPixels):
    input = "latents"


class _DifferentiableMean(_MeanPixels):
    differentiable = True


def test_pixel_reward_scores_the_decoded_clamped_video():
    latents = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 2).clone()
    decoder = _Decoder()
    scores = _MeanPixels(decoder)(latents, ["a", "b"])
    # decode doubles (0.5, 1.5), then the pixels are clamped to [-1, 1]: (0.5, 1.0)
    assert decoder.calls == 1 and scores["mean"].tolist() == [0.5, 1.0]


def test_latent_reward_reads_the_latents_without_decoding():
    latents = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1, 1)
    assert _MeanLatents()(latents, ["a", "b"])["mean"].tolist() == [0.25, 0.75]
    assert IdentityDecoder().decode(latents) is latents


def test_only_a_differentiable_reward_keeps_the_graph():
    latents = torch.ones(1, 1, 1, 1, 2, requires_grad=True)
    assert not _MeanPixels(IdentityDecoder())(latents, ["a"])["mean"].requires_grad
    score = _DifferentiableMean(IdentityDecoder())(latents, ["a"])["mean"]
    score.sum().backward()
    assert latents.grad.tolist() == [[[[[0.5, 0.5]]]]]  # d mean(x) / dx over 2 elements


def test_a_pixel_reward_needs_a_decoder():
    with pytest.raises(ValueError, match="reads pixels and needs a decoder"):
        _MeanPixels()


@pytest.mark.parametrize("override, message", [
    ("reward.name=nope", "invalid value for 'reward.name' in command-line overrides: Invalid value 'nope', expected "
                         "one of [videoalign, latent_motion, imagereward, blob_quality]"),
    ("decoder=png", "invalid value for 'decoder' in command-line overrides: Invalid value 'png', expected one of "
                    "[vae, taehv, none]"),
])
def test_an_unknown_scorer_or_decoder_is_refused_by_its_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny_train.yaml", [override])
    assert str(err.value) == message


def test_a_score_the_scorer_does_not_give_is_refused():
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", ["reward.score_key=Speed"])
    with pytest.raises(ConfigError) as err:
        check_reward(cfg.reward)
    assert str(err.value).startswith("reward.score_key 'Speed' is not a score of reward 'videoalign' (it gives: VQ, MQ")


def test_train_py_refuses_an_unknown_reward_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config_path", str(ROOT / "configs" / "tiny_train.yaml"),
           "--logdir", str(tmp_path), "reward.name=nope"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid value for 'reward.name' in command-line overrides: Invalid value 'nope', expected one of "
        f"[{', '.join(REWARDS)}]"]


def test_videoalign_reward_equals_videoreward_on_the_vae_decoded_video(tmp_path, write_training_assets):
    from reward_forcing.models.vae import WanVAE
    from reward_forcing.rewards.videoalign import VideoReward

    assets = write_training_assets(tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", [f"checkpoint_dir={assets}", "reward.placement=every_rank"])
    reward = build_reward(cfg.reward, cfg.checkpoint_dir, cfg.fps, CPU, torch.float32, load_decoder(cfg, "cpu",
                                                                                                    torch.float32))
    assert reward.input == "pixels" and not reward.differentiable
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat walks on grass", "waves on a beach"]
    scores = reward(latents, prompts)

    vae = WanVAE.from_file(assets / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth", cfg.vae)
    model = VideoReward.from_checkpoint(assets / "VideoReward", assets / "Qwen2-VL-2B-Instruct", verify_template=False)
    expected = model.score(vae.decode(latents).clamp(-1, 1), prompts, input_range="[-1,1]", fps=16.0)
    assert set(scores) == set(reward.keys) and "MQ_norm" in scores
    for key in scores:
        torch.testing.assert_close(scores[key], expected[key].float(), msg=key)
