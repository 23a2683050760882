import copy

import pytest
import torch

from baselines.rtn.method import RTNConfig
from baselines.smoothquant.core import smoothquant_factors as smooth_factors
from baselines.smoothquant.method import SmoothQuantConfig
from masquant.adapters import get_adapter
from masquant.calibration.data import CalibrationSet
from masquant.engine.context import QuantContext
from masquant.errors import MethodConfigError
from masquant.quant import ModalityRouter, QuantScheme, attach_router
from masquant.quant.quantizer import sqnr_db
from masquant.methods.registry import build_method
from support.tiny import prompts, tiny

_TINY = tiny("qwen2_5_vl")


def _outlier_model():
    """Tiny Qwen2.5-VL with a few massive activation channels at every norm output (as trained LLMs have)."""
    model = copy.deepcopy(_TINY[0])
    ad = get_adapter(model)
    with torch.no_grad():
        for layer in ad.decoder_layers():
            for pair in ad.norm_fold_pairs(layer):
                ad.norm(layer, pair.producer).weight[[3, 17, 40]] *= 40.0
    return model


def _prompts(n, seed=0):
    return prompts(_TINY[1], _TINY[2], n, seed)


def test_factors_follow_the_equation():
    act = torch.tensor([4.0, 1.0, 9.0])
    W1, W2 = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[-3.0, 0.5, 1.0]])
    s = smooth_factors(act, [W1, W2], alpha=0.5)
    assert torch.allclose(s, torch.tensor([4 / 3, 1 / 2, 9 / 1.0]).sqrt())
    assert torch.allclose(smooth_factors(act, [W1], alpha=1.0), act)


def test_smoothing_leaves_fp_model_unchanged():
    model = _outlier_model()
    ad = get_adapter(model)
    batch = _prompts(1, seed=7)[0]
    with torch.no_grad():
        ref = model(**batch).logits
    torch.manual_seed(0)
    for layer in ad.decoder_layers():
        for pair in ad.norm_fold_pairs(layer):
            ad.fold_scales_(layer, pair, torch.rand(64) * 10 + 0.1)
    with torch.no_grad():
        out = model(**batch).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def _quantized_sqnr(method_cfg, scheme):
    model = _outlier_model()
    ad = get_adapter(model)
    calib = CalibrationSet(_prompts(4))
    held = _prompts(1, seed=99)[0]
    with torch.no_grad():
        ref = model(**held).logits
    router = ModalityRouter(ad.modality_masks)
    attach_router(model, router)
    ctx = QuantContext(model, ad, scheme, router, torch.device("cpu"), ("text", "vision"), calib)
    report = build_method(method_cfg).run(ctx)
    with torch.no_grad():
        return sqnr_db(ref, model(**held).logits), report


@pytest.mark.parametrize("scheme", [QuantScheme("w8a8", 8, 8), QuantScheme("w4a8", 4, 8),
                                    QuantScheme("w8a8t", 8, 8, a_granularity="tensor")])
def test_smoothquant_beats_rtn_with_outlier_channels(scheme):
    sq, _ = _quantized_sqnr(SmoothQuantConfig(alpha=0.5), scheme)
    rtn, _ = _quantized_sqnr(RTNConfig(), scheme)
    assert sq > rtn + 1.0, (sq, rtn)


def test_alpha_grid_search_is_no_worse_than_its_worst_choice():
    scheme = QuantScheme("w4a8", 4, 8)
    searched, report = _quantized_sqnr(SmoothQuantConfig(alpha_grid=[0.0, 0.5, 0.9]), scheme)
    fixed0, _ = _quantized_sqnr(SmoothQuantConfig(alpha=0.0), scheme)
    assert set(report["smoothquant/alphas"]) <= {0.0, 0.5, 0.9}
    assert searched >= fixed0 - 0.5


def test_weight_only_scheme_is_refused():
    from baselines.smoothquant.method import SmoothQuant

    with pytest.raises(MethodConfigError, match="weight-only"):
        SmoothQuant(SmoothQuantConfig()).check(QuantScheme("w4", w_bits=4), ("text",))


def test_static_activation_scales_come_from_smoothed_calibration_absmax():
    scheme = QuantScheme("w8a8s", 8, 8, a_granularity="tensor", a_dynamic=False)
    model = _outlier_model()
    ad = get_adapter(model)
    ctx = QuantContext(model, ad, scheme, ModalityRouter(ad.modality_masks), torch.device("cpu"), ("text",),
                       CalibrationSet(_prompts(2)))
    stats = ctx.input_stats()
    build_method(SmoothQuantConfig(alpha=0.5)).run(ctx)
    layer0 = ad.linears(ad.decoder_layers()[0])
    absmax_o = stats[0]["o"]["all"].absmax.max()
    assert torch.allclose(layer0["o"].paths["text"].act_scale, absmax_o / 127)
    # q's input was divided by s: its static scale is below the unsmoothed one
    assert layer0["q"].paths["text"].act_scale < stats[0]["qkv"]["all"].absmax.max() / 127


def test_rtn_refuses_static_activation_scales():
    from baselines.rtn.method import RTN

    with pytest.raises(MethodConfigError, match="static"):
        RTN(RTNConfig()).check(QuantScheme("s", 8, 8, a_granularity="tensor", a_dynamic=False), ("text",))


def test_range_statistic_uses_max_minus_min():
    """act_statistic=range (llm-compressor's factor) differs from the paper's absmax on one-sided channels."""
    from baselines.smoothquant.method import smooth_layer_
    from masquant.calibration.stats import ChannelStats

    model = _outlier_model()
    ad = get_adapter(model)
    layer = ad.decoder_layers()[0]
    x = torch.randn(50, 64) + 3.0  # one-sided: range < absmax
    stats = {g: {"all": ChannelStats(lin.in_features)} for g, lin in ad.input_group_linears(layer).items()}
    stats["qkv"]["all"].update(x)
    stats["gate_up"]["all"].update(x)
    lin = ad.linears(layer)
    W = [lin[r].weight.detach().clone() for r in ("q", "k", "v")]
    s = smooth_layer_(ad, copy.deepcopy(layer), stats, 0.5, "range")["qkv"]
    expected = smooth_factors((x.amax(0) - x.amin(0)), W, 0.5)
    torch.testing.assert_close(s, expected)
    s_abs = smooth_layer_(ad, copy.deepcopy(layer), stats, 0.5, "absmax")["qkv"]
    assert not torch.allclose(s, s_abs)
