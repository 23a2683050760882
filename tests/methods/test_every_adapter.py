"""Every registered method on every adapter's tiny model (parametrized over the registries, not a list):

1. FP invariance: with ``quant=fp16`` the transforms of a function-preserving method (folds, rotations, smoothing
   paths) leave the model's logits unchanged; a wrong fold or rotation shows up as a collapse;
2. no worse than RTN at the scheme the method targets (from its capability flags: weight-only, static or dynamic
   activations), by more than ``ALLOWANCE_DB``, on the median over three calibration sets; a method that changes
   the function by design (sparsity, a low-rank approximation) is compared with its own fp16 error and RTN's,
   added as noise powers;
3. a family the method cannot handle is refused before loading, with the adapter's reason.

One torch thread (the numbers do not depend on the machine's core count).
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from masquant.adapters import get_adapter
from masquant.engine.context import QuantContext
from masquant.errors import MethodConfigError
from masquant.methods.registry import get_config_class, get_method_class, method_ids
from masquant.quant import ModalityRouter, QuantScheme, attach_router
from masquant.quant.quantizer import sqnr_db
from support.tiny import MODEL_TYPES, calib_set, prompts, tiny

FP16 = QuantScheme("fp16")
W4A8 = QuantScheme("w4a8", 4, 8)
W4A8_STATIC = QuantScheme("w4a8_static", 4, 8, a_dynamic=False, a_granularity="tensor")
W4A16_G32 = QuantScheme("w4a16_g32", 4, 16, w_symmetric=False, w_granularity="group", w_group_size=32)
SEEDS = (0, 1, 2)
ALLOWANCE_DB = 3.0  # a collapse (wrong fold, wrong inputs, wrong targets) costs far more: see the module docstring
INVARIANCE_DB = 60.0  # float32 rotations and folds keep >100 dB on the tiny models; a wrong one falls below 20


pytestmark = pytest.mark.usefixtures("one_thread")  # numbers that do not depend on the core count


def target_scheme(method_cls) -> QuantScheme:
    """The scheme a method is compared at, from its capability flags."""
    if method_cls.activations == "refused":
        return W4A16_G32
    if method_cls.activation_scales == "static":
        return W4A8_STATIC
    return W4A8


def run(base, processor, cls, method_id: str, scheme: QuantScheme, seed: int, held: list[dict]) -> float:
    """SQNR (dB) of the logits of ``held`` after ``method_id`` at its defaults (logits, not hidden states: a
    rotated model's residual stream is in another basis)."""
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    ctx = QuantContext(model, adapter, scheme, router, torch.device("cpu"), ("text",) + cls.tiny_modalities(),
                       calib_set(processor, cls, 4, seed=10 * seed))
    get_method_class(method_id)(get_config_class(method_id)()).run(ctx)
    return sqnr_db(logits(base, held), logits(model, held))


def logits(model, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits[0] for b in batches])


def refused(method, cls) -> bool:
    """True when the method refuses the family before loading (then the message names the adapter)."""
    try:
        method.check_adapter(cls)
    except MethodConfigError as err:
        assert cls.__name__ in str(err), err
        return True
    return False


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method_id", [m for m in method_ids() if get_method_class(m).function_preserving])
def test_fp16_leaves_the_model_unchanged(method_id, model_type):
    """Run at quant=fp16 (through the engine, whatever the method accepts as a scheme): the deployed model equals
    the FP model."""
    method_cls = get_method_class(method_id)
    base, processor, cls = tiny(model_type)
    if refused(method_cls(), cls):
        return
    held = prompts(processor, cls, 2, seed=50)
    assert run(base, processor, cls, method_id, FP16, 0, held) > INVARIANCE_DB


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method_id", [m for m in method_ids() if get_method_class(m).fp16 != "required"])
def test_no_worse_than_rtn_at_the_scheme_it_targets(method_id, model_type):
    method_cls = get_method_class(method_id)
    base, processor, cls = tiny(model_type)
    if refused(method_cls(), cls):
        return
    scheme = target_scheme(method_cls)
    rtn_scheme = W4A8 if scheme is W4A8_STATIC else scheme  # RTN has no calibration for static scales
    held = prompts(processor, cls, 2, seed=50)
    ours = statistics.median(run(base, processor, cls, method_id, scheme, s, held) for s in SEEDS)
    rtn = statistics.median(run(base, processor, cls, "rtn", rtn_scheme, s, held) for s in SEEDS)
    bar = rtn
    if not method_cls.function_preserving:  # its own fp16 change and RTN's error add up (independent noise powers)
        own = run(base, processor, cls, method_id, FP16, 0, held)
        bar = -10 * math.log10(10 ** (-rtn / 10) + 10 ** (-own / 10))
    assert ours >= bar - ALLOWANCE_DB, {"method": ours, "bar": bar, "rtn": rtn, "scheme": scheme.name}
