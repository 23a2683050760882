"""Result tables from metrics.json files: one row per run, paper-ready columns."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from masquant.evaluation.metrics import benchmark_average, task_scores
from masquant.evaluation.tasks import TASKS
from masquant.reporting.paper import SIGNIFICANCE, paired_p

log = logging.getLogger(__name__)
HALF_WIDTH = "±"  # results_frame's column of a task's interval half-width: "<task> ±"
P_VALUE = "p"  # add_paired_tests' column of the paired test's p-value against the row's reference: "<task> p"


def collect_results(root: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Every finished run (metrics.json) under root, skipping any under a folder whose name starts with '.'
    (a run is written as ``.<name>.partial-*`` and renamed when complete; a crashed one stays ``.<name>.failed``).

    A metrics.json that is truncated, not UTF-8, or not a JSON object is skipped with a warning naming it
    (and appended to ``skipped``); the valid runs still make a table.
    """
    return [result for _, result in collect_result_files(root, skipped)]


def collect_result_files(root: str | Path, skipped: list[str] | None = None) -> list[tuple[Path, dict]]:
    """:func:`collect_results` with the run folder of each result."""
    root = Path(root)
    results = []
    for p in sorted(root.rglob("metrics.json")):
        if any(part.startswith(".") for part in p.relative_to(root).parent.parts):
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = f"{type(err).__name__}: {err}"
            data = None
        else:
            reason = None if isinstance(data, dict) else f"a JSON {type(data).__name__}, not an object"
        if reason is not None:
            log.warning("skipping %s: %s", p, reason)
            if skipped is not None:
                skipped.append(f"{p}: {reason}")
            continue
        results.append((p.parent, data))
    return results


def results_frame(results: list[dict]) -> pd.DataFrame:
    rows = []
    for m in results:
        row = {"model": m.get("run/model"), "method": m.get("run/method_label", m.get("run/method")), "bits": m.get("run/bits")}
        if "run/grid" in m:  # the integer grids in words (results written before it existed have none)
            row["grid"] = m["run/grid"]
        row.update({"calib": m.get("run/calib_samples"), "limit": m.get("run/eval_limit")})
        scores = task_scores(m)
        for accuracy in (True, False):  # accuracies, their average, then error rates
            for t, v in scores.items():
                if TASKS[t].higher_is_better == accuracy:
                    row[TASKS[t].label] = v
                    ci = m.get(f"eval/{t}/ci95")
                    if isinstance(ci, list) and len(ci) == 2:
                        row[f"{TASKS[t].label} {HALF_WIDTH}"] = (ci[1] - ci[0]) / 2 * TASKS[t].scale
            average = benchmark_average(m) if accuracy else None
            if average is not None:
                row["Avg"] = average
                halves = [row.get(f"{TASKS[t].label} {HALF_WIDTH}") for t in scores if TASKS[t].higher_is_better]
                if halves and all(h is not None for h in halves):  # independent tasks: in quadrature
                    row[f"Avg {HALF_WIDTH}"] = math.sqrt(sum(h * h for h in halves)) / len(halves)
        for mod in ("text", "vision", "audio"):
            v = m.get(f"fidelity/sqnr/{mod}/e2e")
            if v is not None:
                row[f"SQNR {mod} (dB)"] = v
        if "fidelity/ppl" in m:
            row["PPL"] = m["fidelity/ppl"]
        if "cmc/extra_params" in m:
            row["CMC params"] = m["cmc/extra_params"]
        rows.append(row)
    return pd.DataFrame(rows)


def add_paired_tests(df: pd.DataFrame, results: list[dict], references: list[int | None]) -> pd.DataFrame:
    """``df`` (``results_frame(results)``) with ``<task> p``: the paired test's p-value of row i against row
    ``references[i]`` on the documents both scored (None: no reference); format_markdown marks p < 0.05 with *."""
    out = df.copy()
    for t, task in TASKS.items():
        if task.label not in out.columns:
            continue
        out[f"{task.label} {P_VALUE}"] = [
            None if ref is None else paired_p([results[i]], [results[ref]], t) for i, ref in enumerate(references)]
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{int(v)}" if v.is_integer() and abs(v) >= 1000 else f"{v:.2f}"
    return str(v)


def format_markdown(df: pd.DataFrame) -> str:
    """One row per run; a ``<task> ±`` column (the half-width of the task's 95 % interval over its documents) is
    shown inside its task's cell, ``45.00 ± 9.80``, and a ``<task> p`` below 0.05 as a mark, ``45.00 ± 9.80*``."""
    cols = [c for c in df.columns if not str(c).endswith((f" {HALF_WIDTH}", f" {P_VALUE}"))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            half, p = r.get(f"{c} {HALF_WIDTH}"), r.get(f"{c} {P_VALUE}")
            text = _fmt(r[c])
            text = text if half is None or text == "-" or _fmt(half) == "-" else f"{text} ± {_fmt(half)}"
            significant = p is not None and not (isinstance(p, float) and math.isnan(p)) and p < SIGNIFICANCE
            cells.append(text + "*" if significant and text != "-" else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
