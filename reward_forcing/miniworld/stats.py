"""Intervals for the miniature world's report (reward_forcing/miniworld/report.py) and claims (claims.py).

Two kinds of estimate, each a mean with a 95 % interval:
  over seeds     a student arm is trained once per seed; each seed gives one number (the mean of a metric over
                 its videos, or the W1 of its speed distribution), and the interval is Student's t over those
                 numbers: mean +- t(0.975, n - 1) * sd / sqrt(n). Two arms are compared by the per-seed
                 difference (paired: the same seed draws the same prompts, noise and timesteps in training and
                 the same prompts and noise in evaluation), again with a t interval over seeds.
  over videos    a model trained once (the data, the teacher, the ODE init) has only its videos: a basic (reverse
                 percentile) bootstrap over them, resampling videos with replacement: [2 x - q(0.975), 2 x - q(0.025)]
                 for the statistic x and the quantiles q of its resampled values. It covers statistics that are not
                 means (W1), and for W1, which finite samples bias upwards, it subtracts the bias the resampling
                 shows instead of adding it again (a percentile interval would lie wholly above a small W1).
  two models     a difference between two models trained once each (the causal ODE init against the bidirectional
  trained once   one): the same basic bootstrap, each draw resampling both rows' videos, independently (the two
                 models' videos share nothing to pair on).
One seed gives no interval (low = high = None): a claim on it is inconclusive.
"""
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LEVEL = 0.95
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float | None     # None: too few units for an interval
    high: float | None
    n: int                # seeds (over seeds) or videos (over videos)
    method: str           # "t over seeds" | "bootstrap over videos"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "method": self.method}

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with df degrees of freedom: 1/2 + the density's integral over [0, x] (Simpson)."""
    if x < 0:
        return 1 - t_cdf(-x, df, intervals)
    grid = np.linspace(0.0, x, intervals + 1)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid * grid / df))
    weights = np.where(np.arange(intervals + 1) % 2 == 1, 4.0, 2.0)
    weights[0] = weights[-1] = 1.0
    return 0.5 + float(np.dot(weights, density)) * x / intervals / 3


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (p in (0.5, 1)), by bisection on t_cdf."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def over_seeds(values) -> Estimate:
    """Mean and t interval of one number per seed."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, None, None, n, "t over seeds")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, "t over seeds")


def paired_difference(a, b) -> Estimate:
    """a - b from one number per seed of each arm, paired by seed (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired difference of {len(a)} and {len(b)} seeds")
    return over_seeds([x - y for x, y in zip(a, b)])


def bootstrap(videos: dict, statistic, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """statistic(videos) and its basic bootstrap interval, resampling the videos (rows of every array in `videos`,
    resampled together so a video keeps its own values)."""
    arrays, n = _arrays(videos)
    mean = float(statistic(arrays))
    if n < 2:
        return Estimate(mean, None, None, n, "bootstrap over videos")
    rng = np.random.default_rng(seed)
    values = [statistic(_resampled(arrays, rows)) for rows in rng.integers(0, n, size=(draws, n))]
    return _basic(mean, values, n)


def bootstrap_difference(videos_a: dict, videos_b: dict, statistic_a, statistic_b, draws: int = BOOTSTRAP_DRAWS,
                         seed: int = BOOTSTRAP_SEED) -> Estimate:
    """statistic_a(videos_a) - statistic_b(videos_b) and its basic bootstrap interval, each draw resampling a's videos
    and b's independently (each row's arrays together, as bootstrap does); n: the smaller row's videos."""
    (a, n_a), (b, n_b) = _arrays(videos_a), _arrays(videos_b)
    mean = float(statistic_a(a)) - float(statistic_b(b))
    if min(n_a, n_b) < 2:
        return Estimate(mean, None, None, min(n_a, n_b), "bootstrap over videos")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        rows_a, rows_b = rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b)
        values.append(statistic_a(_resampled(a, rows_a)) - statistic_b(_resampled(b, rows_b)))
    return _basic(mean, values, min(n_a, n_b))


def _arrays(videos: dict) -> tuple[dict, int]:
    """The per-video values as float64 arrays, and the number of videos."""
    arrays = {key: np.asarray(value, dtype=np.float64) for key, value in videos.items()}
    return arrays, len(next(iter(arrays.values())))


def _resampled(arrays: dict, rows) -> dict:
    return {key: array[rows] for key, array in arrays.items()}


def _basic(mean: float, values, n: int) -> Estimate:
    """The basic (reverse percentile) interval of `mean` from its resampled values."""
    low, high = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(mean, float(2 * mean - high), float(2 * mean - low), n, "bootstrap over videos")


def wasserstein1(a, b) -> float:
    """W1 between two empirical 1-D distributions: the integral of |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.sort(np.concatenate([a, b]))
    below_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    below_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(below_a - below_b) * np.diff(grid)))
