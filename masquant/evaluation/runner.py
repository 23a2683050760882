"""Evaluate an in-memory (possibly fake-quantized) HF model on lmms-eval tasks; flat metrics with slash keys.

Traps of lmms-eval 0.7.3 handled here (docs/evaluation.md):
- each task runs in its own ``simple_evaluate`` call with freshly loaded task objects: the evaluator
  overwrites a fractional ``limit`` with the first task's document count and reuses it for the next tasks,
  and OCRBench's module-level score counter would accumulate across evaluations of reused task objects;
- a None result, a task missing from the results or zero scored documents raise :class:`EvaluationError`;
- OCRBench's aggregate divides by 1000 whatever the number of documents: ``ocrbench_accuracy`` keeps
  lmms-eval's value untouched, and ``hit_rate`` (hits / documents scored), ``hits`` and ``n`` are added
  beside it (results written before this change carry the hit rate under ``ocrbench_accuracy``);
- ``cli_args.output_path`` points lmms-eval's submission files into ``output_dir`` (not the working dir);
- per-document post-processing runs in one thread so MMMU's random fallback is reproducible.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import types
from pathlib import Path

from masquant.evaluation.tasks import EvaluationError, write_local_task_yamls

log = logging.getLogger(__name__)

# metric values that are not scores (lmms-eval's submission metrics return file paths or None)
_SKIP_METRICS = {"submission"}


@functools.lru_cache(maxsize=1)
def default_task_manager():
    """lmms-eval's TaskManager over its installed tasks (indexing ~2000 YAMLs takes ~7 s): built once, reused."""
    route_lmms_eval_logs_to_logging()
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING")


def local_task_manager(yaml_dir: Path):
    """A TaskManager that indexes only the generated include-YAMLs (milliseconds): their names win over nothing."""
    route_lmms_eval_logs_to_logging()
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(yaml_dir), include_defaults=False)


def route_lmms_eval_logs_to_logging() -> None:
    """Send lmms-eval's loguru records to the ``lmms_eval`` std-logging logger instead of its own stdout sink.

    Importing ``lmms_eval.models`` (and ``lmms_eval.llm_judge``) removes every loguru handler and adds stdout
    at WARNING; this replaces them by one sink into ``logging`` so our handlers (Hydra's log file) see the
    records. Call it after those imports; calling it again is harmless.
    """
    import lmms_eval.evaluator  # noqa: F401  (imports the modules that reconfigure loguru)
    import lmms_eval.models  # noqa: F401
    from loguru import logger

    std = logging.getLogger("lmms_eval")
    if std.level == logging.NOTSET:
        std.setLevel(logging.WARNING)

    def sink(message) -> None:
        record = message.record
        std.log(record["level"].no, "%s:%s - %s", record["name"], record["line"], record["message"])

    logger.remove()
    logger.add(sink, level="DEBUG", format="{message}")


def _root_cause(err: BaseException) -> BaseException:
    """The exception under tenacity's RetryError (lmms-eval retries dataset downloads)."""
    last_attempt = getattr(err, "last_attempt", None)
    if last_attempt is not None and last_attempt.failed:
        return _root_cause(last_attempt.exception())
    return err


def _flat_task_metrics(task: str, task_results: dict, samples: list[dict]) -> dict:
    metrics = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key:
            continue
        metric, filter_name = key.split(",", 1)
        if metric in _SKIP_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = metric if filter_name == "none" else f"{metric}/{filter_name}"
        metrics[f"eval/{task}/{name}"] = float(value)
    if task == "ocrbench":
        metrics.update(ocrbench_hit_metrics(samples))
    return metrics


def ocrbench_hit_metrics(samples: list[dict]) -> dict:
    """OCRBench over the documents scored: lmms-eval's ``ocrbench_accuracy`` is hits / 1000 whatever their number."""
    hits = [float(s["ocrbench_accuracy"]["score"]) for s in samples]
    return {"eval/ocrbench/hit_rate": sum(hits) / len(hits), "eval/ocrbench/hits": sum(hits),
            "eval/ocrbench/n": len(hits)}


def _write_samples(path: Path, samples: list[dict]) -> None:
    from lmms_eval.utils import handle_non_serializable

    with path.open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")


def evaluate_lmms(model, processor, tasks: list[str], *, limit: int | float | None, data_root: Path | None,
                  output_dir: Path, batch_size: int = 1, max_new_tokens: int = 128, task_manager=None,
                  **wrapper_kwargs) -> dict:
    """Run lmms-eval tasks on an in-memory model; returns flat metrics.

    model, processor: a loaded HF model and processor (wrapped in :class:`MasquantHF` with ``batch_size``,
        ``max_new_tokens`` and ``wrapper_kwargs``), or an lmms-eval ``lmms`` instance and None.
    limit: documents per task (int), a fraction of each task (0 < limit < 1), or None for all.
    data_root: None reads the hub datasets through lmms-eval (``task_manager`` or :func:`default_task_manager`);
        a folder switches every task to ``data_root/<task>`` (see ``write_local_task_data``) through include-YAMLs
        indexed by a small TaskManager of their own (``task_manager`` is then not used).
    output_dir: receives ``samples_<task>.jsonl``, ``lmms_results_<task>.json``, the generated task YAMLs
        (``task_yamls/``) and lmms-eval's submission files.
    Returns ``{"eval/limit": limit, "eval/<task>/<metric>": value, "eval/<task>/n_docs": n, ...}``.
    """
    from lmms_eval.api.model import lmms

    from masquant.evaluation.lmms_model import MasquantHF

    if not tasks:
        raise EvaluationError("no tasks to evaluate")
    if limit is not None and (limit < 0 or (isinstance(limit, float) and not math.isfinite(limit))):
        raise EvaluationError(f"limit must be None, a count or a fraction in (0, 1), got {limit}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if data_root is not None:
        yaml_dir = write_local_task_yamls(list(tasks), Path(data_root), output_dir / "task_yamls")
        task_manager = local_task_manager(yaml_dir)
    elif task_manager is None:
        task_manager = default_task_manager()
    route_lmms_eval_logs_to_logging()
    from lmms_eval.evaluator import simple_evaluate

    if isinstance(model, lmms):
        lm = model
    else:
        lm = MasquantHF(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens, **wrapper_kwargs)
    cli_args = types.SimpleNamespace(output_path=str(output_dir), process_with_media=True)

    metrics: dict = {"eval/limit": limit}

    for task in tasks:
        started = time.perf_counter()
        try:
            results = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=limit,
                                      bootstrap_iters=0, log_samples=True, cli_args=cli_args, verbosity="WARNING",
                                      process_docs_parallel=1)
        except EvaluationError:
            raise
        except Exception as err:
            cause = _root_cause(err)
            hint = " (data_root=None reads the HF hub; offline, give data_root with local copies)" if (
                data_root is None and isinstance(cause, (ConnectionError, OSError))) else ""
            raise EvaluationError(f"task {task}: lmms-eval failed: {type(cause).__name__}: {cause}{hint}") from err
        if results is None:
            raise EvaluationError(f"task {task}: lmms-eval returned no results (not the rank-0 process?)")
        if task not in results.get("results", {}):
            raise EvaluationError(f"task {task}: missing from lmms-eval's results (its data or config failed to load; "
                                  f"got {sorted(results.get('results', {}))})")
        samples = results.get("samples", {}).get(task, [])
        if not samples:
            raise EvaluationError(f"task {task}: no document was scored (empty split or limit={limit})")
        _write_samples(output_dir / f"samples_{task}.jsonl", samples)
        record = {k: results.get(k, {}).get(task) for k in ("results", "configs", "n-samples", "versions")}
        (output_dir / f"lmms_results_{task}.json").write_text(json.dumps(record, indent=2, default=str))
        task_metrics = _flat_task_metrics(task, results["results"][task], samples)
        if not task_metrics:
            raise EvaluationError(f"task {task}: lmms-eval reported no numeric metric ({results['results'][task]})")
        metrics.update(task_metrics)
        metrics.update(document_scores(task, samples, task_metrics))
        metrics[f"eval/{task}/n_docs"] = len(samples)
        log.info("eval %s: %d docs in %.1f s: %s", task, len(samples), time.perf_counter() - started,
                 {k.rsplit("/", 1)[-1]: round(v, 4) for k, v in task_metrics.items()})
    return metrics


def document_scores(task: str, samples: list[dict], task_metrics: dict) -> dict:
    """The task's per-document scores (for paired comparisons of runs) and the 95 % interval of its headline value
    over the documents, in lmms-eval's unit: ``eval/<task>/doc_ids``, ``doc_values``, ``doc_weights`` (ratio
    metrics only), ``ci95`` [low, high] and ``ci_method`` (masquant.evaluation.intervals)."""
    from masquant.evaluation.intervals import interval
    from masquant.evaluation.metrics import metric_value
    from masquant.evaluation.tasks import TASKS, doc_scores

    if task not in TASKS:
        return {}
    ids, values, weights = doc_scores(task, samples)
    spec = TASKS[task]
    ratio = sum(values) / (sum(weights) if weights is not None else len(values))
    headline = metric_value(task_metrics, spec.metric_keys)
    if headline is not None and not math.isclose(ratio * spec.unit, float(headline), rel_tol=1e-6, abs_tol=1e-4):
        log.warning("task %s: the per-document scores give %.6g, lmms-eval's %s is %.6g; its interval is left out",
                    task, ratio * spec.unit, spec.metrics[0], float(headline))
        return {}
    lo, hi, method = interval(values, weights)
    out = {f"eval/{task}/doc_ids": ids, f"eval/{task}/doc_values": values,
           f"eval/{task}/ci95": [lo * spec.unit, hi * spec.unit], f"eval/{task}/ci_method": method}
    if weights is not None:
        out[f"eval/{task}/doc_weights"] = weights
    return out


def format_eval_table(metrics: dict) -> str:
    """A markdown table of the flat eval metrics: one row per task and metric, with the document count and limit."""
    limit = metrics.get("eval/limit")
    rows = []
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != "eval" or parts[-1] == "n_docs":
            continue
        task, metric = parts[1], "/".join(parts[2:])
        n_docs = metrics.get(f"eval/{task}/n_docs", "")
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append(f"| {task} | {metric} | {shown} | {n_docs} |")
    if limit is None:
        limit_text = "all documents"
    else:
        limit_text = f"{limit:g} of each task" if 0 < limit < 1 else f"{limit:g} documents per task"
    header = [f"limit: {limit_text}", "", "| task | metric | value | docs |", "|---|---|---|---|"]
    return "\n".join(header + rows)
