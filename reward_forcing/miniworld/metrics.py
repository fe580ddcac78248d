"""What the miniature world's report measures, per row (a set of videos: the data, the teacher, or an arm at one
training length) from the per-video values of reward_forcing/miniworld/evaluation.py's score_videos.

A row holds one list of videos per seed. Each metric gives one number per seed (a mean over that seed's videos,
or the W1 of its speed distribution to a reference row's), summarised by reward_forcing/miniworld/stats.py: over
seeds for the arms trained once per seed, over videos (bootstrap) for a row with one seed.
"""
from dataclasses import dataclass

import numpy as np

from reward_forcing.miniworld import stats


@dataclass(frozen=True)
class Metric:
    name: str
    video_key: str          # the per-video value it reads
    reference: str | None   # None: the mean over videos; a row name: W1 of video_key to that row's videos
    meaning: str
    scale: str              # range and units

    def of(self, videos: dict, references: dict) -> float:
        """The metric of one seed's videos ({video_key: values}); references: {row: pooled values}."""
        values = np.asarray(videos[self.video_key], dtype=np.float64)
        if self.reference is None:
            return float(values.mean())
        return stats.wasserstein1(values, references[self.reference])


METRICS = (
    Metric("color_accuracy", "color_correct", None,
           "fraction of videos whose majority detected colour (over frames) is the one the prompt names", "0 to 1"),
    Metric("validity", "validity", None,
           "fraction of frames that hold one valid blob: peak response 0.5 to 1.5 x the world's amplitude and at "
           "most 0.5 of the blob's energy left after subtracting the detected blob", "0 to 1"),
    Metric("speed", "speed", None,
           "the blob's speed: norm of the least-squares velocity of its unwrapped track", "px / latent frame, "
           "0 to the world's max_speed"),
    Metric("speed_w1_data", "speed", "data",
           "Wasserstein-1 distance between the row's speed distribution and the data's", "px / latent frame, >= 0 "
           "(0: the same distribution; biased up by sampling, about 0.01 for 200 videos)"),
    Metric("speed_w1_teacher", "speed", "teacher",
           "Wasserstein-1 distance between the row's speed distribution and the teacher's", "px / latent frame, >= 0"),
    Metric("speed_w1_ar_teacher", "speed", "ar_teacher",
           "Wasserstein-1 distance between the row's speed distribution and the autoregressive teacher's (Causal "
           "Forcing, arXiv 2602.02214)", "px / latent frame, >= 0"),
    Metric("path_speed", "path_speed", None,
           "mean length of the frame-to-frame steps of the track (jitter counts as motion)", "px / latent frame"),
    Metric("straightness", "straightness", None,
           "net displacement / path length of the track (1 for a straight line or a still blob)", "0 to 1"),
    Metric("reward", "reward", None,
           "latent_motion's motion score, validity x speed / max_speed (what Re-DMD weights by, standardised)",
           "0 to 1"),
    Metric("quality", "quality", None,
           "blob_quality: cosine of each frame to the best blob template of the prompt's colour, mean over frames "
           "(reward feedback's reward)", "-1 to 1, data about 1"),
    # image-to-video rows only (stage image; reward_forcing/miniworld/evaluation.py score_continuations)
    Metric("position_jump", "position_jump", None,
           "image-to-video: torus distance between the blob detected in the given first frame and in the generated "
           "frame 1 (the world's own videos move at most max_speed)", "px, 0 to half the frame's diagonal"),
    Metric("position_kept", "position_kept", None,
           "image-to-video: fraction of videos whose position_jump is at most evaluation.JUMP_SPEEDS x the world's "
           "max_speed (the given blob continued, not placed anew)", "0 to 1"),
)
BY_NAME = {metric.name: metric for metric in METRICS}


def metric(name: str) -> Metric:
    if name not in BY_NAME:
        raise KeyError(f"unknown metric '{name}' ({', '.join(BY_NAME)})")
    return BY_NAME[name]


def pooled(row: dict, key: str) -> np.ndarray:
    """Every seed's values of `key` in a row, concatenated (a reference distribution)."""
    return np.concatenate([np.asarray(videos[key], dtype=np.float64) for videos in row["videos"]])


def references(rows: dict) -> dict:
    """{row name: pooled speeds} for every row a metric compares against (those present)."""
    wanted = {m.reference for m in METRICS if m.reference is not None}
    return {name: pooled(rows[name], "speed") for name in wanted if name in rows}


def seed_values(rows: dict, name: str, metric_name: str) -> list[float]:
    """One number per seed of row `name`."""
    chosen, refs = metric(metric_name), references(rows)
    if chosen.reference is not None and chosen.reference not in refs:
        raise KeyError(f"metric '{metric_name}' needs row '{chosen.reference}'")
    return [chosen.of(videos, refs) for videos in rows[name]["videos"]]


def estimate(rows: dict, name: str, metric_name: str) -> stats.Estimate:
    """The row's metric with its interval: over seeds, or a bootstrap over its videos for a one-seed row."""
    row = rows[name]
    if len(row["videos"]) > 1:
        return stats.over_seeds(seed_values(rows, name, metric_name))
    chosen, refs = metric(metric_name), references(rows)
    return stats.bootstrap(row["videos"][0], lambda videos: chosen.of(videos, refs))


def difference(rows: dict, a: str, b: str, metric_name: str, metric_b: str | None = None) -> stats.Estimate:
    """metric(a) - metric_b(b) (metric_b: metric_name unless given) over seeds. Against a model trained once (b has
    `trained_once`: the data, the teacher, an ODE init), each of a's seeds minus b's value; both trained once, a
    bootstrap over both rows' videos resampled independently; otherwise paired by seed, over the seeds both rows
    have."""
    metric_b = metric_b or metric_name
    if rows[a].get("trained_once") and rows[b].get("trained_once"):
        refs = references(rows)
        first, second = metric(metric_name), metric(metric_b)
        return stats.bootstrap_difference(rows[a]["videos"][0], rows[b]["videos"][0],
                                          lambda videos: first.of(videos, refs), lambda videos: second.of(videos, refs))
    left = dict(zip(rows[a]["seeds"], seed_values(rows, a, metric_name)))
    right = dict(zip(rows[b]["seeds"], seed_values(rows, b, metric_b)))
    if rows[b].get("trained_once"):
        (value,) = right.values()
        return stats.over_seeds([x - value for x in left.values()])
    common = [seed for seed in left if seed in right]
    if not common:
        raise ValueError(f"rows '{a}' (seeds {rows[a]['seeds']}) and '{b}' (seeds {rows[b]['seeds']}) share no seed")
    return stats.paired_difference([left[s] for s in common], [right[s] for s in common])
