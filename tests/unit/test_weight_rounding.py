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
    clipped, plain = rtn_weight(W, scheme).W, quantize_weight(W, QuantScheme("w4", 4, 16))
    assert (clipped - W).pow(2).sum() < (plain - W).pow(2).sum()
    model = copy.deepcopy(_TINY[0])
    ctx = _ctx(model, scheme)
    layer = ctx.adapter.decoder_layers()[0]
    W0 = ctx.adapter.linears(layer)["up"].weight.data.clone()
    build_method(RTNConfig()).run(ctx)
    torch.testing.assert_close(ctx.adapter.linears(layer)["up"].weight.data, rtn_weight(W0, scheme).W)


def test_scheme_validation_of_the_weight_options():
    with pytest.raises(ValueError, match="w_bits < 16"):
        QuantScheme("a8", 16, 8, w_quantizer="gptq")
    with pytest.raises(ValueError, match="w_clip_ratio"):
        QuantScheme("w4", 4, 16, w_quantizer="gptq", w_clip_ratio=0.9)
    with pytest.raises(ValueError, match="rtn"):
        QuantScheme("w4", 4, 16, w_quantizer="obq")
    assert QuantScheme("w4", 4, 16, w_quantizer="gptq").to_dict()["w_quantizer"] == "gptq"
    with pytest.raises(ValueError, match="gptq_true_sequential=true is an option of quant.w_quantizer=gptq"):
        QuantScheme("w4", 4, 16, gptq_true_sequential=True)
    # static activation scales are symmetric only: refused with the scheme, not in the middle of a run
    with pytest.raises(ValueError, match="quant.a_dynamic=false with quant.a_symmetric=false"):
        QuantScheme("s", 8, 8, a_dynamic=False, a_granularity="tensor", a_symmetric=False)
    QuantScheme("s", 8, 16, a_dynamic=False, a_symmetric=False)  # nothing to quantize: no refusal


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


# --- true-sequential GPTQ (official QuaRot / MQuant) -----------------------------------------------------------
W4A8_TRUE_SEQ = QuantScheme("w4a8", 4, 8, w_quantizer="gptq", gptq_true_sequential=True)


@pytest.mark.parametrize("rotated", [False, True])
def test_true_sequential_gptq_takes_each_groups_hessian_after_the_groups_before_it(rotated):
    """Group by group in call order: the reference below quantizes q/k/v on the block's own pass, then takes o's
    Hessian from a pass where q/k/v compute with their GPTQ weights, and so on; true-sequential gives exactly its
    weights. The one-pass GPTQ differs from it from the second group on."""
    from masquant.calibration.stats import GramObserver
    from masquant.engine.weights import gptq_options, group_call_order
    from masquant.quant.gptq import gptq_quantize

    model = copy.deepcopy(_TINY[0])
    if rotated:
        rotate_model_(get_adapter(model), seed=0, mode="pad", o_rotation="full")  # o and down: online transforms
    ctx = _ctx(model, W4A8_TRUE_SEQ)
    step = next(iter(ctx.walk(quantized_stream=True, fp_stream=False)))
    stack, block = step.stack, step.block
    assert group_call_order(step, block) == ["qkv", "o", "gate_up", "down"]
    lin = stack.linears(block)
    before = {r: l.weight.data.clone() for r, l in lin.items()}
    true_seq = block_weights(ctx, step)
    assert all(torch.equal(lin[r].weight.data, w) for r, w in before.items())  # the block is left as it was
    ref_block = copy.deepcopy(block)
    ref_lin = stack.linears(ref_block)
    ref = {}
    for group in ("qkv", "o", "gate_up", "down"):
        grams = GramObserver.for_block(stack, ref_block, groups=[group])
        step.run("quant", layer=ref_block, observers=[grams], keep=False)
        for role in stack.input_groups[group]:
            ref[role], _ = gptq_quantize(before[role].float(), grams.hessian(group), **gptq_options(ctx.scheme))
            ref_lin[role].weight.data = ref[role]
    for role, linear in lin.items():
        torch.testing.assert_close(true_seq.weight_for(role, linear).W, ref[role], rtol=0, atol=0)
    ctx.scheme = QuantScheme("w4a8", 4, 8, w_quantizer="gptq")  # one pass for every group
    one = block_weights(ctx, step)
    torch.testing.assert_close(one.weight_for("q", lin["q"]).W, ref["q"])  # the first group: the same pass
    assert not torch.allclose(one.weight_for("down", lin["down"]).W, ref["down"])


def test_the_true_sequential_stream_runs_the_deployed_blocks_without_activation_quantization():
    """Block 1's quantized stream is block 0 deployed with its activations unquantized (official GPTQ's stream);
    the default stream quantizes them."""
    from masquant.quant.linear import activations_unquantized

    streams = {}
    for true_seq in (True, False):
        model = copy.deepcopy(_TINY[0])
        scheme = QuantScheme("w4a4", 4, 4, w_quantizer="gptq", gptq_true_sequential=true_seq)
        ctx = _ctx(model, scheme)
        method = build_method(RTNConfig())
        steps = []
        walk = ctx.walk(quantized_stream=True, fp_stream=False, quantized_activations=not true_seq)
        for step in walk:
            steps.append(step)
            weights = block_weights(ctx, step)
            deploy_block_(ctx, step.layer, weight_for=weights.weight_for)
            if step.index == 0:
                with activations_unquantized(step.layer):
                    weight_only = step.run("quant")
                quantized = step.run("quant")
            if step.index == 1:
                streams[true_seq] = [step.sample("quant", k).hidden.cpu() for k in range(step.n_samples)]
                break
        assert method.id == "rtn"
        expected = weight_only if true_seq else quantized
        for got, want in zip(streams[true_seq], expected):
            torch.testing.assert_close(got, want.reshape(got.shape))
    assert not torch.allclose(streams[True][0], streams[False][0])


def test_activations_unquantized_leaves_weights_and_restores_the_quantizers():
    from masquant.quant.linear import QuantLinear, activations_unquantized

    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    q = QuantLinear(quantize_weight(W, QuantScheme("w4a4", 4, 4)), None, QuantScheme("w4a4", 4, 4))
    quantized = q(x)
    with activations_unquantized(torch.nn.Sequential(q)):
        torch.testing.assert_close(q(x), x @ q.weight.T)
    torch.testing.assert_close(q(x), quantized)
    assert not torch.allclose(quantized, x @ q.weight.T)


@pytest.mark.parametrize("true_seq", [True, False])
def test_the_engine_walks_the_weight_only_stream_for_true_sequential_gptq(true_seq):
    """Every method that rounds with GPTQ gets the official stream from the engine, not from its own walk."""
    from baselines.quarot.method import QuaRot, QuaRotConfig

    seen = []

    class Recording(QuaRot):
        def plan_block(self, ctx, step):
            seen.append(step.walker.quantized_activations)
            return super().plan_block(ctx, step)

    model = copy.deepcopy(_TINY[0])
    scheme = QuantScheme("w4a8", 4, 8, w_quantizer="gptq", gptq_true_sequential=true_seq)
    Recording(QuaRotConfig()).run(_ctx(model, scheme))
    assert seen and set(seen) == {not true_seq}


@pytest.mark.parametrize("kw", [
    dict(w_granularity="group", w_group_size=128), dict(w_granularity="group", w_group_size=128, w_symmetric=False),
    dict(), dict(w_symmetric=False), dict(w_granularity="tensor"), dict(w_clip_ratio=0.9, int_range="full"),
    dict(w_granularity="group", w_group_size=64, w_clip_ratio=0.85, w_symmetric=False)])
def test_the_grid_the_deploy_path_records_rounds_as_quantize_weight(kw):
    """quantize_weight_grid (deploy; an export writes its scales) gives quantize_weight's weights bit for bit, on
    the grid it returns (576 = 4 x 128 + 64: a smaller last group)."""
    from masquant.quant.grid import dequantize, group_slices
    from masquant.quant.quantizer import quantize_weight_grid

    W = torch.randn(48, 576, generator=torch.Generator().manual_seed(3))
    scheme = QuantScheme("x", 4, 16, **kw)
    W_q, scale, zero = quantize_weight_grid(W, scheme)
    assert torch.equal(W_q, quantize_weight(W, scheme))
    groups = group_slices(576, scheme.w_group_size if scheme.w_granularity == "group" else 0)
    assert scale.shape[1] == (1 if scheme.w_granularity == "tensor" else len(groups))
    for k, cols in enumerate(groups if scheme.w_granularity != "tensor" else [slice(0, 576)]):
        z = None if zero is None else zero[:, k:k + 1]
        codes = torch.round(W_q[:, cols] / scale[:, k:k + 1]) + (0 if z is None else z)
        assert torch.equal(dequantize(codes, scale[:, k:k + 1], z), W_q[:, cols])
