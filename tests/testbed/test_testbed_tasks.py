"""The synthetic testbed tasks: deterministic, disjoint splits, real lmms-eval schemas and prompts."""

from __future__ import annotations

import ast

import pytest
from PIL import Image

from masquant.testbed.tasks import (
    SPLITS,
    TESTBED_TASKS,
    benchmark_prompt,
    benchmark_target,
    doc_image,
    doc_rng,
    make_benchmark_docs,
    make_calibration_samples,
    make_training_samples,
)

N = 12


def _fingerprint(task: str, doc: dict) -> tuple:
    fields = tuple(sorted((k, repr(v)) for k, v in doc.items() if not isinstance(v, Image.Image)))
    return fields, doc_image(task, doc).tobytes()


@pytest.mark.parametrize("task", TESTBED_TASKS)
def test_docs_are_deterministic(task):
    first = [_fingerprint(task, d) for d in make_benchmark_docs(task, N)]
    second = [_fingerprint(task, d) for d in make_benchmark_docs(task, N)]
    assert first == second


@pytest.mark.parametrize("task", TESTBED_TASKS)
def test_splits_are_disjoint(task):
    images = {split: {doc_image(task, d).tobytes() for d in make_benchmark_docs(task, N, split=split)} for split in SPLITS}
    assert not images["train"] & images["eval"]
    assert not images["calib"] & images["eval"]
    assert not images["train"] & images["calib"]
    seeds = {split: {doc_rng(task, split, i).random() for i in range(200)} for split in SPLITS}
    assert not seeds["train"] & seeds["eval"] and not seeds["calib"] & seeds["eval"]


def test_unknown_task_and_split_fail_loudly():
    with pytest.raises(ValueError, match="valid"):
        make_benchmark_docs("gqa", 1)
    with pytest.raises(ValueError, match="valid"):
        make_benchmark_docs("ocrbench", 1, split="test")


def _is_rgb(image) -> bool:
    return isinstance(image, Image.Image) and image.mode == "RGB"


def test_textvqa_schema():
    for doc in make_benchmark_docs("textvqa_val", N):
        assert _is_rgb(doc["image"]) and isinstance(doc["question"], str) and isinstance(doc["question_id"], int)
        assert len(doc["answers"]) == 10 and all(isinstance(a, str) for a in doc["answers"])


def test_vizwiz_schema_and_unanswerable():
    docs = make_benchmark_docs("vizwiz_vqa_val", 40)
    for doc in docs:
        assert _is_rgb(doc["image"]) and isinstance(doc["question"], str) and isinstance(doc["question_id"], str)
        assert len(doc["answers"]) == 10 and doc["category"] in ("other", "unanswerable")
        assert (doc["category"] == "unanswerable") == (doc["answers"][0] == "unanswerable")
    assert any(d["category"] == "unanswerable" for d in docs)


def test_scienceqa_schema():
    for doc in make_benchmark_docs("scienceqa_img", N):
        assert _is_rgb(doc["image"]) and isinstance(doc["question"], str) and isinstance(doc["hint"], str)
        assert isinstance(doc["choices"], list) and isinstance(doc["answer"], int)
        assert 0 <= doc["answer"] < len(doc["choices"])


def test_ocrbench_schema():
    for doc in make_benchmark_docs("ocrbench", N):
        assert _is_rgb(doc["image"]) and isinstance(doc["question"], str)
        assert isinstance(doc["answer"], list) and all(isinstance(a, str) for a in doc["answer"])
        assert isinstance(doc["dataset"], str) and doc["question_type"] == "Regular Text Recognition"


def test_mmmu_schema():
    for i, doc in enumerate(make_benchmark_docs("mmmu_val", N)):
        subject = doc["id"].split("_")[1]
        assert doc["id"] == f"validation_{subject}_{i + 1}"
        assert "<image 1>" in doc["question"] and doc["question_type"] == "multiple-choice"
        options = ast.literal_eval(doc["options"])
        assert isinstance(doc["options"], str) and isinstance(options, list)
        assert doc["answer"] in "ABCDEFGHI"[: len(options)]
        assert _is_rgb(doc["image_1"]) and all(doc[f"image_{k}"] is None for k in range(2, 8))


GOLDEN_PROMPTS = {
    "textvqa_val": "What does the sign say?\nAnswer the question using a single word or phrase.",
    "scienceqa_img": "Context: The diagram shows one shape.\nWhich shape is shown in the diagram?\nA. circle\nB. square\n"
    "C. triangle\nD. star\nAnswer with the option's letter from the given choices directly.",
    "mmmu_val": "How many dots are there in <image 1>?\nA. 1\nB. 2\nC. 3\nD. 4\n\n"
    "Answer with the option's letter from the given choices directly.",
}


@pytest.mark.parametrize("task", sorted(GOLDEN_PROMPTS))
def test_prompts_match_golden(task):
    prompts = {benchmark_prompt(task, d) for d in make_benchmark_docs(task, 40)}
    assert GOLDEN_PROMPTS[task] in prompts


@pytest.mark.slow
@pytest.mark.parametrize("task", TESTBED_TASKS)
def test_prompts_match_lmms_eval(task):
    """The training prompts are exactly what lmms-eval 0.7.3's default doc_to_text sends (slow: imports lmms-eval)."""
    kwargs = {
        "textvqa_val": ("lmms_eval.tasks.textvqa.utils", "textvqa_doc_to_text", {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase.", "ocr": False}),
        "vizwiz_vqa_val": ("lmms_eval.tasks.vizwiz_vqa.utils", "vizwiz_vqa_doc_to_text", {"pre_prompt": "", "post_prompt": "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."}),
        "scienceqa_img": ("lmms_eval.tasks.scienceqa.utils", "sqa_doc_to_text", {"format": "default", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}),
        "ocrbench": ("lmms_eval.tasks.ocrbench.utils", "ocrbench_doc_to_text", {}),
        "mmmu_val": ("lmms_eval.tasks.mmmu.utils", "mmmu_doc_to_text", {"prompt_type": "format", "multiple_choice_prompt": "Answer with the option's letter from the given choices directly.", "open_ended_prompt": "Answer the question using a single word or phrase."}),
    }
    module_name, function_name, task_kwargs = kwargs[task]
    module = pytest.importorskip(module_name)
    doc_to_text = getattr(module, function_name)
    for doc in make_benchmark_docs(task, 20):
        assert benchmark_prompt(task, doc) == doc_to_text(doc, task_kwargs)


def test_training_and_calibration_samples():
    samples = make_training_samples(10)
    assert {s["task"] for s in samples} == set(TESTBED_TASKS)
    for s in samples:
        assert _is_rgb(s["image"]) and s["prompt"] and s["answer"]
    calib = make_calibration_samples(5)
    assert [sorted(c) for c in calib] == [["answer", "image", "question"]] * 5
    train_images = {s["image"].tobytes() for s in make_training_samples(5)}
    assert not train_images & {c["image"].tobytes() for c in calib}


def test_targets_are_valid_answers():
    for task in TESTBED_TASKS:
        for doc in make_benchmark_docs(task, N):
            target = benchmark_target(task, doc)
            assert isinstance(target, str) and target
