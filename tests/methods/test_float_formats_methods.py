"""Every registered method with every float format (FP8 E4M3, MXFP4, NVFP4 weights and activations, NVFP4
weight-only), parametrized over the registry: it runs or refuses before anything runs, naming why; what it deploys
is on the format's grid; and it is no worse than round-to-nearest at the same format (the median over three
calibration sets, as in ``test_every_adapter``).

One torch thread (the numbers do not depend on the machine's core count).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics

import pytest
import torch

from masquant.errors import MethodConfigError
from masquant.methods.registry import get_config_class, get_method_class, method_ids
from masquant.quant import QuantLinear, QuantScheme
from masquant.quant.grid import fake_quantize
from masquant.quant.quantizer import sqnr_db, weight_grid_of
from support.tiny import calib_set, prompts, tiny

FP8 = QuantScheme("w_fp8_a_fp8", 8, 8, w_format="fp8_e4m3", a_format="fp8_e4m3")
MXFP4 = QuantScheme("w_mxfp4_a_mxfp4", 4, 4, w_format="mxfp4", a_format="mxfp4", w_granularity="group",
                    w_group_size=32)
NVFP4 = QuantScheme("w_nvfp4_a_nvfp4", 4, 4, w_format="nvfp4", a_format="nvfp4", w_granularity="group",
                    w_group_size=16, a_granularity="tensor")
NVFP4_A16 = QuantScheme("w_nvfp4_a16", 4, 16, w_format="nvfp4", w_granularity="group", w_group_size=16)
SCHEMES = (FP8, MXFP4, NVFP4, NVFP4_A16)
SEEDS = (0, 1, 2)
ALLOWANCE_DB = 3.0

pytestmark = pytest.mark.usefixtures("one_thread")


def method_scheme(method_cls, scheme: QuantScheme) -> QuantScheme:
    """The scheme as the method deploys it: static per-tensor activation scales where it has only those."""
    if method_cls.activation_scales == "static" and scheme.quantize_acts and scheme.a_format != "mxfp4":
        return dataclasses.replace(scheme, a_dynamic=False, a_granularity="tensor")
    return scheme


def expected_refusal(method_cls, scheme: QuantScheme) -> str | None:
    """What the capability flags say the method refuses at this scheme (None: it must run)."""
    if method_cls.fp16 == "required":
        return "quantizes"
    if method_cls.activations == "refused" and scheme.quantize_acts:
        return "weight-only"
    if method_cls.activations == "required" and not scheme.quantize_acts:
        return "weight-only"
    if method_cls.activation_scales == "static" and scheme.a_format == "mxfp4":
        return "mxfp4"
    return None


def deploy(method_id: str, scheme: QuantScheme, seed: int):
    base, processor, cls = tiny()
    model = copy.deepcopy(base)
    from masquant.adapters import get_adapter
    from masquant.engine.context import QuantContext
    from masquant.quant import ModalityRouter, attach_router

    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    ctx = QuantContext(model, adapter, scheme, router, torch.device("cpu"), ("text",) + cls.tiny_modalities(),
                       calib_set(processor, cls, 4, seed=10 * seed))
    get_method_class(method_id)(get_config_class(method_id)()).run(ctx)
    held = prompts(processor, cls, 2, seed=50)
    with torch.no_grad():
        ref = torch.cat([base(**b).logits[0] for b in held])
        out = torch.cat([model(**b).logits[0] for b in held])
    return model, sqnr_db(ref, out)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("method_id", method_ids())
def test_every_method_runs_every_float_format_or_refuses_naming_why(method_id, scheme):
    method_cls = get_method_class(method_id)
    scheme = method_scheme(method_cls, scheme)
    why = expected_refusal(method_cls, scheme)
    method = method_cls(get_config_class(method_id)())
    if why is not None:
        with pytest.raises(MethodConfigError, match=why):
            method.check(scheme, ("text", "vision"))
        return
    method.check(scheme, ("text", "vision"))
    model, sqnr = deploy(method_id, scheme, 0)
    assert math.isfinite(sqnr) and sqnr > 0, sqnr
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(lin.scheme.w_format == scheme.w_format for lin in linears)
    for lin in linears:  # the deployed shared weight is on the format's grid: it re-quantizes to itself
        assert lin.weight_scale is not None, "a deployed linear kept no grid"
        W = lin.weight.detach().float()
        grid = weight_grid_of(lin.scheme)
        scale = lin.weight_scale.repeat_interleave(lin.scheme.w_group_size or W.shape[1], dim=1)[:, : W.shape[1]]
        assert torch.equal(fake_quantize(W, scale, None, grid), W), type(lin)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("method_id", [m for m in method_ids() if get_method_class(m).fp16 != "required"])
def test_no_worse_than_rtn_at_the_same_float_format(method_id, scheme):
    """A method that changes the function by design (sparsity, a low-rank approximation) is compared with its own
    fp16 error and RTN's, added as noise powers (as in ``test_every_adapter``)."""
    method_cls = get_method_class(method_id)
    scheme = method_scheme(method_cls, scheme)
    if expected_refusal(method_cls, scheme) is not None:
        return
    rtn_scheme = dataclasses.replace(scheme, a_dynamic=True)  # RTN has no calibration for static scales
    ours = statistics.median(deploy(method_id, scheme, s)[1] for s in SEEDS)
    rtn = statistics.median(deploy("rtn", rtn_scheme, s)[1] for s in SEEDS)
    bar = rtn
    if not method_cls.function_preserving:
        own = deploy(method_id, QuantScheme("fp16"), 0)[1]
        bar = -10 * math.log10(10 ** (-rtn / 10) + 10 ** (-own / 10))
    assert ours >= bar - ALLOWANCE_DB, {"method": ours, "bar": bar, "rtn": rtn, "scheme": scheme.name}


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_masquant_learns_through_the_formats_own_fake_quant(scheme):
    """MAS learning's forward (smoothed weight and the whole modality linear, with s learnable) takes the same values
    as the format's fake quantization composed by hand: the integer fast paths never stand in for a float format."""
    from masquant.methods.masquant import core
    from masquant.quant.quantizer import quantize_activation, quantize_weight

    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(10, 64, generator=g) * 3
    s = torch.nn.Parameter(torch.rand(64, generator=g) + 0.5)
    Wq = core.smooth_quantize_weight(W, s, scheme, ste=True)
    with torch.no_grad():
        ref_w = quantize_weight(core.smooth_weight(W, s), scheme)
        ref_y = torch.nn.functional.linear(quantize_activation(X / s, scheme), ref_w)
    assert torch.equal(Wq.detach(), ref_w)
    Y = core.mas_linear_rows(X, s, W, None, scheme, ste=True)
    torch.testing.assert_close(Y.detach(), ref_y, rtol=1e-5, atol=1e-5)
    Y.square().sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
