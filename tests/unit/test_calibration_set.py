"""Calibration sets: answers become labels on exactly the answer's tokens; held-out rows are disjoint."""

from __future__ import annotations

import json

import pytest
import torch

from masquant.calibration.data import IGNORE_INDEX, CalibrationDataError, CalibrationSet, chat_inputs
from masquant.engine.context import QuantContext
from masquant.engine.deploy import DeployWeight, deploy_block_
from masquant.adapters import get_adapter
from masquant.quant import ModalityRouter, QuantLinear, QuantScheme
from masquant.adapters.tiny import random_image, tiny_rows
from support.tiny import tiny


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "gemma3", "llava"])
def test_answer_labels_cover_only_the_answer(model_type):
    _, processor, _ = tiny(model_type)
    prompt = chat_inputs(processor, "what color is it?", random_image(0))
    sft = chat_inputs(processor, "what color is it?", random_image(0), answer="dark red")
    n = prompt["input_ids"].shape[1]
    assert torch.equal(sft["input_ids"][:, :n], prompt["input_ids"])
    labels = sft["labels"][0]
    assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] != IGNORE_INDEX).all()
    answer = processor.tokenizer.decode(labels[n:])
    assert answer.strip().startswith("dark red"), answer
    for key in ("pixel_values",):
        assert torch.equal(sft[key], prompt[key])


def test_sft_batches_need_answers_and_say_how_to_get_them():
    _, processor, cls = tiny("qwen2_5_vl")
    rows = tiny_rows(2, 0)
    with_answers = CalibrationSet.from_rows(processor, rows)
    assert with_answers.has_answers and len(with_answers.sft_batches()) == 2
    without = CalibrationSet.from_rows(processor, [{k: v for k, v in r.items() if k != "answer"} for r in rows],
                                       {"source": "file"})
    with pytest.raises(CalibrationDataError, match="'answer'"):
        without.sft_batches()


def test_with_answers_calibrates_on_prompt_and_answer_tokens(compose_cfg, tiny_overrides):
    """calib.with_answers: each calibration batch is the prompt followed by its answer (what SFT batches hold,
    without labels); the held-out prompts stay prompts; rows without answers are refused, naming the key."""
    from masquant.sources import calibration_sets
    from masquant.app.pipeline import resolve
    from masquant.errors import ConfigError

    _, processor, cls = tiny("qwen2_5_vl")
    rows = tiny_rows(2, 0)
    plain = CalibrationSet.from_rows(processor, rows)
    answered = CalibrationSet.from_rows(processor, rows, with_answers=True)
    for p, a, sft in zip(plain.batches, answered.batches, plain.sft_batches()):
        n = p["input_ids"].shape[1]
        assert a["input_ids"].shape[1] > n and torch.equal(a["input_ids"][:, :n], p["input_ids"])
        assert torch.equal(a["input_ids"], sft["input_ids"]) and "labels" not in a
    with pytest.raises(CalibrationDataError, match=r"calib.with_answers=true.*rows \[0, 1\].*'answer'"):
        CalibrationSet.from_rows(processor, [{k: v for k, v in r.items() if k != "answer"} for r in rows],
                                 with_answers=True)
    cfg = compose_cfg(*tiny_overrides, "calib.with_answers=true", "calib.n_samples=2", "calib.held_out=1")
    calib, held, _ = calibration_sets(cfg, processor, get_adapter(tiny("qwen2_5_vl")[0]))
    ref_calib, ref_held, _ = calibration_sets(compose_cfg(*tiny_overrides, "calib.n_samples=2", "calib.held_out=1"),
                                              processor, get_adapter(tiny("qwen2_5_vl")[0]))
    assert all(a["input_ids"].shape[1] > p["input_ids"].shape[1] for a, p in zip(calib.batches, ref_calib.batches))
    assert all(torch.equal(a["input_ids"], p["input_ids"]) for a, p in zip(held.batches, ref_held.batches))
    with pytest.raises(ConfigError, match="calib.with_answers=true.*calib=text"):
        resolve(compose_cfg("model=tiny_qwen25vl", "modality=text_only", "calib=text", "calib.with_answers=true"))


def test_file_split_is_disjoint_and_recorded(tmp_path, compose_cfg):
    from masquant.adapters import adapter_class_for
    from masquant.sources import calibration_source

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(12)]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose_cfg("calib=file", f"calib.path={path}", "calib.n_samples=6", "calib.held_out=3")
    calib, held, desc = calibration_source("file").rows(cfg.calib, adapter_class_for("qwen2_5_vl"), 6, 3)
    assert len(calib) == 6 and len(held) == 3
    assert not {r["question"] for r in calib} & {r["question"] for r in held}
    assert desc["rows"] and desc["held_out_rows"] and not set(desc["rows"]) & set(desc["held_out_rows"])
    again = calibration_source("file").rows(cfg.calib, adapter_class_for("qwen2_5_vl"), 6, 3)[2]
    assert again == desc  # seeded


def test_deploy_path_takes_weights_a_method_already_quantized():
    model, processor, _ = tiny("qwen2_5_vl")
    adapter = get_adapter(model)
    ctx = QuantContext(model, adapter, QuantScheme("w4a8", 4, 8), ModalityRouter(adapter.modality_masks),
                       torch.device("cpu"), ("text",))
    layer = adapter.decoder_layers()[0]
    given = {role: torch.randn_like(lin.weight) for role, lin in adapter.linears(layer).items()}
    deploy_block_(ctx, layer, weight_for=lambda role, lin: DeployWeight(given[role], quantized=True),
                    input_transform_for=lambda role, lin: torch.nn.Identity() if role == "down" else None)
    for role, lin in adapter.linears(layer).items():
        assert isinstance(lin, QuantLinear) and torch.equal(lin.weight, given[role])
        assert (lin.input_transform is not None) == (role == "down")


def test_input_transform_runs_before_activation_quantization():
    scheme = QuantScheme("w16a4", 16, 4)
    W = torch.randn(5, 8)
    x = torch.randn(3, 8)
    flip = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        flip.weight.copy_(torch.eye(8).flip(0))
    from masquant.quant.quantizer import quantize_activation

    ql = QuantLinear(W, None, scheme, input_transform=flip)
    torch.testing.assert_close(ql(x), quantize_activation(x.flip(-1), scheme) @ W.T)
