"""The miniature world's differentiable per-frame reward (reward: blob_quality) against closed forms, and reward
feedback (trainer: reward_feedback) scoring the latent frame `reward_frame` picks, end to end with no decoder."""
import json
import math
from pathlib import Path

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.blob_reward import BlobQualityReward
from reward_forcing.miniworld.world import World, WorldSpec
from reward_forcing.training.cli import main as train
from reward_forcing.training.frame_reward import FrameReward, choose_frames

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def world():
    return World(WorldSpec(seed=3))


def _cosine(a, b):
    return float(torch.dot(a.flatten().double(), b.flatten().double()) / (a.double().norm() * b.double().norm()))


def _video(frames):
    """[C, H, W] frames -> a one-sample video [1, C, F, H, W]."""
    return torch.stack(frames, dim=1)[None]


def test_a_clean_frame_of_the_prompt_colour_scores_one(world):
    reward = BlobQualityReward(world)
    positions = torch.tensor([[2.5, 3.0], [7.5, 0.5], [0.0, 0.0], [4.0, 6.5]])  # on the half-pixel grid
    video = world.render(2, positions)[None]
    per_frame = reward.frame_scores(video, [world.prompt(2)])
    torch.testing.assert_close(per_frame, torch.ones(1, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(video, [world.prompt(2)])["quality"], torch.ones(1), atol=1e-5, rtol=0)


def test_another_colour_scores_the_cosine_of_the_two_templates(world):
    reward = BlobQualityReward(world)
    position = torch.tensor([[3.5, 5.0]])
    blob = world.blob(position)[0]
    amplitude = world.spec.blob_amplitude
    red, blue = (amplitude * world.signatures[k][:, None, None] * blob for k in (0, 2))  # [C, H, W] templates
    assert abs(_cosine(red, blue)) < 1e-6  # orthogonal signatures: the cross term vanishes
    wrong = world.background + red
    score = float(reward(_video([wrong]), [world.prompt(2)])["quality"])
    assert score == pytest.approx(_cosine(red, blue), abs=1e-5)
    # a blend a * red + b * blue asked for blue: cos = b / sqrt(a^2 + b^2) at the blob's own position
    a, b = 0.6, 0.8
    blend = world.background + a * red + b * blue
    score = float(reward(_video([blend]), [world.prompt(2)])["quality"])
    assert score == pytest.approx(_cosine(a * red + b * blue, blue), abs=1e-5)
    assert score == pytest.approx(b / math.hypot(a, b), abs=1e-5)


def test_a_doubled_smeared_noisy_or_empty_blob_scores_lower(world):
    reward = BlobQualityReward(world)
    colour, prompt = 1, world.prompt(1)
    p, q = torch.tensor([[2.0, 2.0]]), torch.tensor([[2.0, 6.0]])  # four pixels apart on the 8-pixel torus
    signature = world.spec.blob_amplitude * world.signatures[colour][:, None, None]
    g_p, g_q = world.blob(p)[0], world.blob(q)[0]
    doubled = world.background + signature * (g_p + g_q)
    # equal-norm blobs: the best template is either blob, cos = (|g|^2 + <g_p, g_q>) / (|g| |g_p + g_q|)
    rho = _cosine(g_p, g_q)
    want = math.sqrt((1 + rho) / 2)
    smeared = world.background + signature * world.blob(p, sigma=2 * world.spec.blob_sigma)[0]
    clean = world.render(colour, p)[:, 0]
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    scores = reward.frame_scores(_video([doubled, smeared, noisy, world.background]), [prompt])[0].tolist()
    assert scores[0] == pytest.approx(want, abs=1e-5) and want < 0.75
    assert max(scores[:3]) < 1 - 1e-3 and min(scores[:3]) > 0.3
    assert scores[3] == 0  # nothing but the background


def test_gradient_matches_finite_differences():
    small = World(WorldSpec(seed=5, channels=4, height=5, width=6, colours=("red", "green", "blue")))
    reward = BlobQualityReward(small)
    gen = torch.Generator().manual_seed(1)
    frames = small.render(0, torch.tensor([[1.3, 2.2], [3.8, 4.6]])).double()  # off the grid: no tied maximum
    second = small.render(2, torch.tensor([[0.7, 5.1], [2.2, 0.4]])).double()
    video = torch.stack([frames, second]) + 0.05 * torch.randn(2, 4, 2, 5, 6, generator=gen, dtype=torch.float64)
    prompts = [small.prompt(0), small.prompt(2)]
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (reward(x, prompts)["quality"] * weights).sum(),
                                    (video.requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


def _frame_reward(world):
    cfg = load_config(ROOT / "configs" / "tiny_reward_feedback.yaml")  # its Wan VAE upsamples time 4x
    feedback = FrameReward(BlobQualityReward(world), "quality", cfg.vae)
    assert feedback.num_pixel_frames(5) == 5  # a latent reward has no decoder: its frames are the latents'
    return feedback


def _noisy_videos(world, batch, frames):
    gen = torch.Generator().manual_seed(4)
    videos = [world.sample(i, frames)["latent"] for i in range(batch)]
    prompts = [world.sample(i)["prompt"] for i in range(batch)]
    noise = 0.2 * torch.randn(batch, world.spec.channels, frames, world.spec.height, world.spec.width, generator=gen)
    return torch.stack(videos) + noise, prompts


@pytest.mark.parametrize("choice", ["last", "random"])
def test_one_chosen_latent_frame_is_scored_and_only_it_gets_gradient(world, choice):
    feedback = _frame_reward(world)
    latents, prompts = _noisy_videos(world, 6, 5)
    frames = choose_frames(choice, feedback.num_pixel_frames(5), 11, 2, list(range(6)))
    assert frames == [4] * 6 if choice == "last" else len(set(frames)) > 1
    x = latents.clone().requires_grad_(True)
    scores = feedback(x, prompts, frames)
    scores.sum().backward()
    with torch.no_grad():
        every = feedback.reward.frame_scores(latents, prompts)  # [B, F]: each frame scored alone
    torch.testing.assert_close(scores, every[torch.arange(6), frames], atol=1e-6, rtol=0)
    touched = x.grad.abs().amax(dim=(1, 3, 4)) > 0  # [B, F]
    expected = torch.zeros(6, 5, dtype=torch.bool)
    expected[torch.arange(6), frames] = True
    assert torch.equal(touched, expected)


def test_all_frames_average_and_all_get_gradient(world):
    feedback = _frame_reward(world)
    latents, prompts = _noisy_videos(world, 3, 5)
    x = latents.clone().requires_grad_(True)
    scores = feedback(x, prompts, choose_frames("all", 5, 0, 0, [0, 1, 2]))
    scores.sum().backward()
    with torch.no_grad():
        every = feedback.reward.frame_scores(latents, prompts)
    torch.testing.assert_close(scores, every.mean(dim=1), atol=1e-6, rtol=0)
    assert bool((x.grad.abs().amax(dim=(1, 3, 4)) > 0).all())


def test_reward_feedback_on_latents_trains_without_a_decoder(tmp_path):
    """train.py, trainer reward_feedback, decoder none: the checkpoint folder holds only the DiT, T5 and
    tokenizer (no VAE, no ImageReward), so any attempt to load either fails the run."""
    from reward_forcing.testing.assets import TINY_WAN_CONFIG as DIT
    from reward_forcing.testing.assets import random_wan_state_dict, write_t5, write_tokenizer, write_wan_folder

    config = ROOT / "configs" / "tiny_reward_feedback.yaml"
    cfg = load_config(config)
    base = write_wan_folder(tmp_path / "assets" / cfg.model_name, DIT, random_wan_state_dict(DIT))
    write_tokenizer(base, cfg.text_encoder.vocab_size)
    write_t5(base / "models_t5_umt5-xxl-enc-bf16.pth", cfg.text_encoder)
    hw = cfg.height // 8  # the Wan VAE's spatial stride: the student's latent frames are hw x hw
    small = World(WorldSpec(seed=2, channels=DIT["in_dim"], height=hw, width=hw))
    small.save(tmp_path / "world.json")
    (tmp_path / "prompts.txt").write_text("".join(small.prompt(k) + "\n" for k in range(3)))
    overrides = [f"checkpoint_dir={tmp_path / 'assets'}", f"prompt_path={tmp_path / 'prompts.txt'}", "seed=7",
                 "decoder=none", "generator_ckpt=null", "reward.name=blob_quality", "reward.score_key=quality",
                 f"reward.world_path={tmp_path / 'world.json'}", "max_steps=2", "batch_size=2"]
    logdir = tmp_path / "run"
    assert train(["--config_path", str(config), "--logdir", str(logdir), "--disable-wandb", "--no_save",
                       *overrides]) == 0
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert -1 <= row["reward"] <= 1 and row["loss"] == pytest.approx(-row["reward"], rel=1e-6)
    assert not any((tmp_path / "assets").rglob("*VAE*")) and not any((tmp_path / "assets").rglob("ImageReward*"))

    # a pixel reward with no decoder is refused in one line before any model loads
    with pytest.raises(ConfigError, match="reward 'imagereward' reads pixels, .* set decoder=vae"):
        train(["--config_path", str(config), "--logdir", str(tmp_path / "refused"), *overrides[:4],
              "reward.name=imagereward", "reward.score_key=ImageReward"])
