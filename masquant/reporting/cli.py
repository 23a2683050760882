"""Collect finished runs into one table.

    python -m masquant.reporting [outputs/runs] [--format md|csv|latex]            one row per run
    python -m masquant.reporting outputs/runs --paper table1                      the paper's layout, its numbers, deltas
    python -m masquant.reporting outputs/runs --paper ablation --pivot epochs     rows = the values of a label option
    python -m masquant.reporting outputs/runs --paper table1 --compared-with mbq    the paired tests against MBQ's rows
    python -m masquant.reporting outputs/runs --paper table1 --reference-model Qwen2.5-VL-3B --reference-ignore lr
                                                  the testbed's rows beside a paper model's numbers (a stand-in)
    python -m masquant.reporting --stale [outputs/runs]        results made by another commit or results format
    ... --out tables/table1.md                                                 written atomically instead of printed
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from masquant.reporting.paper import (LAYOUTS, PaperTable, StandIn, ablated_methods, ablation_table,
                                      format_paper_csv, format_paper_latex, format_paper_markdown, option_values,
                                      parse_method_label,
                                      paper_table)
from masquant.reporting.table import collect_result_files, collect_results, format_markdown, results_frame

FORMATS = ("md", "csv", "latex")
log = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def method_defaults(method_ids: set[str]) -> dict[str, dict[str, str]]:
    """Each method's option values at its defaults, from its config class in the registry (what a label omits)."""
    from masquant.methods.registry import get_config_class

    defaults = {}
    for method_id in sorted(method_ids):
        try:
            defaults[method_id] = option_values(get_config_class(method_id)())
        except (KeyError, ImportError, TypeError) as err:
            log.warning("no defaults for method %s (%s): options its labels omit show as 'default'", method_id, err)
    return defaults


def format_run_table(results: list[dict], fmt: str) -> str:
    """One row per run, by model, bits, then method in registered order (label within a method)."""
    from masquant.methods.registry import method_order

    df = results_frame(results)
    rank = df["method"].map(lambda label: method_order(parse_method_label(str(label))[0])[0])
    df = df.assign(_rank=rank).sort_values(["model", "bits", "_rank", "method"], kind="stable").drop(columns="_rank")
    if fmt == "md":
        return format_markdown(df) + "\n"
    if fmt == "csv":
        return df.to_csv(index=False, float_format="%.2f")
    return df.to_latex(index=False, float_format="%.1f", na_rep="-")


def format_paper(table: PaperTable, fmt: str) -> str:
    formatter = {"md": format_paper_markdown, "csv": format_paper_csv, "latex": format_paper_latex}[fmt]
    return formatter(table).rstrip("\n") + "\n"


def stale_report(root: Path) -> int:
    """Print the results under ``root`` that this checkout would not make (another commit or results format, or
    no provenance), one per line with why; 0 whether or not there are any."""
    from masquant.runs.provenance import git_state, stale_reasons
    from masquant.runs.store import RESULTS_FORMAT

    git = git_state()
    results = collect_result_files(root)
    stale = [(folder, reasons) for folder, result in results
             if (reasons := stale_reasons(result, str(git["commit"])))]
    dirty = " (dirty)" if git["dirty"] is True else ""
    print(f"{len(stale)} of {len(results)} results under {root} are stale (this checkout: commit "
          f"{str(git['commit'])[:12]}{dirty}, results format {RESULTS_FORMAT})")
    for folder, reasons in stale:
        print(f"  {folder}: {'; '.join(reasons)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="outputs/runs", help="folder searched for metrics.json")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("--model", help="keep only this model name (run/model)")
    parser.add_argument("--method", help="keep only this method id (run/method)")
    parser.add_argument("--paper", choices=sorted(LAYOUTS),
                        help="a table in the paper's layout with its published numbers and the deltas")
    parser.add_argument("--pivot", help="ablation: option(s) of the method label whose values are the rows, comma-"
                                        "separated, e.g. cmc.rank_ratio or uniform,learn (implies --paper ablation)")
    parser.add_argument("--out", type=Path, help="write the table to this file (atomically) instead of printing it")
    parser.add_argument("--reference-model", help="show this paper model's published numbers (e.g. Qwen2.5-VL-3B) "
                                                  "beside runs of a model the paper lacks (the testbed)")
    parser.add_argument("--reference-ignore", default="", help="with --reference-model: label options, comma-"
                                                                "separated, that do not block the comparison (lr)")
    parser.add_argument("--compared-with", default="rtn", help="table1/table2: the method label of the row every "
                        "row of the same bits is compared with by the paired tests (default rtn), e.g. mbq")
    parser.add_argument("--stale", action="store_true", help="list the results made by another commit or another "
                                                             "results format (or with no provenance) and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pivot = [p.strip() for p in args.pivot.split(",") if p.strip()] if args.pivot else []
    paper = args.paper or ("ablation" if pivot else None)
    if paper == "ablation" and not pivot:
        parser.error("--paper ablation needs --pivot OPTION")
    if pivot and paper != "ablation":
        parser.error(f"--pivot makes an ablation table, not --paper {paper}")

    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {args.root} does not exist or is not a folder (give the output root's runs/ folder, "
              f"e.g. outputs/runs)", file=sys.stderr)
        return 2
    skipped: list[str] = []
    if args.stale:
        return stale_report(root)
    results = collect_results(root, skipped)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable result file(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
    if args.model:
        results = [r for r in results if r.get("run/model") == args.model]
    if args.method:
        results = [r for r in results if r.get("run/method") == args.method]
    if not results:
        print(f"no finished runs (metrics.json) under {args.root}" + (" matching the filters" if args.model or args.method
              else ""), file=sys.stderr)
        return 1
    models = {str(r.get("run/model")): args.reference_model for r in results} if args.reference_model else {}
    stand_in = StandIn(models, tuple(o.strip() for o in args.reference_ignore.split(",") if o.strip()))
    if paper is None:
        text = format_run_table(results, args.format)
    elif paper == "ablation":
        try:
            methods = {args.method} if args.method else ablated_methods(results, pivot)
            table = ablation_table(results, pivot, method_defaults(methods), method=args.method, stand_in=stand_in)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        text = format_paper(table, args.format)
    else:
        text = format_paper(paper_table(results, LAYOUTS[paper], stand_in=stand_in, compared_with=args.compared_with),
                            args.format)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
