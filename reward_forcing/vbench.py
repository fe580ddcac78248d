"""VBench score aggregation: parse VBench's `*_eval_results.json` files and compute Total/Quality/Semantic.

VBench itself stays an external step (it pins old transformers/numpy and needs CUDA + detectron2). Its
`VBench.evaluate` writes `{name}_eval_results.json`, a dict mapping each evaluated dimension name (spelled
`subject_consistency`, `aesthetic_quality`, ...) to `[score, per-video results]`; only the first element is used.

Accepted scales. VBench writes every dimension as a fraction in [0, 1] (LAION aesthetic / 10, and MUSIQ imaging
quality / 100 since VBench commit f8a6bd1, 2023-12). Leaderboards list aesthetic and imaging quality as "score/100",
so for those two only a value in (1, 100] is read as a percentage and divided by 100 (older VBench wrote the raw
MUSIQ score; leaderboards print percentages). A value <= 1 is always a fraction. Anything that fits neither scale
(negative, above 100, above 1 for the other dimensions, not a finite number) is refused, as is one dimension
given two different values by two files.

Missing dimensions contribute 0 to their group's sum (normalised n = 0, not raw 0: VBench's own
cal_final_score.py sets the raw score to 0, which makes n negative for dimensions with Min > 0) and are listed
in a warning and in `VBenchScores.missing`.
"""
import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from reward_forcing.errors import UserError

QUALITY = "Quality"
SEMANTIC = "Semantic"
# Total = (QUALITY_WEIGHT * Quality + SEMANTIC_WEIGHT * Semantic) / (sum of both).
GROUP_WEIGHTS = {QUALITY: 4, SEMANTIC: 1}
PERCENT_DIMENSIONS = ("aesthetic_quality", "imaging_quality")


class VBenchResultsError(UserError):
    """A VBench results file that is missing, unreadable, or holds unknown dimensions or out-of-range scores."""


@dataclass(frozen=True)
class Dimension:
    name: str
    min: float
    max: float
    weight: float
    group: str

    def normalise(self, score: float) -> float:
        return (score - self.min) / (self.max - self.min)


def _dims(names, lo, hi, weight, group):
    return [Dimension(name, lo, hi, weight, group) for name in names.split()]


# Aggregation table (VBench's scripts/constant.py NORMALIZE_DIC / DIM_WEIGHT).
DIMENSIONS = {d.name: d for d in (
    _dims("subject_consistency", 0.1462, 1.0, 1, QUALITY)
    + _dims("background_consistency", 0.2615, 1.0, 1, QUALITY)
    + _dims("temporal_flickering", 0.6293, 1.0, 1, QUALITY)
    + _dims("motion_smoothness", 0.706, 0.9975, 1, QUALITY)
    + _dims("dynamic_degree", 0.0, 1.0, 0.5, QUALITY)
    + _dims("aesthetic_quality imaging_quality", 0.0, 1.0, 1, QUALITY)
    + _dims("object_class multiple_objects human_action color spatial_relationship", 0.0, 1.0, 1, SEMANTIC)
    + _dims("scene", 0.0, 0.8222, 1, SEMANTIC)
    + _dims("appearance_style", 0.0009, 0.2855, 1, SEMANTIC)
    + _dims("temporal_style overall_consistency", 0.0, 0.364, 1, SEMANTIC)
)}


def group_weight_sum(group: str) -> float:
    """Denominator of a group score: 6.5 for Quality, 9 for Semantic."""
    return sum(d.weight for d in DIMENSIONS.values() if d.group == group)


def total_score(quality: float, semantic: float) -> float:
    """Total = (4 * Quality + Semantic) / 5, in the units of its inputs."""
    weighted = GROUP_WEIGHTS[QUALITY] * quality + GROUP_WEIGHTS[SEMANTIC] * semantic
    return weighted / sum(GROUP_WEIGHTS.values())


def _fraction(name: str, value, source: str) -> float:
    """The VBench score of one dimension as a fraction, after the scale rules in the module docstring."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VBenchResultsError(f"{source}: score of '{name}' is {value!r}, not a finite number")
    if 0 <= value <= 1:
        return float(value)
    if name in PERCENT_DIMENSIONS and 1 < value <= 100:
        return value / 100
    scales = "a fraction in [0, 1] or a percentage in (1, 100]" if name in PERCENT_DIMENSIONS else "a fraction in [0, 1]"
    raise VBenchResultsError(f"{source}: score of '{name}' is {value}, expected {scales}")


def parse_results(data, source: str = "results") -> dict[str, float]:
    """Scores of one parsed `*_eval_results.json` object: {dimension: fraction}."""
    if not isinstance(data, dict):
        raise VBenchResultsError(f"{source}: expected a JSON object mapping VBench dimensions to [score, per-video results]")
    scores = {}
    for name, entry in data.items():
        if name not in DIMENSIONS:
            raise VBenchResultsError(
                f"{source}: unknown VBench dimension '{name}' (expected one of: {', '.join(DIMENSIONS)})")
        if not isinstance(entry, list) or not entry:
            raise VBenchResultsError(f"{source}: '{name}' should be [score, per-video results], got {type(entry).__name__}")
        scores[name] = _fraction(name, entry[0], source)
    return scores


def load_results(paths) -> dict[str, float]:
    """Merged scores of several results files; a dimension found in two files must carry the same score."""
    scores, origin = {}, {}
    for path in map(Path, paths):
        if not path.is_file():
            raise VBenchResultsError(f"VBench results file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VBenchResultsError(f"cannot read VBench results {path}: {err}") from None
        for name, value in parse_results(data, str(path)).items():
            if name in scores and not math.isclose(scores[name], value, rel_tol=0, abs_tol=1e-12):
                raise VBenchResultsError(
                    f"'{name}' is {scores[name]} in {origin[name]} but {value} in {path}; pass only one of them")
            scores[name], origin[name] = value, path
    return scores


@dataclass
class VBenchScores:
    """Aggregated scores in percent; `normalised[name]` is n = (s - Min) / (Max - Min), 0 for a missing dimension."""
    total: float
    quality: float
    semantic: float
    raw: dict[str, float] = field(default_factory=dict)
    normalised: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        rows = {name: {"raw": self.raw.get(name), "normalised": self.normalised[name], "weight": d.weight,
                       "group": d.group, "missing": name in self.missing} for name, d in DIMENSIONS.items()}
        return {"total": self.total, "quality": self.quality, "semantic": self.semantic,
                "missing": list(self.missing), "dimensions": rows}


def aggregate(scores: dict[str, float]) -> VBenchScores:
    """Total / Quality / Semantic (percent) from {dimension: fraction}; warns listing the missing dimensions."""
    unknown = sorted(set(scores) - set(DIMENSIONS))
    if unknown:
        raise VBenchResultsError(f"unknown VBench dimension(s): {', '.join(unknown)}")
    missing = [name for name in DIMENSIONS if name not in scores]
    if missing:
        warnings.warn(f"VBench dimensions missing, counted as 0: {', '.join(missing)}", stacklevel=2)
    normalised = {name: d.normalise(scores[name]) if name in scores else 0.0 for name, d in DIMENSIONS.items()}
    group = {}
    for g in GROUP_WEIGHTS:
        weighted = sum(d.weight * normalised[name] for name, d in DIMENSIONS.items() if d.group == g)
        group[g] = 100 * weighted / group_weight_sum(g)
    return VBenchScores(total=total_score(group[QUALITY], group[SEMANTIC]), quality=group[QUALITY],
                        semantic=group[SEMANTIC], raw=dict(scores), normalised=normalised, missing=missing)


# ---- the command line: scripts/vbench_aggregate.py ----

USAGE = """Aggregate VBench `*_eval_results.json` files into the Total / Quality / Semantic scores.

    python scripts/vbench_aggregate.py RESULTS [RESULTS ...] [--json OUT]

RESULTS are files written by VBench's evaluate (`{name}_eval_results.json`), or folders holding them.
Missing dimensions count as 0 and are listed in a warning on stderr. The table's `raw` column is VBench's score
as a fraction (aesthetic/imaging quality given in percent are divided by 100, see reward_forcing/vbench.py).
"""


def result_files(arguments) -> list[Path]:
    """The files named, with each folder replaced by its `*_eval_results.json` files."""
    files = []
    for path in map(Path, arguments):
        if path.is_dir():
            found = sorted(path.glob("*_eval_results.json"))
            if not found:
                raise VBenchResultsError(f"folder {path} holds no *_eval_results.json file")
            files += found
        else:
            files.append(path)
    return files


def format_table(result) -> str:
    lines = [f"{'dimension':24s} {'raw':>8s} {'normalised':>10s} {'weight':>6s}  group"]
    for name, dim in DIMENSIONS.items():
        raw = f"{result.raw[name]:8.4f}" if name in result.raw else f"{'missing':>8s}"
        lines.append(f"{name:24s} {raw} {result.normalised[name]:10.4f} {dim.weight:6g}  {dim.group}")
    lines += ["", f"Total    {result.total:6.2f}", f"Quality  {result.quality:6.2f}", f"Semantic {result.semantic:6.2f}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="VBench *_eval_results.json files or folders holding them")
    parser.add_argument("--json", dest="json_out", help="also write the scores and the per-dimension table here")
    args = parser.parse_args(argv)

    scores = load_results(result_files(args.results))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = aggregate(scores)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(format_table(result))
    if args.json_out:
        try:
            Path(args.json_out).write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            raise VBenchResultsError(f"cannot write --json {args.json_out}: {err.strerror}") from None
    return 0
