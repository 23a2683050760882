"""testbed-omni: a Qwen2.5-Omni thinker that is testbed-vl on text and images, with Whisper tiny.en audio."""

from __future__ import annotations

import pytest
import torch

from masquant.adapters.registry import get_adapter
from masquant.calibration.data import chat_inputs
from masquant.testbed.audio_tasks import asr_prompt, make_asr_doc, make_omni_calibration_samples, make_omnibench_doc
from masquant.testbed.model import load_testbed_vl
from masquant.testbed.omni import ensure_omni_converted, load_testbed_omni
from masquant.testbed.tasks import make_calibration_samples


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    import os
    from pathlib import Path

    return Path(os.environ.get("MASQUANT_CACHE", Path.home() / ".cache" / "masquant"))


@pytest.fixture(scope="module")
def omni(cache_root):
    ensure_omni_converted(cache_root)
    return load_testbed_omni(cache_root)


def test_text_and_image_logits_equal_testbed_vl(omni, cache_root):
    from masquant.testbed.model import TESTBED_VERSION

    model, processor = omni
    vl, vl_processor = load_testbed_vl(cache_root / "testbed" / f"testbed-vl-{TESTBED_VERSION}")
    row = make_calibration_samples(1)[0]
    for image in (None, row["image"]):
        a, b = chat_inputs(processor, row["question"], image), chat_inputs(vl_processor, row["question"], image)
        assert torch.equal(a["input_ids"], b["input_ids"])
        with torch.no_grad():
            la, lb = model(**a).logits, vl(**b).logits
        assert torch.equal(la[..., :lb.shape[-1]], lb)  # the three audio tokens are extra vocabulary rows


def test_masks_mark_text_image_and_audio_tokens(omni):
    model, processor = omni
    adapter = get_adapter(model)
    doc = make_omnibench_doc("calib", 0)
    inputs = chat_inputs(processor, "Which option?", doc["image"], doc["audio"]["array"])
    ids = inputs["input_ids"][0]
    masks = {m: v[0] for m, v in adapter.modality_masks(inputs["input_ids"]).items()}
    tok = processor.tokenizer
    n_image = int(inputs["image_grid_thw"].prod()) // 4  # spatial merge 2x2
    n_audio = int(((inputs["feature_attention_mask"].sum() - 1) // 2 + 1 - 2) // 2 + 1)
    assert int(masks["vision"].sum()) == n_image > 0 and int(masks["audio"].sum()) == n_audio > 0
    for i, token_id in enumerate(ids.tolist()):
        token = tok.convert_ids_to_tokens(token_id)
        expected = {"<|image_pad|>": "vision", "<|AUDIO|>": "audio"}.get(token, "text")
        assert [m for m, v in masks.items() if v[i]] == [expected], (i, token)
    # the placeholders' neighbours (<|vision_start|>, <|audio_bos|>, ...) and the chat template are text
    assert masks["text"].sum() == len(ids) - n_image - n_audio


def test_trained_projector_transcribes_some_words(omni):
    from masquant.testbed.train_omni import greedy_answer

    model, processor = omni
    hits = 0
    for i in range(4):
        doc = make_asr_doc("eval", i)
        hyp = greedy_answer(model, processor, asr_prompt(), audio=doc["audio"]["array"]).lower().split()
        hits += len(set(hyp) & set(doc["gt"].lower().split()))
    assert hits >= 3  # an untrained projector makes the model talk about something else entirely


def test_calibration_and_eval_documents_are_disjoint():
    calib = {tuple(r["audio"][:200].tolist()) for r in make_omni_calibration_samples(8)}
    eval_docs = {tuple(make_asr_doc("eval", i)["audio"]["array"][:200].tolist()) for i in range(8)}
    eval_docs |= {tuple(make_omnibench_doc("eval", i)["audio"]["array"][:200].tolist()) for i in range(8)}
    assert calib.isdisjoint(eval_docs)
