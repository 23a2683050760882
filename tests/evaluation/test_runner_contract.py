"""The runner's guards around lmms-eval: no silent empty result, task sources in sync with the installed YAMLs,
lmms-eval's loguru records reaching std logging."""

from __future__ import annotations

import logging

import pytest

from masquant.evaluation import ALL_TASKS, EVAL_TASKS, EvaluationError, evaluate_lmms, format_eval_table
from masquant.evaluation.runner import route_lmms_eval_logs_to_logging
from masquant.evaluation.tasks import TASK_SOURCES, installed_task_yaml
from support.evaluation import AnswerBookModel


@pytest.mark.parametrize(("returned", "message"), [
    (None, "task ocrbench: lmms-eval returned no results"),
    ({"results": {}}, "task ocrbench: missing from lmms-eval's results"),
    ({"results": {"ocrbench": {"ocrbench_accuracy,none": 0.0}}, "samples": {"ocrbench": []}},
     "task ocrbench: no document was scored"),
])
def test_evaluator_without_a_result_raises(returned, message, processor, task_data, tmp_path, monkeypatch):
    import lmms_eval.evaluator

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", lambda **kwargs: returned)
    with pytest.raises(EvaluationError, match=message):
        evaluate_lmms(AnswerBookModel(processor.tokenizer, {}), processor, ["ocrbench"], limit=None,
                      data_root=task_data[0], output_dir=tmp_path)


def test_task_sources_match_the_installed_yamls():
    from lmms_eval.utils import load_yaml_config

    assert set(TASK_SOURCES) == set(ALL_TASKS) and set(EVAL_TASKS) <= set(ALL_TASKS)
    for task, source in TASK_SOURCES.items():
        config = load_yaml_config(str(installed_task_yaml(task)), mode="full")
        assert config["task"] == task and config["test_split"] == source.split


def test_lmms_eval_loguru_records_reach_std_logging(caplog):
    from loguru import logger

    route_lmms_eval_logs_to_logging()
    with caplog.at_level(logging.WARNING, logger="lmms_eval"):
        logger.warning("a warning from inside lmms-eval")
    assert any("a warning from inside lmms-eval" in r.getMessage() and r.name == "lmms_eval" for r in caplog.records)


def test_format_eval_table():
    table = format_eval_table({"eval/limit": 100, "eval/textvqa_val/exact_match": 0.61234,
                               "eval/textvqa_val/n_docs": 100})
    assert table.splitlines() == ["limit: 100 documents per task", "", "| task | metric | value | docs |",
                                  "|---|---|---|---|", "| textvqa_val | exact_match | 0.6123 | 100 |"]
    assert format_eval_table({"eval/limit": None}).startswith("limit: all documents")
