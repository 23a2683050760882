"""Fixtures for the evaluation tests: a real (tiny) Qwen2.5-VL processor and local copies of tiny task data."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from masquant.evaluation import EVAL_TASKS, write_local_task_data  # noqa: E402
from support.evaluation import tiny_qwen_processor, tiny_task_docs  # noqa: E402

N_DOCS = 4


@pytest.fixture(scope="session")
def processor():
    return tiny_qwen_processor()


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """data_root with N_DOCS documents of each task; per task the answers that score 1 (even ids) or 0 (odd)."""
    data_root = tmp_path_factory.mktemp("eval_data")
    oracle = {}
    for task in EVAL_TASKS:
        docs, right, wrong = tiny_task_docs(task, N_DOCS)
        write_local_task_data(task, docs, data_root)
        oracle[task] = {i: right[i] if i % 2 == 0 else wrong[i] for i in right}
    return data_root, oracle
