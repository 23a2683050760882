"""Evaluation through lmms-eval: a model wrapper for in-memory HF models, the paper's tasks, local data.

Attributes load lazily: importing lmms-eval takes seconds, and lmms-eval itself imports
``masquant.evaluation.lmms_model`` from its model entry point.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_lmms": "masquant.evaluation.runner",
    "format_eval_table": "masquant.evaluation.runner",
    "default_task_manager": "masquant.evaluation.runner",
    "write_local_task_data": "masquant.evaluation.tasks",
    "EVAL_TASKS": "masquant.evaluation.tasks",
    "AUDIO_EVAL_TASKS": "masquant.evaluation.tasks",
    "ALL_TASKS": "masquant.evaluation.tasks",
    "EvaluationError": "masquant.evaluation.tasks",
    "MasquantHF": "masquant.evaluation.lmms_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
