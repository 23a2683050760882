"""Collect finished runs into one table: ``python -m masquant.report [outputs/runs] [--format md|csv|latex]``."""

from __future__ import annotations

import argparse
import sys

from masquant.reporting.table import collect_results, format_markdown, results_frame

FORMATS = ("md", "csv", "latex")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", nargs="?", default="outputs/runs", help="folder searched for metrics.json")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("--model", help="keep only this model name")
    args = parser.parse_args(argv)
    results = collect_results(args.root)
    if args.model:
        results = [r for r in results if r.get("run/model") == args.model]
    if not results:
        print(f"no finished runs (metrics.json) under {args.root}", file=sys.stderr)
        return 1
    df = results_frame(results).sort_values(["model", "bits", "method"], kind="stable")
    if args.format == "md":
        print(format_markdown(df))
    elif args.format == "csv":
        print(df.to_csv(index=False, float_format="%.2f"), end="")
    else:
        print(df.to_latex(index=False, float_format="%.1f", na_rep="-"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
