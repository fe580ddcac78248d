"""The miniature world's claims, each a set of checks on estimates with 95 % intervals (reward_forcing/miniworld/
metrics.py, stats.py), and their verdicts.

A check compares an estimate's interval with a threshold:
  above t    reproduced when the whole interval lies above t (low > t), not reproduced when none of it does
             (high <= t), inconclusive when the interval contains t
  below t    the mirror image: reproduced when high < t, not reproduced when low >= t
  within m   |x| < m (equal within a margin): reproduced when -m < low and high < m, not reproduced when the
             interval lies wholly outside (-m, m) (low >= m or high <= -m), inconclusive otherwise
An estimate with no interval (one seed) is inconclusive. A claim is reproduced when every check is, not reproduced
when any check is not, and inconclusive otherwise; a claim whose rows were not run is "not run".
"""
from dataclasses import dataclass

from reward_forcing.miniworld import metrics
from reward_forcing.miniworld.stats import Estimate, paired_difference

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN = "reproduced", "not reproduced", "inconclusive", "not run"

FIDELITY_MARGIN = 0.05  # colour accuracy / validity: "keeps" or "equal" fidelity means within 0.05 (absolute)
SPEED_W1_MAX = 0.03     # px / latent frame: "the same speed distribution" (W1) for the teacher and the students
TEACHER_FLOOR = 0.95    # the teacher's colour accuracy and validity
LONG_ARM = "dmd"        # the student whose long rollouts C3 reads
# C7: "keeps moving" = the image-to-video student's speed at most this much below the zero-shot one's: the tolerance
# C1 accepts on the speed distribution (a mean difference is at most the W1 distance), under 10 % of max_speed
IMAGE_SPEED_MARGIN = SPEED_W1_MAX


@dataclass(frozen=True)
class Check:
    label: str
    estimate: Estimate
    relation: str     # "above" | "below" | "within"
    threshold: float

    @property
    def verdict(self) -> str:
        low, high, t = self.estimate.low, self.estimate.high, self.threshold
        if not self.estimate.has_interval:
            return INCONCLUSIVE
        if self.relation == "above":
            return REPRODUCED if low > t else NOT_REPRODUCED if high <= t else INCONCLUSIVE
        if self.relation == "below":
            return REPRODUCED if high < t else NOT_REPRODUCED if low >= t else INCONCLUSIVE
        if self.relation == "within":
            if -t < low and high < t:
                return REPRODUCED
            return NOT_REPRODUCED if low >= t or high <= -t else INCONCLUSIVE
        raise ValueError(f"unknown relation '{self.relation}'")

    @property
    def condition(self) -> str:
        return {"above": f"> {self.threshold:g}", "below": f"< {self.threshold:g}",
                "within": f"within ±{self.threshold:g}"}[self.relation]


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str
    checks: tuple = ()
    missing: tuple = ()  # rows the claim needs that the run does not have

    @property
    def verdict(self) -> str:
        if self.missing:
            return NOT_RUN
        verdicts = [check.verdict for check in self.checks]
        if NOT_REPRODUCED in verdicts:
            return NOT_REPRODUCED
        return REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE

    def as_dict(self) -> dict:
        return {"key": self.key, "statement": self.statement, "verdict": self.verdict, "missing": list(self.missing),
                "checks": [{"label": c.label, "condition": c.condition, "verdict": c.verdict, **c.estimate.as_dict()}
                           for c in self.checks]}


class _Claims:
    """Builds checks from a run's rows and long-rollout records; a check on a missing row marks its claim not run."""

    def __init__(self, rows: dict, long: dict):
        self.rows, self.long = rows, long

    def _need(self, *names) -> list:
        return [name for name in names if name not in self.rows]

    def value(self, row, metric_name, relation, threshold) -> Check:
        return Check(f"{metric_name}({row})", metrics.estimate(self.rows, row, metric_name), relation, threshold)

    def diff(self, a, b, metric_name, relation, threshold) -> Check:
        return Check(f"{metric_name}({a}) - {metric_name}({b})", metrics.difference(self.rows, a, b, metric_name),
                     relation, threshold)

    def claim(self, key, statement, rows, build) -> Claim:
        missing = self._need(*rows)
        return Claim(key, statement, missing=tuple(missing)) if missing else Claim(key, statement, tuple(build()))

    def teacher(self) -> Claim:
        return self.claim("C0", "the teacher reproduces the data: colour accuracy and validity >= 0.95, speed W1 to "
                          f"the data <= {SPEED_W1_MAX}", ["teacher", "data"], lambda: [
                              self.value("teacher", "color_accuracy", "above", TEACHER_FLOOR),
                              self.value("teacher", "validity", "above", TEACHER_FLOOR),
                              self.value("teacher", "speed_w1_data", "below", SPEED_W1_MAX)])

    def keeps_teacher(self, updates: int) -> Claim:
        row = f"dmd@{updates}"
        return self.claim(f"C1@{updates}", f"a 4-step DMD student ({updates} generator updates) keeps the teacher's "
                          f"colour accuracy and validity (within {FIDELITY_MARGIN}) and its speed distribution "
                          f"(W1 to the teacher < {SPEED_W1_MAX})", [row, "teacher"], lambda: [
                              self.diff(row, "teacher", "color_accuracy", "above", -FIDELITY_MARGIN),
                              self.diff(row, "teacher", "validity", "above", -FIDELITY_MARGIN),
                              self.value(row, "speed_w1_teacher", "below", SPEED_W1_MAX)])

    def faster(self, key, arm, label, updates) -> Claim:
        a, b = f"{arm}@{updates}", f"dmd@{updates}"
        return self.claim(f"{key}@{updates}", f"{label} raises speed over DMD at equal colour accuracy and validity "
                          f"(within {FIDELITY_MARGIN}), {updates} generator updates", [a, b], lambda: [
                              self.diff(a, b, "speed", "above", 0.0),
                              self.diff(a, b, "color_accuracy", "within", FIDELITY_MARGIN),
                              self.diff(a, b, "validity", "within", FIDELITY_MARGIN)])

    def sink(self) -> Claim:
        records = self.long.get(LONG_ARM, {})
        if not {"static", "ema"} <= set(records):
            return Claim("C3", "EMA-Sink lowers first-chunk similarity against a static sink at equal validity",
                         missing=(f"long {LONG_ARM} static / ema",))
        ema, static = records["ema"], records["static"]
        frames = len(ema["curves"]["validity"][0])

        def tail_diff(curve, relation, threshold):
            estimate = paired_difference(ema["tail"][curve], static["tail"][curve])
            return Check(f"{curve}(ema) - {curve}(static), last third", estimate, relation, threshold)

        return Claim("C3", f"EMA-Sink lowers first-chunk similarity against a static sink at equal validity (within "
                     f"{FIDELITY_MARGIN}), {LONG_ARM} students, {frames}-frame rollouts", (
                         tail_diff("first_chunk_similarity", "below", 0.0),
                         tail_diff("validity", "within", FIDELITY_MARGIN)))

    def last_frame(self) -> Claim:
        a, b = _final(self.rows, "rf_last"), _final(self.rows, "rf_random")
        return self.claim("C4", "reward-only fine-tuning on the last frame keeps motion better than on a random frame "
                          "(higher speed)", [a, b], lambda: [self.diff(a, b, "speed", "above", 0.0)])

    def image_to_video(self) -> Claim:
        trained = _final(self.rows, "image:dmd_ff")
        zero_shot = "image:dmd@" + trained.partition("@")[2] if trained else "image:dmd"
        return self.claim("C7", "the DMD student trained from a clean first frame half the time (first_frame_prob "
                          "0.5) continues a given first frame better than the zero-shot DMD student: a smaller "
                          f"position jump at equal colour accuracy (within {FIDELITY_MARGIN}), still moving (speed "
                          f"at most {IMAGE_SPEED_MARGIN} lower)", [trained or "image:dmd_ff", zero_shot], lambda: [
                              self.diff(trained, zero_shot, "position_jump", "below", 0.0),
                              self.diff(trained, zero_shot, "color_accuracy", "within", FIDELITY_MARGIN),
                              self.diff(trained, zero_shot, "speed", "above", -IMAGE_SPEED_MARGIN)])

    def cache_grad(self) -> Claim:
        detached = _final(self.rows, "dmd_detached")
        straight = "dmd@" + detached.partition("@")[2]
        return self.claim("C5", "the straight-through rollout gradient (upstream's, which trained the released "
                          "weights) trains a more valid DMD student than the detached one (Self Forcing's "
                          "Algorithm 1)", [straight, detached or "dmd_detached"], lambda: [
                              self.diff(straight, detached, "validity", "above", 0.0)])

    def causal_init(self) -> Claim:
        """C6a: each ODE init's speed W1 to its own teacher, both trained once (a bootstrap over both rows' videos)."""
        rows = ["cf_ode_init", "ode_init", "ar_teacher", "teacher"]
        return self.claim("C6a", "the causal ODE init keeps the autoregressive teacher's motion better than the "
                          "bidirectional ODE init keeps the bidirectional teacher's (lower speed W1 to its own "
                          "teacher; Causal Forcing, arXiv 2602.02214 §3)", rows, lambda: [
                              Check("speed_w1_ar_teacher(cf_ode_init) - speed_w1_teacher(ode_init)",
                                    metrics.difference(self.rows, "cf_ode_init", "ode_init", "speed_w1_ar_teacher",
                                                       "speed_w1_teacher"), "below", 0.0)])


def _final(rows: dict, arm: str) -> str:
    """The row of `arm` with the most generator updates ('' when the arm has none)."""
    points = [name for name in rows if name.split("@")[0] == arm and "@" in name]
    return max(points, key=lambda name: int(name.split("@")[1]), default="")


def evaluate_claims(rows: dict, long: dict, updates: list[int]) -> list[Claim]:
    """Every claim on a run's rows ({name: {"seeds", "videos"}}) and long-rollout records; `updates`: the two
    training lengths C1 / C2 / C6b are read at."""
    claims = _Claims(rows, long)
    out = [claims.teacher()]
    out += [claims.keeps_teacher(n) for n in updates]
    out += [claims.faster("C2", "re_dmd", "Re-DMD (the paper's w, reward.weight_norm none)", n) for n in updates]
    out += [claims.faster("C2b", "re_dmd_bm", "Re-DMD with reward.weight_norm batch_mean", n) for n in updates]
    out += [claims.sink(), claims.last_frame(), claims.cache_grad()]
    out += [claims.causal_init()]
    out += [claims.faster("C6b", "cf_dmd", "DMD from the causal ODE init (Causal Forcing)", n) for n in updates]
    out += [claims.image_to_video()]
    return out

