"""Tiny models of every adapter, with prompts made by their real processor classes."""

from __future__ import annotations

import torch

from masquant.adapters import adapter_class_for, adapter_classes
from masquant.adapters.tiny import tiny_rows
from masquant.calibration.data import CalibrationSet, chat_inputs, load_media

MODEL_TYPES = tuple(adapter_classes())


def tiny(model_type: str = "qwen2_5_vl", seed: int = 0):
    """(model, processor, adapter class) of a family's tiny model."""
    cls = adapter_class_for(model_type)
    model, processor = cls.tiny(seed)
    return model, processor, cls


def prompts(processor, cls, n: int, seed: int = 0, answers: bool = False) -> list[dict]:
    """``n`` prompts with the family's media (image, and audio for Omni) in the middle of text."""
    out = []
    for row in tiny_rows(n, seed, cls.tiny_modalities()):
        m = load_media(row)
        out.append(chat_inputs(processor, m["question"], m["image"], m["audio"], m["answer"] if answers else None))
    return out


def text_prompt(processor, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "dog", "cat", "stop", "green"]
    question = " ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g))
    return chat_inputs(processor, question)


def calib_set(processor, cls, n: int, seed: int = 0) -> CalibrationSet:
    return CalibrationSet.from_rows(processor, tiny_rows(n, seed, cls.tiny_modalities()))


def final_hidden(model, batches: list[dict]) -> torch.Tensor:
    """The last hidden states of ``batches`` (tokens of every batch concatenated): what SQNR checks compare."""
    with torch.no_grad():
        return torch.cat([model(**b, output_hidden_states=True).hidden_states[-1][0] for b in batches])


def run_method(model, cls, processor, cfg, scheme, n_calib: int = 4):
    """(the method's report, its QuantContext) after running ``cfg``'s method on a tiny model with routing attached."""
    from masquant.adapters import get_adapter
    from masquant.engine.context import QuantContext
    from masquant.quant import ModalityRouter, attach_router
    from masquant.methods.registry import build_method

    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    ctx = QuantContext(model, adapter, scheme, router, torch.device("cpu"), ("text",) + cls.tiny_modalities(),
                       CalibrationSet(prompts(processor, cls, n_calib, seed=0)))
    return build_method(cfg).run(ctx), ctx
