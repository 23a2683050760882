"""Offline pieces for testing the evaluation path: a real Qwen2.5-VL processor built from a tokenizer trained
in-process, a tiny random Qwen2.5-VL model that matches it, tiny documents of the five tasks, and an
answer-book model that answers through the real processor output (right on even documents, wrong on odd).
"""

from __future__ import annotations

import re

import torch
from PIL import Image
from torch import nn

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL's chat template, images and text only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (any text round-trips) with Qwen's special tokens, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Answer the question using a single word or phrase.", "A. B. C. D. stop yes no"],
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without a video processor (whose class check would need torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2_5_VLProcessor


def tiny_qwen_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """The real Qwen2.5-VL processor class with a tiny tokenizer and the PIL image processor (no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tiny_tokenizer(),
                                         video_processor=None, chat_template=CHAT_TEMPLATE)


def tiny_qwen_model(processor, seed: int = 0):
    """A random Qwen2_5_VLForConditionalGeneration (hidden 64, 2 layers, vision depth 1) with the processor's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[0], window_size=56)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


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
