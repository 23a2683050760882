"""quant.w_quantizer / w_mse_clip: GPTQ's Hessians come from the walker's quantized stream, GPTQ beats RTN on
the layer output, methods that do not honour the options refuse them, the pipeline asks for calibration."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.rtn.method import RTNConfig
from baselines.smoothquant.method import SmoothQuantConfig
from masquant.adapters import get_adapter
from masquant.calibration.data import CalibrationSet
from masquant.engine.context import QuantContext
from masquant.engine.deploy import deploy_block_
from masquant.errors import MethodConfigError
from masquant.engine.weights import block_hessians, block_weights, rtn_weight
from masquant.quant import ModalityRouter, QuantScheme, attach_router
from masquant.quant.quantizer import quantize_weight, sqnr_db
from masquant.methods.registry import build_method
from masquant.transforms.rotation import rotate_model_
from support.tiny import prompts, tiny

_TINY = tiny("qwen2_5_vl")
W4A16_GPTQ = QuantScheme("w4", 4, 16, w_quantizer="gptq")


def _ctx(model, scheme, n=4, seed=0):
    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    return QuantContext(model, adapter, scheme, router, torch.device("cpu"), ("text", "vision"),
                        CalibrationSet(prompts(_TINY[1], _TINY[2], n, seed)))


class _Rows:
    """Inputs of a linear as its weight sees them (after its input transform, if any)."""

    def __init__(self, linear):
        self.rows = []
        self.handle = linear.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x = args[0]
        t = getattr(module, "input_transform", None)
        self.rows.append((t(x) if t is not None else x).reshape(-1, module.in_features).double())

    def X(self):
        self.handle.remove()
        return torch.cat(self.rows)


@pytest.mark.parametrize("rotated", [False, True])
def test_hessian_is_the_gram_matrix_of_the_quantized_stream_inputs(rotated):
    model = copy.deepcopy(_TINY[0])
    if rotated:
        rotate_model_(get_adapter(model), seed=0, mode="pad")  # down_proj: an online Hadamard in front
    ctx = _ctx(model, W4A16_GPTQ)
    for step in ctx.walk(quantized_stream=True):
        if step.index == 1:  # layer 0 is quantized: the quantized stream differs from the FP one
            lin = ctx.adapter.linears(step.layer)
            rows = {g: _Rows(lin[r]) for g, r in (("qkv", "q"), ("down", "down"))}
            H = block_hessians(step)
            for group, r in rows.items():
                X = r.X()
                torch.testing.assert_close(H.hessian(group), 2 * X.T @ X / X.shape[0])
            fp = _Rows(lin["q"])
            step.run("fp", keep=False)
            X_fp = fp.X()
            assert H.grams["qkv"]["all"].count == X_fp.shape[0]
            assert not torch.allclose(H.hessian("qkv"), 2 * X_fp.T @ X_fp / X_fp.shape[0], rtol=1e-3)  # not the FP stream
        deploy_block_(ctx, step.layer)


def test_gptq_lowers_the_layer_output_error_compared_with_rtn():
    model = copy.deepcopy(_TINY[0])
    ctx = _ctx(model, W4A16_GPTQ, n=6)
    for step in ctx.walk(quantized_stream=True, fp_stream=False):
        lin = ctx.adapter.linears(step.layer)
        recorders = {role: _Rows(lin[role]) for role in lin}
        weights = block_weights(ctx, step)
        assert weights.seconds > 0 and set(weights.gptq_loss) == set(lin)
        for role, linear in lin.items():
            X = recorders[role].X().float()
            W = linear.weight.data
            err_gptq = (X @ (weights.weight_for(role, linear).W - W).T).pow(2).sum()
            err_rtn = (X @ (quantize_weight(W, ctx.scheme) - W).T).pow(2).sum()
            assert err_gptq < err_rtn, (step.index, role, float(err_gptq), float(err_rtn))
        deploy_block_(ctx, step.layer, weight_for=weights.weight_for)


def test_plain_gptq_beats_rtn_end_to_end_on_held_out_prompts():
    held = prompts(_TINY[1], _TINY[2], 2, seed=77)

    def final(m):
        with torch.no_grad():
            return torch.cat([m(**b).logits[0] for b in held])

    ref = final(_TINY[0])
    sqnr = {}
    for name, scheme in (("rtn", QuantScheme("w4", 4, 16)), ("gptq", W4A16_GPTQ)):
        model = copy.deepcopy(_TINY[0])
        report = build_method(RTNConfig()).run(_ctx(model, scheme, n=6))
        sqnr[name] = sqnr_db(ref, final(model))
    assert "rtn/gptq_s_per_layer" in report
    assert sqnr["gptq"] > sqnr["rtn"] + 1.0, sqnr


def test_mse_clip_lowers_the_weight_error_and_is_deployed():
    W = torch.randn(32, 64) * torch.rand(32, 1) + torch.randn(32, 64).pow(3) * 0.3  # heavy tails
    scheme = QuantScheme("w4", 4, 16, w_mse_clip=True)
    clipped, plain = rtn_weight(W, scheme), quantize_weight(W, QuantScheme("w4", 4, 16))
    assert (clipped - W).pow(2).sum() < (plain - W).pow(2).sum()
    model = copy.deepcopy(_TINY[0])
    ctx = _ctx(model, scheme)
    layer = ctx.adapter.decoder_layers()[0]
    W0 = ctx.adapter.linears(layer)["up"].weight.data.clone()
    build_method(RTNConfig()).run(ctx)
    torch.testing.assert_close(ctx.adapter.linears(layer)["up"].weight.data, rtn_weight(W0, scheme))


def test_scheme_validation_of_the_weight_options():
    with pytest.raises(ValueError, match="w_bits < 16"):
        QuantScheme("a8", 16, 8, w_quantizer="gptq")
    with pytest.raises(ValueError, match="w_clip_ratio"):
        QuantScheme("w4", 4, 16, w_quantizer="gptq", w_clip_ratio=0.9)
    with pytest.raises(ValueError, match="rtn"):
        QuantScheme("w4", 4, 16, w_quantizer="obq")
    assert QuantScheme("w4", 4, 16, w_quantizer="gptq").to_dict()["w_quantizer"] == "gptq"


def test_methods_that_round_to_nearest_refuse_gptq():
    method = build_method(SmoothQuantConfig())
    with pytest.raises(MethodConfigError, match=r"does not honour quant.w_quantizer=gptq.*'rtn'.*'quarot'"):
        method.check_weight_options(QuantScheme("w4a8", 4, 8, w_quantizer="gptq"))
    with pytest.raises(MethodConfigError, match="w_mse_clip"):
        method.run(_ctx(copy.deepcopy(_TINY[0]), QuantScheme("w4a8", 4, 8, w_mse_clip=True)))
    assert not build_method(RTNConfig()).requires_calibration(QuantScheme("w4a8", 4, 8))
    assert build_method(RTNConfig()).requires_calibration(QuantScheme("w4a8", 4, 8, w_quantizer="gptq"))


def test_pipeline_resolves_gptq_options(compose_cfg, tiny_overrides):
    from masquant.app.pipeline import resolve
    from masquant.errors import ConfigError

    spec = resolve(compose_cfg(*tiny_overrides, "method=rtn", "quant.w_quantizer=gptq", "quant.gptq_damp=0.05"))
    assert spec.scheme.w_quantizer == "gptq" and spec.scheme.gptq_damp == 0.05
    with pytest.raises(ConfigError, match="needs calibration samples"):
        resolve(compose_cfg(*tiny_overrides, "method=rtn", "quant.w_quantizer=gptq", "calib.n_samples=0"))
    resolve(compose_cfg(*tiny_overrides, "method=rtn", "calib.n_samples=0", "eval.fidelity=false"))  # RTN: none needed
    with pytest.raises(ConfigError, match="gptq_damp=0.05 is not read with quant.w_quantizer=rtn"):
        resolve(compose_cfg(*tiny_overrides, "method=rtn", "quant.gptq_damp=0.05"))
    with pytest.raises(ConfigError, match="does not honour"):
        resolve(compose_cfg(*tiny_overrides, "method=smoothquant", "quant.w_quantizer=gptq"))
