"""Modality masks reach the quantized layers while lmms-eval evaluates the model (prefill only)."""

import torch

from masquant.adapters import get_adapter
from masquant.calibration.data import CalibrationSet, chat_inputs
from masquant.evaluation import evaluate_lmms, write_local_task_data
from support.evaluation import random_image, tiny_qwen_model, tiny_qwen_processor, tiny_task_docs
from masquant.engine.context import QuantContext
from masquant.methods.masquant.config import CMCConfig, MASQuantConfig
from masquant.quant import ModalityRouter, QuantLinear, QuantScheme, attach_router
from masquant.methods.registry import build_method


def _lowrank_rows(model) -> int:
    return sum(m.lowrank_tokens for m in model.modules() if isinstance(m, QuantLinear))


def test_vision_tokens_take_their_path_during_lmms_eval(tmp_path):
    processor = tiny_qwen_processor()
    model = tiny_qwen_model(processor)
    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    calib = CalibrationSet([chat_inputs(processor, "What is shown?", random_image(s)) for s in range(3)])
    ctx = QuantContext(model, adapter, QuantScheme("w4a8", 4, 8), router, torch.device("cpu"), ("text", "vision"), calib)
    build_method(MASQuantConfig(learn=False, cmc=CMCConfig(rank=4, rank_floor=0))).run(ctx)

    docs, _, _ = tiny_task_docs("textvqa_val", 2)
    write_local_task_data("textvqa_val", docs, tmp_path / "data")
    seen = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int((kwargs["input_ids"] == model.config.image_token_id).sum())),
        with_kwargs=True)
    start = _lowrank_rows(model)
    evaluate_lmms(model, processor, ["textvqa_val"], limit=None, data_root=tmp_path / "data",
                  output_dir=tmp_path / "out", batch_size=1, max_new_tokens=3)
    handle.remove()
    image_tokens = sum(seen)  # every image token appears once, in its prompt's prefill
    assert image_tokens > 0 and seen[1] == 0  # decoding steps carry no image tokens
    n_branches = sum(1 for m in model.modules() if isinstance(m, QuantLinear) and "vision" in m.paths
                     and m.paths["vision"].L1 is not None)
    assert _lowrank_rows(model) - start == image_tokens * n_branches

    # control: without masks every token takes the text path and the branches never run
    router.enabled = False
    start = _lowrank_rows(model)
    evaluate_lmms(model, processor, ["textvqa_val"], limit=None, data_root=tmp_path / "data",
                  output_dir=tmp_path / "out2", batch_size=1, max_new_tokens=3)
    assert _lowrank_rows(model) == start
