"""The metric keys a run writes, in one place: their grammar (the patterns below), reading a task's headline
value, and the benchmark average.

    eval/<task>/<metric>[/<filter>]                 a benchmark score, as lmms-eval names it
    fidelity/sqnr/<all|modality>/<e2e|layer_<i>>    SQNR vs the FP model on held-out prompts (dB)
    fidelity/ppl, fidelity/ppl_fp, fidelity/ppl_delta
    time/<stage>_s, memory/peak_mb, memory/peak_after_<stage>_mb
    <method>/<name>[/layer_<i>]                     what a method reports (masquant.engine.engine.report_key)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

SQNR_KEY = re.compile(r"^fidelity/sqnr/(?P<modality>\w+)/(?P<where>e2e|layer_(?P<layer>\d+))$")
EVAL_KEY = re.compile(r"^eval/(?P<task>[^/]+)/(?P<metric>.+)$")
PPL_KEYS = ("fidelity/ppl", "fidelity/ppl_fp", "fidelity/ppl_delta")
AVERAGE = "eval/avg"  # the mean of the accuracy-type headline scores (the tables' Avg), in percent
LOWER_IS_BETTER = re.compile(r"(^fidelity/ppl|/wer$|/mer$|^time/|^memory/)")


def metric_value(m: Mapping, keys: Sequence[str]) -> float | None:
    """The first of ``keys`` that ``m`` has: the key itself (unfiltered), else its first filtered variant
    ``key/<filter>``."""
    for key in keys:
        if key in m:
            return m[key]
        filtered = next((v for k, v in m.items() if k.startswith(key + "/")), None)
        if filtered is not None:
            return filtered
    return None


def task_scores(m: Mapping) -> dict[str, float]:
    """{task: headline value in the tables' unit (percent)} of every registered task the result has."""
    from masquant.evaluation.tasks import TASKS

    out = {}
    for name, task in TASKS.items():
        v = metric_value(m, task.metric_keys)
        if v is not None:
            out[name] = task.scale * float(v)
    return out


def benchmark_average(m: Mapping) -> float | None:
    """The mean of the accuracy-type headline scores the result has, in percent (error rates are left out), or
    None when it has none."""
    from masquant.evaluation.tasks import TASKS

    scores = [v for t, v in task_scores(m).items() if TASKS[t].higher_is_better]
    return sum(scores) / len(scores) if scores else None
