"""Pieces of the vision-tower training loop: answer-only loss, schedule, weight files."""

from __future__ import annotations

import pytest
import torch

from masquant.testbed.model import load_vision_weights_
from masquant.testbed.tasks import make_training_samples
from masquant.testbed.train import (
    TrainConfig,
    answer_batch,
    lr_factor,
    save_vision_weights,
    score_prediction,
    training_stream,
    vision_parameters,
)


def test_answer_tokens_are_the_row_ends(testbed):
    _, processor = testbed
    samples = make_training_samples(5)
    inputs, n_answer = answer_batch(processor, samples)
    for row, sample, k in zip(inputs["input_ids"], samples, n_answer):
        assert processor.decode(row[-k:]) == sample["answer"] + "<|im_end|>"
        assert processor.decode(row[-k - 3 : -k]).endswith("assistant\n")


def test_lr_schedule_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] < factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] >= 0.1
    assert lr_factor(20, config, time_fraction=1.0) == pytest.approx(0.1)


def test_training_stream_is_deterministic_with_curriculum():
    config = TrainConfig(curriculum_steps=2, batch_size=4)
    first, second = training_stream(config), training_stream(config)
    a = [next(first) for _ in range(16)]
    b = [next(second) for _ in range(16)]
    assert [(s["task"], s["prompt"], s["answer"]) for s in a] == [(s["task"], s["prompt"], s["answer"]) for s in b]
    assert {s["task"] for s in a[:8]} <= {"vizwiz_vqa_val", "scienceqa_img", "mmmu_val"}


def test_vision_weights_roundtrip(testbed, tmp_path):
    model, _ = testbed
    path = tmp_path / "vision.safetensors"
    save_vision_weights(model, path)
    before = {n: p.clone() for n, p in vision_parameters(model).items()}
    with torch.no_grad():
        for p in vision_parameters(model).values():
            p.zero_()
    load_vision_weights_(model, path)
    with torch.no_grad():
        for name, p in vision_parameters(model).items():
            torch.testing.assert_close(p, before[name], rtol=1e-3, atol=1e-4)  # stored as fp16
            p.copy_(before[name])


@pytest.mark.parametrize(
    ("task", "prediction", "score"),
    [("scienceqa_img", "B", 1.0), ("scienceqa_img", "(B)", 0.0), ("ocrbench", "it says STOP", 1.0), ("textvqa_val", "Stop.", 1.0)],
)
def test_score_prediction(task, prediction, score):
    doc = {"scienceqa_img": {"choices": ["x", "y"], "answer": 1}, "ocrbench": {"answer": ["stop"]}, "textvqa_val": {"answers": ["stop"] * 10}}[task]
    assert score_prediction(task, doc, prediction) == score
