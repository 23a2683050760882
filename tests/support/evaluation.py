"""Offline pieces for testing the evaluation path: the tiny Qwen2.5-VL of its adapter (a real processor
class with a tokenizer trained in-process), tiny documents of the five tasks, and an answer-book model
that answers through the real processor output (right on even documents, wrong on odd).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from masquant.adapters import adapter_class_for
from masquant.adapters.tiny import random_image  # noqa: F401 (re-exported for the tests)


def tiny_qwen_processor():
    """The real Qwen2.5-VL processor class with a tiny tokenizer and the PIL image processor (no torchvision)."""
    return adapter_class_for("qwen2_5_vl").tiny_processor()


def tiny_qwen_model(processor, seed: int = 0):
    """A random Qwen2_5_VLForConditionalGeneration (hidden 64, 2 layers, vision depth 1) with the processor's ids."""
    cls = adapter_class_for("qwen2_5_vl")
    torch.manual_seed(seed)
    return cls.model_cls()(cls.tiny_config(processor.tokenizer)).eval()


def tiny_task_docs(task: str, n: int) -> tuple[list[dict], dict[int, str], dict[int, str]]:
    """``n`` documents of ``task`` in its real schema; each question carries a marker ``[q<i>]``.

    Returns (docs, right, wrong): the text a model should answer for document i to score 1, and to score 0.
    """
    docs, right, wrong = [], {}, {}
    for i in range(n):
        marker = f"[q{i}]"
        if task in ("textvqa_val", "vizwiz_vqa_val"):
            answer = ["stop", "yes", "two", "red"][i % 4]
            doc = {"image": random_image(i), "question": f"what does the sign say {marker}?", "answers": [answer] * 10,
                   "question_id": str(i)}
            if task == "vizwiz_vqa_val":
                doc["category"] = "other"
            docs.append(doc)
            right[i], wrong[i] = answer, "zebra"
        elif task == "scienceqa_img":
            choices = ["iron", "wood", "glass"]
            answer = i % len(choices)
            docs.append({"image": random_image(i) if i % 3 else None, "question": f"Which material is shown {marker}?",
                         "choices": choices, "answer": answer, "hint": "Look at the picture." if i % 2 else ""})
            right[i], wrong[i] = "ABC"[answer], "ABC"[(answer + 1) % 3]
        elif task == "ocrbench":
            categories = ["Regular Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
                          "Key Information Extraction"]
            word = ["HELLO", "EXIT", "42", "Total"][i % 4]
            docs.append({"image": random_image(i), "question": f"what is written in the image {marker}?",
                         "answer": [word], "dataset": "IIIT5K", "question_type": categories[i % 4]})
            right[i], wrong[i] = f"The text is {word}", "nothing"
        elif task == "mmmu_val":
            if i % 2 == 0 or i == 1:
                options = ["a cat", "a dog", "a bird", "a fish"]
                answer = "ABCD"[i % 4]
                doc = {"id": f"validation_Art_{i + 1}", "question": f"<image 1> What is shown {marker}?",
                       "options": repr(options), "answer": answer, "question_type": "multiple-choice",
                       "image_1": random_image(i)}
                right[i], wrong[i] = answer, "ABCD"[("ABCD".index(answer) + 1) % 4]
            else:
                doc = {"id": f"validation_Math_{i + 1}", "question": f"<image 1> <image 2> How many dots {marker}?",
                       "options": "[]", "answer": "7", "question_type": "open",
                       "image_1": random_image(i), "image_2": random_image(100 + i, (32, 32))}
                right[i], wrong[i] = "7", "12"
            docs.append(doc)
        else:
            raise KeyError(f"no tiny documents for task {task!r}")
    return docs, right, wrong


class AnswerBookModel(nn.Module):
    """A stand-in for an HF generation model: it reads the prompt back from ``input_ids`` (the real processor
    output), finds the document marker ``[q<i>]`` and emits ``answers[i]`` then EOS. Every call is recorded."""

    def __init__(self, tokenizer, answers: dict[int, str]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the wrapper a device
        self.calls: list[dict] = []
        self.generation_config = None

    def generate(self, input_ids, attention_mask=None, max_new_tokens=16, eos_token_id=None, pad_token_id=None,
                 **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            marker = re.search(r"\[q(\d+)\]", prompt)
            text = self.answers.get(int(marker.group(1)), "") if marker else ""
            new = self.tokenizer(text, add_special_tokens=False).input_ids[:max_new_tokens - 1]
            rows.append(new + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        new_tokens = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        return torch.cat([input_ids, new_tokens], dim=1)
