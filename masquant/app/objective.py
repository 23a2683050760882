"""The metric a run returns to its sweeper (``sweep.objective``): what Optuna optimises, in which direction.

    sweep.objective=fidelity/sqnr/all/e2e     end-to-end SQNR vs FP over every held-out token (default; higher)
    sweep.objective=fidelity/sqnr/vision/layer_12
    sweep.objective=fidelity/ppl_delta        perplexity increase over FP (lower)
    sweep.objective=eval/textvqa_val/exact_match
    sweep.objective=eval/avg                  mean of the headline scores of eval.tasks (the paper's Avg)

:func:`objective_problems` checks, before anything runs, that the configured run produces the metric.
"""

from __future__ import annotations


from masquant.evaluation.metrics import AVERAGE, EVAL_KEY, LOWER_IS_BETTER, PPL_KEYS, SQNR_KEY, benchmark_average

FORMS = ("fidelity/sqnr/<all|modality>/<e2e|layer_i>", *PPL_KEYS, "eval/<task>/<metric>", AVERAGE, "time/<stage>_s",
         "memory/peak_mb")


def direction(objective: str | None) -> str:
    """"minimize" for perplexity, error rates, time and memory; "maximize" otherwise (and when unset)."""
    return "minimize" if LOWER_IS_BETTER.search(str(objective)) else "maximize"


def _value(x):
    return str(getattr(x, "value", x))


def objective_problems(cfg) -> list[str]:
    """Why the run configured by ``cfg`` would not produce ``sweep.objective`` (empty when it will or when unset)."""
    if cfg.sweep.objective is None:
        return []
    key = str(cfg.sweep.objective)
    where = f"sweep.objective={key!r}"
    if m := SQNR_KEY.match(key):
        modalities = ["all", *(_value(x) for x in cfg.modality.modalities)]
        if not cfg.eval.fidelity:
            return [f"{where} needs eval.fidelity=true"]
        if m["modality"] not in modalities:
            return [f"{where}: no {m['modality']!r} tokens in this run; choose one of {modalities}"]
        return []
    if key in PPL_KEYS:
        return [] if cfg.eval.ppl else [f"{where} needs eval.ppl=true"]
    if key == AVERAGE or EVAL_KEY.match(key):
        tasks = list(cfg.eval.tasks or [])
        task = None if key == AVERAGE else EVAL_KEY.match(key)["task"]
        if not tasks:
            return [f"{where}: eval={cfg.eval.name} runs no benchmark; use eval=testbed or eval=paper"]
        if task is not None and task not in tasks:
            return [f"{where}: task {task!r} is not in eval.tasks={tasks}"]
        return []
    if key.startswith("time/") or key == "memory/peak_mb":
        return []
    return [f"{where} is not a metric a run writes; valid forms: {', '.join(FORMS)}"]


def objective_value(objective: str | None, metrics: dict) -> float | None:
    """The objective's value in ``metrics`` (``eval/avg``: the mean of the tasks' headline scores, in %); None
    when no objective is set."""
    if objective is None:
        return None
    if objective == AVERAGE:
        average = benchmark_average(metrics)
        if average is None:
            raise KeyError(f"sweep.objective={objective!r}: the result has no benchmark score")
        return average
    if objective not in metrics:
        near = sorted(k for k in metrics if k.split("/")[0] == objective.split("/")[0])[:12]
        raise KeyError(f"sweep.objective={objective!r} is not in the result; keys of that kind: {near}")
    return float(metrics[objective])
