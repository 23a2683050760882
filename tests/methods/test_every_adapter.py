"""Every method on every adapter at W8A8: no worse than RTN by more than 1 dB (a wrong fold, wrong layer
inputs or wrong learning targets show up here as a collapse, not as a crash)."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.rtn.method import RTNConfig
from baselines.smoothquant.method import SmoothQuantConfig
from masquant.adapters import get_adapter
from masquant.calibration.data import CalibrationSet
from masquant.methods.base import QuantContext
from masquant.methods.masquant.config import MASQuantConfig
from masquant.quant import ModalityRouter, QuantScheme, attach_router
from masquant.quant.quantizer import sqnr_db
from masquant.registry import build_method
from support.tiny import MODEL_TYPES, final_hidden, prompts, tiny

W8A8 = QuantScheme("w8a8", 8, 8)
METHODS = {"rtn": RTNConfig(), "smoothquant": SmoothQuantConfig(alpha=0.5),
           "masquant": MASQuantConfig(epochs=1, lr=5e-3)}



@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_methods_no_worse_than_rtn_at_w8a8(model_type):
    base, processor, cls = tiny(model_type)
    modalities = ("text",) + cls.tiny_modalities()
    calib = prompts(processor, cls, 4, seed=0)
    held = prompts(processor, cls, 2, seed=50)
    ref = final_hidden(base, held)
    sqnr = {}
    for name, cfg in METHODS.items():
        model = copy.deepcopy(base)
        adapter = get_adapter(model)
        router = ModalityRouter(adapter.modality_masks)
        attach_router(model, router)
        ctx = QuantContext(model, adapter, W8A8, router, torch.device("cpu"), modalities, CalibrationSet(calib))
        build_method(cfg).run(ctx)
        sqnr[name] = sqnr_db(ref, final_hidden(model, held))
    assert sqnr["rtn"] < 80, sqnr  # something was quantized
    assert sqnr["smoothquant"] >= sqnr["rtn"] - 1.0, sqnr
    assert sqnr["masquant"] >= sqnr["rtn"] - 1.0, sqnr
