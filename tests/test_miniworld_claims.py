"""The miniature world's interval arithmetic (reward_forcing/miniworld/stats.py), per-row metrics (metrics.py) and
claim verdicts (claims.py), on synthetic numbers with hand-computed expectations and published t-table values."""
import math

import numpy as np
import pytest

from reward_forcing.miniworld import metrics
from reward_forcing.miniworld.claims import (
    INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, REPRODUCED, Check, Claim, evaluate_claims)
from reward_forcing.miniworld.stats import (
    Estimate, bootstrap, bootstrap_difference, over_seeds, paired_difference, t_quantile, wasserstein1)


# ---- intervals ----

@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_published_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_at_large_df_is_the_normal_quantile():
    assert t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)


def test_interval_over_seeds_is_mean_plus_minus_t_sd_over_root_n():
    estimate = over_seeds([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    half = 4.302653 / math.sqrt(3)
    assert (estimate.mean, estimate.n, estimate.method) == (2.0, 3, "t over seeds")
    assert estimate.low == pytest.approx(2 - half, abs=1e-5) and estimate.high == pytest.approx(2 + half, abs=1e-5)


def test_one_seed_has_no_interval():
    estimate = over_seeds([0.5])
    assert estimate.mean == 0.5 and not estimate.has_interval and estimate.low is None


def test_paired_difference_is_the_interval_of_the_per_seed_differences():
    # differences 0.5, 1.0, 0.5: mean 2/3, sd sqrt(1/12)
    estimate = paired_difference([1.0, 2.0, 3.0], [0.5, 1.0, 2.5])
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert estimate.mean == pytest.approx(2 / 3)
    assert estimate.low == pytest.approx(2 / 3 - half, abs=1e-5) and estimate.high == pytest.approx(2 / 3 + half,
                                                                                                    abs=1e-5)
    # a shift common to every seed cancels: a constant difference has a zero-width interval
    same = paired_difference([1.0, 5.0, 9.0], [0.9, 4.9, 8.9])
    assert same.low == pytest.approx(0.1) and same.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="paired difference of 3 and 2 seeds"):
        paired_difference([1, 2, 3], [1, 2])


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    values = np.tile([0.0, 1.0], 200)  # mean 0.5, standard error 0.5 / sqrt(400) = 0.025
    estimate = bootstrap({"v": values}, lambda videos: videos["v"].mean())
    assert estimate.mean == 0.5 and estimate.method == "bootstrap over videos" and estimate.n == 400
    assert estimate.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert estimate.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    constant = bootstrap({"v": [0.3] * 10}, lambda videos: videos["v"].mean())
    assert constant.low == pytest.approx(0.3) and constant.high == pytest.approx(0.3)


def test_bootstrap_interval_is_the_basic_one_reflected_about_the_estimate():
    # the max of 0..99 is 99; a resample misses 99 with probability 0.99^100 = 0.366, so the resampled maxima have
    # q(0.975) = 99 and q(0.025) = about 95.4 ((k + 1) / 100 = 0.025^(1/100)): the basic interval [2 * 99 - 99,
    # 2 * 99 - 95.4] lies above the estimate, where a percentile one ([95.4, 99]) would lie below it
    estimate = bootstrap({"v": np.arange(100.0)}, lambda videos: videos["v"].max())
    assert estimate.mean == 99 and estimate.low == 99 and 101.5 < estimate.high < 103.5


def test_bootstrap_keeps_each_videos_values_together():
    # y = 2x for every video, so every resample's mean(y) - 2 mean(x) is 0: a zero-width interval
    x = np.linspace(0, 1, 50)
    estimate = bootstrap({"x": x, "y": 2 * x}, lambda videos: videos["y"].mean() - 2 * videos["x"].mean())
    assert abs(estimate.low) < 1e-12 and abs(estimate.high) < 1e-12


def _mean(videos):
    return videos["v"].mean()


def test_bootstrap_difference_of_constant_rows_is_their_difference():
    # degenerate distributions: every resample of either row has the same mean, so the interval is the point
    estimate = bootstrap_difference({"v": [0.7] * 5}, {"v": [0.2] * 9}, _mean, _mean)
    assert estimate.mean == pytest.approx(0.5) and estimate.n == 5 and estimate.method == "bootstrap over videos"
    assert estimate.low == pytest.approx(0.5) and estimate.high == pytest.approx(0.5)


def test_bootstrap_difference_resamples_the_two_rows_independently():
    # a = b = {0, 1}: each resampled mean is 0, 1/2, 1 with probability 1/4, 1/2, 1/4, so the difference of two
    # independent ones is -1 or +1 with probability 1/16 each (> 0.025): q(0.025) = -1, q(0.975) = 1, and the basic
    # interval about the estimate 0 is [0 - 1, 0 + 1]. Resampling both rows with the same indices would give
    # a zero-width interval.
    estimate = bootstrap_difference({"v": [0.0, 1.0]}, {"v": [0.0, 1.0]}, _mean, _mean)
    assert (estimate.mean, estimate.low, estimate.high) == (0.0, -1.0, 1.0)
    # rows of different sizes, b a constant 0.25: the estimate 0.5 - 0.25, resampled differences -0.25, 0.25, 0.75
    # with probability 1/4, 1/2, 1/4, so q(0.025) = -0.25, q(0.975) = 0.75 and the interval [0.5 - 0.75, 0.5 + 0.25]
    uneven = bootstrap_difference({"v": [0.0, 1.0]}, {"v": [0.25] * 7}, _mean, _mean)
    assert uneven.mean == pytest.approx(0.25) and uneven.n == 2
    assert uneven.low == pytest.approx(2 * 0.25 - 0.75) and uneven.high == pytest.approx(2 * 0.25 + 0.25)


def test_bootstrap_difference_of_one_video_has_no_interval():
    estimate = bootstrap_difference({"v": [0.3]}, {"v": [0.1, 0.2]}, _mean, _mean)
    assert estimate.mean == pytest.approx(0.15) and not estimate.has_interval and estimate.n == 1


def test_wasserstein1_closed_forms():
    assert wasserstein1([0.0], [1.0]) == pytest.approx(1.0)
    grid = np.linspace(0, 1, 101)
    assert wasserstein1(grid, grid + 0.25) == pytest.approx(0.25)   # a shift moves every quantile by 0.25
    assert wasserstein1([0.0, 1.0], [0.5]) == pytest.approx(0.5)    # half the mass moves 0.5 each way
    assert wasserstein1(grid, grid[::-1]) == 0


# ---- verdicts at the boundaries ----

def _check(low, high, relation, threshold=0.0):
    return Check("x", Estimate((low + high) / 2, low, high, 3, "t over seeds"), relation, threshold).verdict


@pytest.mark.parametrize("low, high, verdict", [
    (0.1, 0.3, REPRODUCED), (0.0, 0.3, INCONCLUSIVE), (-0.1, 0.2, INCONCLUSIVE), (-0.3, 0.0, NOT_REPRODUCED),
    (-0.3, -0.1, NOT_REPRODUCED)])
def test_above_zero(low, high, verdict):
    assert _check(low, high, "above") == verdict


@pytest.mark.parametrize("low, high, verdict", [
    (-0.3, -0.1, REPRODUCED), (-0.3, 0.0, INCONCLUSIVE), (-0.1, 0.2, INCONCLUSIVE), (0.0, 0.3, NOT_REPRODUCED),
    (0.1, 0.3, NOT_REPRODUCED)])
def test_below_zero(low, high, verdict):
    assert _check(low, high, "below") == verdict


@pytest.mark.parametrize("low, high, verdict", [
    (-0.04, 0.04, REPRODUCED), (-0.05, 0.04, INCONCLUSIVE), (-0.04, 0.05, INCONCLUSIVE), (0.05, 0.1, NOT_REPRODUCED),
    (-0.1, -0.05, NOT_REPRODUCED), (-0.1, 0.0, INCONCLUSIVE), (-0.1, 0.1, INCONCLUSIVE)])
def test_within_a_margin(low, high, verdict):
    assert _check(low, high, "within", 0.05) == verdict


def test_thresholds_other_than_zero():
    assert _check(0.02, 0.029, "below", 0.03) == REPRODUCED
    assert _check(0.02, 0.031, "below", 0.03) == INCONCLUSIVE
    assert _check(-0.04, 0.01, "above", -0.05) == REPRODUCED


def test_an_estimate_without_interval_is_inconclusive():
    assert Check("x", Estimate(9.0, None, None, 1, "t over seeds"), "above", 0.0).verdict == INCONCLUSIVE


def test_a_claim_combines_its_checks():
    yes, no = Check("a", Estimate(1, 0.5, 1.5, 3, "t"), "above", 0), Check("b", Estimate(-1, -2, -0.5, 3, "t"),
                                                                           "above", 0)
    maybe = Check("c", Estimate(0, -1, 1, 3, "t"), "above", 0)
    assert Claim("C", "s", (yes, yes)).verdict == REPRODUCED
    assert Claim("C", "s", (yes, maybe)).verdict == INCONCLUSIVE
    assert Claim("C", "s", (yes, maybe, no)).verdict == NOT_REPRODUCED
    assert Claim("C", "s", missing=("dmd@40",)).verdict == NOT_RUN


# ---- claims on synthetic runs ----

N = 40  # videos per seed of an arm; the data and teacher rows hold 10 N


def _videos(speed, validity=1.0, colour=1.0, spread=0.02, seed=0, n=N):
    """Videos whose speeds are spread evenly over speed +- spread (shuffled: the mean is exactly `speed`)."""
    pattern = np.linspace(-spread, spread, n)
    np.random.default_rng(seed).shuffle(pattern)
    return {"speed": (speed + pattern).tolist(), "validity": [validity] * n, "color_correct": [colour] * n,
            "path_speed": [speed] * n, "straightness": [1.0] * n, "reward": [0.5] * n, "quality": [0.9] * n}


def _row(per_seed_speeds, **kwargs):
    seeds = list(range(1, len(per_seed_speeds) + 1))
    return {"seeds": seeds, "videos": [_videos(s, seed=i, **kwargs) for i, s in enumerate(per_seed_speeds)]}


def _rows(re_dmd, dmd=(0.10, 0.12, 0.11), re_validity=1.0, dmd_spread=0.02):
    return {"data": {"seeds": [1], "trained_once": True, "videos": [_videos(0.17, spread=0.17, n=10 * N)]},
            "teacher": {"seeds": [1], "trained_once": True, "videos": [_videos(0.16, spread=0.16, n=10 * N)]},
            "dmd@40": _row(dmd, spread=dmd_spread), "re_dmd@40": _row(re_dmd, validity=re_validity)}


def _claim(claims, key):
    return next(claim for claim in claims if claim.key == key)


def test_c2_is_reproduced_when_every_seed_is_faster_at_equal_fidelity():
    claims = evaluate_claims(_rows(re_dmd=(0.13, 0.15, 0.15)), {}, [40])
    c2 = _claim(claims, "C2@40")
    assert c2.verdict == REPRODUCED
    assert c2.checks[0].estimate.mean == pytest.approx(0.1 / 3)  # paired: (0.03 + 0.03 + 0.04) / 3


def test_c2_is_not_reproduced_when_slower_or_less_valid():
    assert _claim(evaluate_claims(_rows(re_dmd=(0.07, 0.09, 0.08)), {}, [40]), "C2@40").verdict == NOT_REPRODUCED
    faster_but_broken = _rows(re_dmd=(0.13, 0.15, 0.15), re_validity=0.8)
    assert _claim(evaluate_claims(faster_but_broken, {}, [40]), "C2@40").verdict == NOT_REPRODUCED


def test_c2_is_inconclusive_when_the_difference_interval_crosses_zero():
    # differences +0.02, -0.02, +0.01: mean 0.0033, the interval spans zero
    claim = _claim(evaluate_claims(_rows(re_dmd=(0.12, 0.10, 0.12)), {}, [40]), "C2@40")
    low, high = claim.checks[0].estimate.low, claim.checks[0].estimate.high
    assert low < 0 < high and claim.verdict == INCONCLUSIVE


def test_c2_on_one_seed_is_inconclusive_and_missing_arms_are_not_run():
    rows = _rows(re_dmd=(0.2,), dmd=(0.1,))
    claims = evaluate_claims(rows, {}, [40, 160])
    assert _claim(claims, "C2@40").verdict == INCONCLUSIVE
    assert _claim(claims, "C2@160").verdict == NOT_RUN and _claim(claims, "C2b@40").verdict == NOT_RUN


def test_c1_compares_each_seed_with_the_single_teacher():
    rows = _rows(re_dmd=(0.1, 0.1, 0.1), dmd=(0.16, 0.16, 0.16), dmd_spread=0.16)
    c1 = _claim(evaluate_claims(rows, {}, [40]), "C1@40")
    # each seed's speeds spread as the teacher's (40 videos against 400): W1 about 0.01, below 0.03
    assert [check.verdict for check in c1.checks] == [REPRODUCED, REPRODUCED, REPRODUCED]
    slow = _claim(evaluate_claims(_rows(re_dmd=(0.1,) * 3, dmd=(0.05, 0.06, 0.05)), {}, [40]), "C1@40")
    assert slow.checks[2].verdict == NOT_REPRODUCED and slow.verdict == NOT_REPRODUCED


def test_c0_reads_the_teachers_videos_against_the_data():
    rows = _rows(re_dmd=(0.1,) * 3)
    assert _claim(evaluate_claims(rows, {}, [40]), "C0").verdict == REPRODUCED
    rows["teacher"] = {"seeds": [1], "trained_once": True,
                       "videos": [_videos(0.08, spread=0.08, n=10 * N)]}  # half the data's speed
    c0 = _claim(evaluate_claims(rows, {}, [40]), "C0")
    assert c0.checks[2].estimate.mean == pytest.approx(0.09, abs=0.01) and c0.verdict == NOT_REPRODUCED


def _long(ema_similarity, static_similarity, ema_validity=(0.9, 0.9, 0.9)):
    def record(similarity, validity):
        return {"seeds": [1, 2, 3], "curves": {"validity": [[v] * 9 for v in validity],
                                               "first_chunk_similarity": [[s] * 9 for s in similarity]},
                "tail": {"validity": list(validity), "first_chunk_similarity": list(similarity)}}
    return {"dmd": {"ema": record(ema_similarity, ema_validity), "static": record(static_similarity, (0.9,) * 3)}}


def test_c3_reads_the_tails_of_the_long_rollouts():
    rows = _rows(re_dmd=(0.1,) * 3)
    lower = _long((0.60, 0.62, 0.61), (0.80, 0.83, 0.81))
    assert _claim(evaluate_claims(rows, lower, [40]), "C3").verdict == REPRODUCED
    same = _long((0.80, 0.83, 0.81), (0.80, 0.83, 0.81))
    assert _claim(evaluate_claims(rows, same, [40]), "C3").verdict == NOT_REPRODUCED  # difference exactly 0
    dissolving = _long((0.60, 0.62, 0.61), (0.80, 0.83, 0.81), ema_validity=(0.5, 0.5, 0.5))
    assert _claim(evaluate_claims(rows, dissolving, [40]), "C3").verdict == NOT_REPRODUCED
    assert _claim(evaluate_claims(rows, {}, [40]), "C3").verdict == NOT_RUN


def test_differences_pair_common_seeds_and_take_a_model_trained_once_as_fixed():
    rows = _rows(re_dmd=(0.13, 0.15, 0.15))
    rows["one@40"] = {"seeds": [2], "videos": [_videos(0.5)]}
    # paired on seed 2 only: 0.5 - 0.12, one seed, no interval
    single = metrics.difference(rows, "one@40", "dmd@40", "speed")
    assert single.mean == pytest.approx(0.38) and single.n == 1 and not single.has_interval
    # against the teacher (trained once, its seed 1 is not a training seed of the arm): every seed minus 0.16
    fixed = metrics.difference(rows, "dmd@40", "teacher", "speed")
    assert fixed.n == 3 and fixed.mean == pytest.approx(0.11 - 0.16)
    rows["other@40"] = {"seeds": [5, 6], "videos": _row((0.1, 0.2))["videos"]}
    with pytest.raises(ValueError, match="share no seed"):
        metrics.difference(rows, "other@40", "dmd@40", "speed")


# ---- C6: Causal Forcing ----

def _once(speed, spread):
    return {"seeds": [1], "trained_once": True, "videos": [_videos(speed, spread=spread, n=10 * N)]}


def _causal_rows(cf_init_speed, init_speed=0.16, cf_dmd=(0.13, 0.15, 0.15), cf_validity=1.0):
    """Teachers of the same speeds spread over +-0.16; each init's speeds spread as its teacher's, shifted to
    `*_speed` (so its W1 to its teacher is the shift, up to the sampling bias)."""
    rows = _rows(re_dmd=(0.1,) * 3)
    rows.update({"ar_teacher": _once(0.16, 0.16), "ode_init": _once(init_speed, 0.16),
                 "cf_ode_init": _once(cf_init_speed, 0.16), "cf_dmd@40": _row(cf_dmd, validity=cf_validity)})
    return rows


def test_c6a_is_reproduced_when_the_causal_init_is_closer_to_its_teacher():
    # the causal init matches the AR teacher (W1 ~ 0), the bidirectional init is 0.06 slower than its teacher
    c6a = _claim(evaluate_claims(_causal_rows(cf_init_speed=0.16, init_speed=0.10), {}, [40]), "C6a")
    assert c6a.checks[0].estimate.mean == pytest.approx(-0.06, abs=0.01)
    assert c6a.checks[0].estimate.method == "bootstrap over videos" and c6a.verdict == REPRODUCED


def test_c6a_is_not_reproduced_when_the_causal_init_drifts_more():
    c6a = _claim(evaluate_claims(_causal_rows(cf_init_speed=0.08, init_speed=0.16), {}, [40]), "C6a")
    assert c6a.checks[0].estimate.mean == pytest.approx(0.08, abs=0.01) and c6a.verdict == NOT_REPRODUCED


def test_c6a_is_inconclusive_when_both_inits_drift_alike():
    # both 0.03 from their teachers: the difference is 0 and its interval, from 400 videos a row, spans 0
    c6a = _claim(evaluate_claims(_causal_rows(cf_init_speed=0.13, init_speed=0.13), {}, [40]), "C6a")
    estimate = c6a.checks[0].estimate
    assert estimate.low < 0 < estimate.high and c6a.verdict == INCONCLUSIVE


def test_c6a_needs_both_teachers_and_both_inits():
    rows = _causal_rows(cf_init_speed=0.16)
    del rows["ar_teacher"]
    c6a = _claim(evaluate_claims(rows, {}, [40]), "C6a")
    assert c6a.verdict == NOT_RUN and c6a.missing == ("ar_teacher",)


def test_c6b_compares_dmd_from_the_causal_init_with_dmd_at_each_point():
    rows = _causal_rows(cf_init_speed=0.16)
    claims = evaluate_claims(rows, {}, [40, 160])
    assert _claim(claims, "C6b@40").verdict == REPRODUCED   # every seed faster, same fidelity
    assert _claim(claims, "C6b@160").verdict == NOT_RUN
    slower = _claim(evaluate_claims(_causal_rows(0.16, cf_dmd=(0.07, 0.09, 0.08)), {}, [40]), "C6b@40")
    assert slower.verdict == NOT_REPRODUCED
    broken = _claim(evaluate_claims(_causal_rows(0.16, cf_validity=0.8), {}, [40]), "C6b@40")
    assert broken.verdict == NOT_REPRODUCED
    mixed = _claim(evaluate_claims(_causal_rows(0.16, cf_dmd=(0.12, 0.10, 0.12)), {}, [40]), "C6b@40")
    assert mixed.verdict == INCONCLUSIVE
# ---- C7: image-to-video ----

def _image_row(jumps, speed=0.15, colour=1.0):
    """An image-to-video row: per seed, every video jumps jumps[seed] px from the given frame and moves at `speed`."""
    return {"seeds": list(range(1, len(jumps) + 1)),
            "videos": [_videos(speed, colour=colour, seed=i) | {"position_jump": [jump] * N,
                                                                 "position_kept": [float(jump <= 0.7)] * N}
                       for i, jump in enumerate(jumps)]}


def _c7(trained, zero_shot=(2.0, 2.5, 2.2), updates=160, **kwargs):
    rows = _rows(re_dmd=(0.1,) * 3) | {f"image:dmd_ff@{updates}": _image_row(trained, **kwargs),
                                       "image:dmd@160": _image_row(zero_shot)}
    return _claim(evaluate_claims(rows, {}, [40]), "C7")


def test_c7_is_reproduced_when_the_given_frame_is_kept_at_equal_colour_and_speed():
    claim = _c7((0.3, 0.4, 0.35))
    assert claim.verdict == REPRODUCED
    assert claim.checks[0].estimate.mean == pytest.approx((-1.7 - 2.1 - 1.85) / 3)  # paired by seed
    # 0.02 px / latent frame slower is within IMAGE_SPEED_MARGIN (0.03): still moving
    assert _c7((0.3, 0.4, 0.35), speed=0.13).verdict == REPRODUCED


def test_c7_is_not_reproduced_at_an_equal_jump_another_colour_or_a_stalled_blob():
    assert _c7((2.0, 2.5, 2.2)).verdict == NOT_REPRODUCED  # difference exactly 0: not below 0
    assert _c7((0.3, 0.4, 0.35), colour=0.9).verdict == NOT_REPRODUCED  # colour accuracy 0.1 lower
    stalled = _c7((0.3, 0.4, 0.35), speed=0.05)  # 0.1 slower: the given blob kept by not moving it
    assert [c.verdict for c in stalled.checks] == [REPRODUCED, REPRODUCED, NOT_REPRODUCED]
    assert stalled.verdict == NOT_REPRODUCED


def test_c7_is_inconclusive_when_the_jump_difference_crosses_zero_or_on_one_seed():
    crossing = _c7((1.5, 2.8, 1.8))  # differences -0.5, +0.3, -0.4
    low, high = crossing.checks[0].estimate.low, crossing.checks[0].estimate.high
    assert low < 0 < high and crossing.verdict == INCONCLUSIVE
    assert _c7((0.3,), zero_shot=(2.0,)).verdict == INCONCLUSIVE


def test_c7_needs_both_students_at_the_same_update_point():
    assert _c7((0.3, 0.4, 0.35), updates=40).missing == ("image:dmd@40",)
    assert _claim(evaluate_claims(_rows(re_dmd=(0.1,) * 3), {}, [40]), "C7").verdict == NOT_RUN
