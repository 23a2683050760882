"""The wrapper on a real (tiny, random) Qwen2_5_VLForConditionalGeneration with the real Qwen2.5-VL processor.

The quantized linears take their modality masks from a forward pre-hook on the top-level model that reads
the ``input_ids`` kwarg: it must see the full prompt (image pads included) at prefill, one token per
decoding step, never ``inputs_embeds``; ``mm_token_type_ids`` must reach the model (M-RoPE positions).
"""

from __future__ import annotations

import pytest
import torch

from masquant.evaluation import evaluate_lmms
from masquant.evaluation.lmms_model import MasquantHF, register_lmms_model
from support.evaluation import random_image, tiny_qwen_model


@pytest.fixture(scope="module")
def qwen(processor):
    return tiny_qwen_model(processor)


def _record_forward_calls(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v for k, v in kwargs.items() if v is not None})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_hook_sees_prompt_input_ids_at_prefill_and_one_token_per_step(qwen, processor, task_data, tmp_path,
                                                                     monkeypatch):
    data_root, _ = task_data
    generate_kwargs = []
    generate = qwen.generate

    def spy_generate(**kwargs):
        generate_kwargs.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(qwen, "generate", spy_generate)
    calls, handle = _record_forward_calls(qwen)
    try:
        metrics = evaluate_lmms(qwen, processor, ["textvqa_val"], limit=2, data_root=data_root, output_dir=tmp_path,
                                batch_size=2, max_new_tokens=5)
    finally:
        handle.remove()
    assert metrics["eval/textvqa_val/n_docs"] == 2
    assert "eval/textvqa_val/exact_match" in metrics
    assert calls and all("input_ids" in c and "inputs_embeds" not in c for c in calls)

    # generate gets everything the processor returns; it runs the vision encoder itself before prefill
    (inputs,) = generate_kwargs
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= inputs.keys()
    assert "inputs_embeds" not in inputs
    prefill, steps = calls[0], calls[1:]
    image_id = qwen.config.image_token_id
    n_image_tokens = int(inputs["image_grid_thw"].prod(-1).sum()) // processor.image_processor.merge_size ** 2
    assert torch.equal(prefill["input_ids"], inputs["input_ids"])  # one batch of two documents, left padded
    assert prefill["input_ids"].shape[0] == 2
    assert int((prefill["input_ids"] == image_id).sum()) == n_image_tokens > 0
    assert torch.equal(prefill["mm_token_type_ids"].bool(), prefill["input_ids"] == image_id)
    assert steps and all(c["input_ids"].shape == (2, 1) for c in steps)
    assert len(steps) <= 4  # max_new_tokens=5: prefill gives the first token
    assert hasattr(MasquantHF, "clean") and qwen.training is False


def test_batched_generation_matches_one_by_one(qwen, processor):
    contexts = ["What is this?", "Describe the picture in a few words please."]
    visuals = [[random_image(1)], [random_image(2, (40, 80)), random_image(3)]]
    gen_kwargs = {"until": ["ASSISTANT:"], "max_new_tokens": 6}
    batched = MasquantHF(qwen, processor, batch_size=2)._generate(contexts, visuals, gen_kwargs)
    single = MasquantHF(qwen, processor, batch_size=1)
    assert batched == [single._generate([c], [v], gen_kwargs)[0] for c, v in zip(contexts, visuals)]


def test_loglikelihood_matches_a_direct_forward(qwen, processor):
    lm = MasquantHF(qwen, processor, batch_size=2)
    contexts, continuations = ["Is it red?", "Name the animal."], [" yes", " a cat"]
    visuals = [[random_image(4)], [random_image(5)]]
    got = lm._loglikelihood(contexts, continuations, visuals)
    for context, continuation, image, (logprob, greedy) in zip(contexts, continuations, visuals, got):
        prompt = processor.apply_chat_template(lm._messages(context, image), tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prompt + continuation], images=image, return_tensors="pt")
        n = len(processor.tokenizer(continuation, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = qwen(**inputs).logits[0].float()
        target = inputs["input_ids"][0, -n:]
        expected = torch.log_softmax(logits[-n - 1:-1], -1).gather(-1, target[:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool((logits[-n - 1:-1].argmax(-1) == target).all())


def test_stop_strings_cut_the_answer_and_clean_keeps_the_model(processor):
    from support.evaluation import AnswerBookModel

    model = AnswerBookModel(processor.tokenizer, {0: "Paris\nASSISTANT: more", 1: "B\n\nbecause"})
    lm = MasquantHF(model, processor)
    assert lm._generate(["[q0]"], [[]], {"until": ["ASSISTANT:"]}) == ["Paris\n"]
    assert lm._generate(["[q1]"], [[]], {"until": ["\n\n"]}) == ["B\n\nbecause"]  # lmms-eval's default delimiter
    assert MasquantHF(model, processor, ignore_stop_strings=())._generate(["[q1]"], [[]], {"until": "\n\n"}) == ["B"]
    lm.clean()
    assert lm.model is model


def test_registered_by_name():
    register_lmms_model()
    from lmms_eval.models import get_model

    assert get_model("masquant_hf") is MasquantHF
