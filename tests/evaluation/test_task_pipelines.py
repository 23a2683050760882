"""An oracle, right on even documents and wrong on odd ones, through lmms-eval's real pipelines of the five tasks.

The oracle is an HF-like model behind the real wrapper and the real Qwen2.5-VL processor: it reads each
prompt back from input_ids, so prompts, chat template, decoding, stop strings, post-processing and metrics
are all exercised; every task must score exactly 0.5.
"""

from __future__ import annotations

import json

import pytest

from masquant.evaluation import EVAL_TASKS, EvaluationError, evaluate_lmms, format_eval_table, write_local_task_data
from support.evaluation import AnswerBookModel, tiny_task_docs

METRIC = {"textvqa_val": "exact_match", "vizwiz_vqa_val": "exact_match", "scienceqa_img": "exact_match",
          "ocrbench": "hit_rate", "mmmu_val": "mmmu_acc"}


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_oracle_scores_half_on_every_task(task, processor, task_data, tmp_path):
    data_root, oracle = task_data
    model = AnswerBookModel(processor.tokenizer, oracle[task])
    metrics = evaluate_lmms(model, processor, [task], limit=None, data_root=data_root, output_dir=tmp_path,
                            batch_size=3)

    assert metrics[f"eval/{task}/{METRIC[task]}"] == pytest.approx(0.5, abs=1e-12)
    assert metrics[f"eval/{task}/n_docs"] == 4
    assert metrics["eval/limit"] is None
    samples = [json.loads(line) for line in (tmp_path / f"samples_{task}.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    answers = [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert answers == [oracle[task][i] for i in range(4)]
    # the model saw the real processor output, images included
    call = model.calls[0]
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= call.keys()
    if task == "ocrbench":  # lmms-eval's own value (hits / 1000) stays under its own key
        assert metrics["eval/ocrbench/ocrbench_accuracy"] == pytest.approx(2 / 1000, abs=1e-12)
        assert metrics["eval/ocrbench/hits"] == 2 and metrics["eval/ocrbench/n"] == 4
    assert (tmp_path / "task_yamls" / f"{task}.yaml").read_text().count("include:") == 1


def test_two_tasks_in_one_call_each_get_their_own_fractional_limit(processor, tmp_path):
    data_root = tmp_path / "data"
    for task, n in [("textvqa_val", 4), ("ocrbench", 6)]:
        write_local_task_data(task, tiny_task_docs(task, n)[0], data_root)
    model = AnswerBookModel(processor.tokenizer, {})  # answers are not scored here
    metrics = evaluate_lmms(model, processor, ["textvqa_val", "ocrbench"], limit=0.5, data_root=data_root,
                            output_dir=tmp_path / "out")
    assert metrics["eval/limit"] == 0.5
    assert metrics["eval/textvqa_val/n_docs"] == 2
    assert metrics["eval/ocrbench/n_docs"] == 3  # lmms-eval alone would reuse textvqa's 2

    table = format_eval_table(metrics)
    assert "limit: 0.5 of each task" in table
    assert "| ocrbench | ocrbench_accuracy |" in table and "| textvqa_val | exact_match |" in table


def test_missing_local_data_names_task_and_path(processor, tmp_path):
    with pytest.raises(EvaluationError, match=r"task mmmu_val: no local data at .*mmmu_val"):
        evaluate_lmms(AnswerBookModel(processor.tokenizer, {}), processor, ["mmmu_val"], limit=None,
                      data_root=tmp_path / "nowhere", output_dir=tmp_path / "out")


def test_exception_in_generation_raises_with_task_and_cause(processor, task_data, tmp_path):
    class Broken(AnswerBookModel):
        def generate(self, *args, **kwargs):
            raise RuntimeError("boom in generate")

    data_root, _ = task_data
    with pytest.raises(EvaluationError, match=r"task scienceqa_img: lmms-eval failed: RuntimeError: boom in generate"):
        evaluate_lmms(Broken(processor.tokenizer, {}), processor, ["scienceqa_img"], limit=2, data_root=data_root,
                      output_dir=tmp_path)


def test_write_local_task_data_checks_the_schema(tmp_path):
    with pytest.raises(ValueError, match=r"lacks fields \['answers'"):
        write_local_task_data("textvqa_val", [{"question": "q", "question_id": "1", "image": None}], tmp_path)
    with pytest.raises(KeyError, match="valid tasks"):
        write_local_task_data("gqa", [{}], tmp_path)
