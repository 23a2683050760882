"""The dense run measures nothing twice: its SQNR report is built without a forward pass, and a quantized run
takes the FP perplexity from its dense reference's finished result. Both shortcuts must equal the measurement."""

from __future__ import annotations

import pytest
import torch

from masquant.adapters import get_adapter
from masquant.evaluation.fidelity import record_reference, sqnr_report, unchanged_sqnr_report
from masquant.methods.registry import get_config_class, get_method_class, method_ids
from masquant.quant import QuantScheme
from support.tiny import MODEL_TYPES, prompts, run_method, tiny


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_unchanged_report_equals_the_measured_report_of_an_unchanged_model(model_type):
    model, processor, cls = tiny(model_type)
    adapter = get_adapter(model)
    batches = prompts(processor, cls, 2, seed=3)
    measured = sqnr_report(model, adapter, batches, "cpu", record_reference(model, adapter, batches, "cpu"))
    assert unchanged_sqnr_report(adapter, batches) == measured  # same keys (modalities, layers), all +inf


def test_methods_that_claim_to_leave_the_model_unchanged_do():
    """``leaves_model_unchanged`` lets the pipeline skip measurements: the claim is checked on the weights and
    buffers after the method ran through the engine."""
    claimed = [m for m in method_ids() if get_method_class(m).leaves_model_unchanged]
    assert "dense" in claimed
    for method_id in claimed:
        model, processor, cls = tiny("qwen2_5_vl")
        held = prompts(processor, cls, 2, seed=5)
        before = [model(**b).logits for b in held]
        run_method(model, cls, processor, get_config_class(method_id)(), QuantScheme("fp16"))
        after = [model(**b).logits for b in held]
        assert all(torch.equal(x, y) for x, y in zip(before, after)), method_id  # bit for bit: SQNR +inf
