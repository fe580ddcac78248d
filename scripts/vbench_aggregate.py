"""Aggregate VBench `*_eval_results.json` files into the Total / Quality / Semantic scores.

    python scripts/vbench_aggregate.py RESULTS [RESULTS ...] [--json OUT]

RESULTS are files written by VBench's evaluate (`{name}_eval_results.json`), or folders holding them.
Missing dimensions count as 0 and are listed in a warning on stderr. The table's `raw` column is VBench's score
as a fraction (aesthetic/imaging quality given in percent are divided by 100, see reward_forcing/vbench.py).
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward_forcing.errors import run_cli  # noqa: E402
from reward_forcing.vbench import DIMENSIONS, VBenchResultsError, aggregate, load_results  # noqa: E402


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
