"""Result tables from metrics.json files: one row per run, paper-ready columns."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

# each task's headline metric names, tried in order: OCRBench's ``hit_rate`` (hits / documents scored) is
# written since lmms-eval's own ``ocrbench_accuracy`` (hits / 1000) is kept; older results carry the hit
# rate under ``ocrbench_accuracy``.
log = logging.getLogger(__name__)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "textvqa_val": ("exact_match",),
    "vizwiz_vqa_val": ("exact_match",),
    "scienceqa_img": ("exact_match",),
    "ocrbench": ("hit_rate", "ocrbench_accuracy"),
    "mmmu_val": ("mmmu_acc",),
}
SHORT = {"textvqa_val": "TextVQA", "vizwiz_vqa_val": "VizWiz", "scienceqa_img": "SQA", "ocrbench": "OCRBench", "mmmu_val": "MMMU"}
# Omni tasks whose lmms-eval metric is already a percentage: OmniBench's accuracy (in the average) and the
# speech error rates (lower is better; never averaged with accuracies).
PERCENT_TASKS: dict[str, tuple[str, str]] = {"omni_bench": ("accuracy", "OmniBench")}
ERROR_RATE_TASKS: dict[str, tuple[str, str]] = {"librispeech_test_other": ("wer", "WER LS-other"),
                                                "wenet_speech_test_net": ("mer", "MER Wenet-net")}


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


def metric_value(m: dict, keys: Sequence[str]) -> float | None:
    """The first of ``keys`` that ``m`` has: the key itself (unfiltered), else its first filtered variant
    ``key/<filter>``."""
    for key in keys:
        if key in m:
            return m[key]
        filtered = next((v for k, v in m.items() if k.startswith(key + "/")), None)
        if filtered is not None:
            return filtered
    return None


def _task_score(m: dict, task: str) -> float | None:
    """The task's headline metric (see :data:`TASK_METRICS`)."""
    return metric_value(m, [f"eval/{task}/{metric}" for metric in TASK_METRICS[task]])


def results_frame(results: list[dict]) -> pd.DataFrame:
    rows = []
    for m in results:
        row = {"model": m.get("run/model"), "method": m.get("run/method_label", m.get("run/method")), "bits": m.get("run/bits"),
               "calib": m.get("run/calib_samples"), "limit": m.get("run/eval_limit")}
        scores = []
        for task, short in SHORT.items():
            v = _task_score(m, task)
            if v is not None:
                row[short] = 100 * v
                scores.append(100 * v)
        for task, (metric, short) in PERCENT_TASKS.items():
            v = metric_value(m, [f"eval/{task}/{metric}"])
            if v is not None:
                row[short] = v
                scores.append(v)
        if scores:
            row["Avg"] = sum(scores) / len(scores)
        for task, (metric, short) in ERROR_RATE_TASKS.items():
            v = metric_value(m, [f"eval/{task}/{metric}"])
            if v is not None:
                row[short] = v
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


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{int(v)}" if v.is_integer() and abs(v) >= 1000 else f"{v:.2f}"
    return str(v)


def format_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)
