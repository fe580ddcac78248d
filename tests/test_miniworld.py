"""The miniature world (reward_forcing/miniworld): its videos, the detector that reads them back, and the
latent_motion reward, checked against the world's own drawing parameters and closed forms."""
import math

import pytest
import torch

from reward_forcing.errors import ConfigError
from reward_forcing.miniworld.detector import detect_frames, video_stats
from reward_forcing.miniworld.reward import LatentMotionReward
from reward_forcing.miniworld.world import World, WorldSpec

SPEC = WorldSpec(seed=3, channels=16, frames=12, height=8, width=8)


@pytest.fixture(scope="module")
def world():
    return World(SPEC)


@pytest.fixture(scope="module")
def samples(world):
    return [world.sample(i) for i in range(48)]


def test_colour_signatures_are_orthogonal_with_unit_rms(world):
    gram = world.signatures @ world.signatures.T
    torch.testing.assert_close(gram, SPEC.channels * torch.eye(len(SPEC.colours)), atol=1e-4, rtol=0)


def test_a_sample_is_its_index_and_moves_in_a_straight_line_on_the_torus(world):
    a, b = world.sample(5), world.sample(5)
    assert torch.equal(a["latent"], b["latent"]) and a["prompt"] == b["prompt"]
    assert a["prompt"] == f"a {SPEC.colours[a['colour']]} ball" and world.colour_of(a["prompt"]) == a["colour"]
    assert 0 <= a["speed"] <= SPEC.max_speed
    steps = world.wrap(a["positions"][1:] - a["positions"][:-1])
    expected = torch.tensor([math.sin(a["direction"]), math.cos(a["direction"])]) * a["speed"]
    torch.testing.assert_close(steps, expected.expand_as(steps).float(), atol=1e-5, rtol=0)
    assert a["latent"].shape == (SPEC.channels, SPEC.frames, SPEC.height, SPEC.width)


def test_a_blob_peaks_at_its_position_and_wraps_around_the_edges(world):
    blob = world.blob(torch.tensor([[0.0, 7.0]]))[0]
    assert blob[0, 7] == 1.0
    # one pixel away across the edges (row 7 and column 0 are neighbours of row 0 and column 7)
    assert blob[7, 7] == pytest.approx(math.exp(-0.5)) and blob[0, 0] == pytest.approx(math.exp(-0.5))


def test_detector_reads_back_what_the_world_drew(world, samples):
    latents = torch.stack([s["latent"] for s in samples])
    frames = detect_frames(world, latents)
    truth = torch.stack([s["positions"] for s in samples])
    assert world.wrap(frames["position"] - truth).norm(dim=-1).max() < 0.05
    stats = video_stats(world, latents, [s["colour"] for s in samples])
    assert stats["color_correct"].min() == 1 and stats["validity"].min() == 1
    speeds = torch.tensor([s["speed"] for s in samples], dtype=torch.float32)
    torch.testing.assert_close(stats["speed"], speeds, atol=0.01, rtol=0)
    moving = speeds > 0.1
    assert stats["straightness"][moving].min() > 0.98


def test_noise_and_a_missing_blob_are_not_valid(world, samples):
    shape = (8, SPEC.channels, SPEC.frames, SPEC.height, SPEC.width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert video_stats(world, noise)["validity"].max() == 0
    empty = world.background[None, :, None].expand(1, -1, SPEC.frames, -1, -1)
    assert video_stats(world, empty)["validity"].max() == 0
    # the same blob twice as bright is out of the contrast range
    bright = world.background[None, :, None] + 2 * (samples[0]["latent"][None] - world.background[None, :, None])
    assert video_stats(world, bright)["validity"].max() == 0


def test_latent_motion_is_validity_times_speed_over_max_speed(world, samples):
    reward = LatentMotionReward(world)
    assert reward.input == "latents" and not reward.differentiable
    latents = torch.stack([s["latent"] for s in samples[:6]])
    still = world.render(samples[0]["colour"], samples[0]["positions"][:1].expand(SPEC.frames, 2))[None]
    scores = reward(torch.cat([latents, still]), [s["prompt"] for s in samples[:6]] + [samples[0]["prompt"]])
    speeds = torch.tensor([s["speed"] for s in samples[:6]] + [0.0])
    torch.testing.assert_close(scores["motion"], speeds.float() / SPEC.max_speed, atol=0.02, rtol=0)
    assert scores["motion"][-1] == 0 and scores["validity"].min() == 1
    # motion_norm standardises by U[0, max_speed]: (s - max / 2) / (max / sqrt(12)); a still blob sits at -sqrt(3)
    standard = (speeds.float() - SPEC.max_speed / 2) / (SPEC.max_speed / math.sqrt(12))
    torch.testing.assert_close(scores["motion_norm"], standard, atol=0.02 * math.sqrt(12), rtol=0)
    assert scores["motion_norm"][-1].item() == pytest.approx(-math.sqrt(3), abs=1e-6)


def test_motion_norm_of_the_worlds_own_data_has_mean_0_and_std_1(world):
    videos = [world.sample(i) for i in range(300)]
    scores = LatentMotionReward(world).score(torch.stack([v["latent"] for v in videos]), [v["prompt"] for v in videos])
    assert abs(scores["motion_norm"].mean().item()) < 0.2 and abs(scores["motion_norm"].std().item() - 1) < 0.1


def test_world_spec_round_trips_and_bad_specs_are_one_line(world, tmp_path):
    world.save(tmp_path / "world.json")
    again = World.from_file(tmp_path / "world.json")
    assert again.spec == SPEC and torch.equal(again.background, world.background)
    (tmp_path / "bad.json").write_text('{"seed": 1, "colour": ["red"]}')
    with pytest.raises(ConfigError, match="unknown key"):
        World.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="at most 4 colours"):
        World(WorldSpec(channels=4))
    with pytest.raises(ConfigError, match="not a prompt of this world"):
        world.colour_of("a red cube")


def test_start_spread_confines_the_first_position_around_the_centre():
    centred = World(WorldSpec(seed=3, start_spread=0.0))
    firsts = torch.stack([centred.sample(i)["positions"][0] for i in range(20)])
    assert torch.equal(firsts, torch.tensor([[SPEC.height / 2, SPEC.width / 2]]).expand(20, 2))
    boxed = World(WorldSpec(seed=3, start_spread=0.25))
    firsts = torch.stack([boxed.sample(i)["positions"][0] for i in range(200)])
    assert ((firsts - 4).abs() <= 1).all() and (firsts - 4).abs().max() > 0.9  # a 2 x 2 pixel box on an 8 x 8 frame


def test_speed_is_the_tracks_fitted_velocity_so_jitter_in_place_is_not_motion(world, samples):
    # a blob hopping +-0.5 px about a fixed point: path length 1 px per frame, and over frames t = 0..F-1 the
    # least-squares slope of 0.5 * (-1)^t is 0.5 * sum((t - tbar) (-1)^t) / sum((t - tbar)^2) = -3 / 143 (F = 12)
    assert SPEC.frames == 12
    centre = torch.tensor([4.0, 4.0])
    hop = torch.tensor([[0.5 * (-1) ** t, 0.0] for t in range(SPEC.frames)])
    jitter = world.render(0, centre + hop)[None]
    stats = video_stats(world, jitter)
    assert stats["path_speed"].item() == pytest.approx(1.0, abs=0.02)
    assert stats["speed"].item() == pytest.approx(3 / 143, abs=0.01)
    assert LatentMotionReward(world).score(jitter, [world.prompt(0)])["motion"].item() < 0.1


def _drawn(world, colour: int, track: list) -> torch.Tensor:
    return world.render(colour, torch.tensor(track, dtype=torch.float32))


def test_position_jump_is_the_torus_distance_from_the_given_frame_to_frame_1(world):
    from reward_forcing.miniworld.evaluation import JUMP_SPEEDS, score_continuations

    # a short move in the middle (0.3, 0.4): 0.5 px; one across both edges, (0.5, 7.5) -> (7.7, 0.3): each
    # coordinate -0.8 / +0.8 the short way round, sqrt(1.28) = 1.131 px (not 7.2 straight across the frame)
    given = torch.stack([_drawn(world, 1, [[4.0, 4.0]]), _drawn(world, 2, [[0.5, 7.5]])])
    latents = torch.stack([_drawn(world, 1, [[4.0, 4.0]] + [[4.3 + 0.1 * f, 4.4] for f in range(11)]),
                           _drawn(world, 2, [[0.5, 7.5]] + [[7.7, 0.3 + 0.1 * f] for f in range(11)])])
    prompts = [world.prompt(1), world.prompt(2)]
    scores = score_continuations(world, given, latents, prompts)
    assert scores["position_jump"] == pytest.approx([0.5, math.sqrt(1.28)], abs=0.1)
    # kept at most JUMP_SPEEDS x max_speed = 1.0 px for this world: the first, not the second
    assert JUMP_SPEEDS * SPEC.max_speed == 1.0 and scores["position_kept"] == [1.0, 0.0]
    # the rest is of the generated frames 1..: both move 0.1 px a frame, in their prompt's colour
    assert scores["speed"] == pytest.approx([0.1, 0.1], abs=0.01) and scores["color_correct"] == [1.0, 1.0]


def test_given_videos_are_held_out_and_balanced_over_colours(world):
    from reward_forcing.miniworld.stages import given_videos

    indices = given_videos(world, 100, 3)
    colours = [world.sample(i)["colour"] for i in indices]
    assert min(indices) >= 100 and indices == sorted(set(indices))
    assert all(colours.count(k) == 3 for k in range(len(SPEC.colours)))
