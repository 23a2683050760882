"""LaRoSA: the rotation's algebra, the Top-K count, FP invariance at 0 % on every adapter, composition with a
quantization scheme, the pipeline, and the testbed perplexity curve (slow)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from baselines.larosa.core import (
    RotatedTopK,
    covariance_rotation,
    kept_count,
    mac_weighted_sparsity,
    position_sparsities,
    rotated_input_weight,
    rotated_top_k,
    top_k_magnitude,
)
from baselines.larosa.method import LaRoSA, LaRoSAConfig, layer_sparsifiers
from masquant.adapters import get_adapter
from masquant.errors import MethodConfigError
from masquant.quant import QuantLinear, QuantScheme
from masquant.quant.quantizer import quantize_activation, quantize_weight, sqnr_db
from support.tiny import MODEL_TYPES, final_hidden, prompts, run_method, tiny

FP16 = QuantScheme("fp16")


def _run(model, cls, processor, cfg, scheme=FP16, n_calib=4):
    return run_method(model, cls, processor, cfg, scheme, n_calib)


# --- core ------------------------------------------------------------------------------------------
def test_covariance_rotation_is_orthogonal_and_diagonalises_the_gram_matrix():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 24, dtype=torch.float64)
    C = X.T @ X
    Q = covariance_rotation(C)
    torch.testing.assert_close(Q.T @ Q, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-12)
    D = Q.T @ C @ Q  # diagonal, eigenvalues decreasing
    torch.testing.assert_close(D - torch.diag(torch.diagonal(D)), torch.zeros_like(D), rtol=0, atol=1e-9 * float(D.max()))
    assert bool((torch.diagonal(D)[:-1] >= torch.diagonal(D)[1:]).all())
    assert torch.equal(Q, covariance_rotation(C.clone()))  # deterministic (signs fixed)
    # x Q consumed by W Q is x consumed by W
    W, x = torch.randn(7, 24, generator=g, dtype=torch.float64), X[:5]
    torch.testing.assert_close((x @ Q) @ rotated_input_weight(W, Q).T, x @ W.T)


def test_top_k_keeps_exactly_k_largest_magnitudes_per_token():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 40, generator=g)
    z[0, 0, :10] = 0.5  # ties
    for k in (1, 17, 39, 40):
        s = top_k_magnitude(z, k)
        assert bool(((s != 0).sum(-1) == k).all())
        kept = torch.where(s != 0, z.abs(), torch.full_like(z, float("inf"))).amin(-1)
        dropped = torch.where(s == 0, z.abs(), torch.zeros_like(z)).amax(-1)
        assert bool((kept >= dropped).all())
        assert torch.equal(s[s != 0], z[s != 0])  # kept values are untouched
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))[0]
    x = torch.randn(6, 40, generator=g)
    torch.testing.assert_close(rotated_top_k(x, Q, 40) @ Q.float().T, x, rtol=1e-5, atol=1e-5)
    assert bool(((rotated_top_k(x, Q, 9) != 0).sum(-1) == 9).all())


def test_position_levels_average_to_the_target_and_counts_round():
    levels = position_sparsities(0.4, 0.8, 1.2)
    assert levels == pytest.approx({"qkv": 0.32, "gate_up": 0.32, "o": 0.48, "down": 0.48})
    assert (levels["qkv"] + levels["o"]) / 2 == pytest.approx(0.4)
    assert [kept_count(576, s) for s in (0.0, 0.32, 0.48)] == [576, 392, 300]
    assert kept_count(1536, 0.48) == 799
    # testbed widths (q 576x576, k/v 576x192, o 576x576, gate/up 576x1536 each, down 1536x576)
    macs = {"qkv": 576 * 960, "o": 576 * 576, "gate_up": 576 * 3072, "down": 1536 * 576}
    assert mac_weighted_sparsity(levels, macs) == pytest.approx(0.375)


def test_config_and_scheme_refusals():
    with pytest.raises(ValueError, match="average to 1"):
        LaRoSAConfig(block_in_scale=0.8, block_out_scale=1.0)
    with pytest.raises(ValueError, match="below 1"):
        LaRoSAConfig(sparsity=0.9)  # 1.2 x 0.9 on o/down
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            LaRoSAConfig(sparsity=bad)
    with pytest.raises(ValueError, match="> 0"):
        LaRoSAConfig(block_in_scale=0.0, block_out_scale=2.0)
    LaRoSAConfig(sparsity=0.8, block_in_scale=1.0, block_out_scale=1.0)  # uniform levels
    with pytest.raises(MethodConfigError, match="dynamic"):
        LaRoSA(LaRoSAConfig()).check(QuantScheme("s", 8, 8, a_dynamic=False, a_granularity="tensor"), ("text",))
    LaRoSA(LaRoSAConfig()).check(FP16, ("text",))  # sparsity alone


# --- the method on the tiny models -----------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zero_sparsity_leaves_the_fp_model_unchanged_on_every_adapter(model_type):
    """Every rotation is orthogonal and, at 0 %, TopK(x Q)(W Q)ᵀ = x Wᵀ: the logits equal the FP model's."""
    base, processor, cls = tiny(model_type)
    held = prompts(processor, cls, 2, seed=50)
    with torch.no_grad():
        ref = [base(**b).logits for b in held]
    model = copy.deepcopy(base)
    report, ctx = _run(model, cls, processor, LaRoSAConfig(sparsity=0.0))
    with torch.no_grad():
        for b, r in zip(held, ref):
            torch.testing.assert_close(model(**b).logits, r, rtol=1e-4, atol=1e-4)
    for layer in ctx.adapter.decoder_layers():
        sparsifiers = layer_sparsifiers(ctx.adapter, layer)
        for group in ("qkv", "gate_up"):
            Q = sparsifiers[group].Q.double()
            torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
        assert sparsifiers["o"].Q is None and sparsifiers["down"].Q is None
        assert all(s.k == s.width for s in sparsifiers.values())
    # the attention and the MLP have different rotations (the official inference code reuses the attention's)
    first = layer_sparsifiers(ctx.adapter, ctx.adapter.decoder_layers()[0])
    assert not torch.allclose(first["qkv"].Q, first["gate_up"].Q)
    assert report["larosa/realised_sparsity_macs"] == 0.0


def test_top_k_keeps_the_configured_count_per_token_at_each_position():
    base, processor, cls = tiny("qwen2_5_vl")
    model = copy.deepcopy(base)
    report, ctx = _run(model, cls, processor, LaRoSAConfig(sparsity=0.4))
    counts: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(ctx.adapter.decoder_layers()):
        for group, module in layer_sparsifiers(ctx.adapter, layer).items():
            assert isinstance(module, RotatedTopK) and (module.Q is not None) == (group in ("qkv", "gate_up"))
            handles.append(module.register_forward_hook(
                lambda m, a, out, key=(i, group): counts.setdefault(key, []).append((out != 0).sum(-1).flatten())))
    with torch.no_grad():
        for b in prompts(processor, cls, 2, seed=60):
            model(**b)
    for h in handles:
        h.remove()
    D = ctx.adapter.text_config().hidden_size
    F_ = ctx.adapter.linears(ctx.adapter.decoder_layers()[0])["down"].in_features
    expected = {"qkv": kept_count(D, 0.32), "gate_up": kept_count(D, 0.32), "o": kept_count(D, 0.48),
                "down": kept_count(F_, 0.48)}
    assert len(counts) == 4 * ctx.adapter.num_layers()
    for (i, group), c in counts.items():
        assert bool((torch.cat(c) == expected[group]).all()), (i, group)
        assert report[f"larosa/kept/{group}"] == expected[group]
        assert report[f"larosa/realised_sparsity/{group}/layer_{i}"] == pytest.approx(1 - expected[group] / (F_ if group == "down" else D))


def test_rotation_drops_less_energy_than_plain_top_k_at_the_block_inputs():
    """The point of the rotation: in the eigenbasis the same K entries carry more of each token's energy."""
    base, processor, cls = tiny("qwen2_5_vl")
    rot, _ = _run(copy.deepcopy(base), cls, processor, LaRoSAConfig(sparsity=0.4))
    teal, _ = _run(copy.deepcopy(base), cls, processor, LaRoSAConfig(sparsity=0.4, rotate=False))
    for group in ("qkv", "gate_up"):
        for modality in ("all", "text", "vision"):
            key = f"larosa/energy_dropped/{modality}/{group}"
            assert 0 < rot[key] < teal[key] / 2, (key, rot[key], teal[key])
    assert rot["larosa/rotate"] is True and teal["larosa/rotate"] is False


def test_sparsity_then_quantization():
    """W8A8: each linear's activation quantizer runs on its sparsified input; weights are W Q rounded by the scheme."""
    base, processor, cls = tiny("qwen2_5_vl")
    scheme = QuantScheme("w8a8", 8, 8)
    model = copy.deepcopy(base)
    report, ctx = _run(model, cls, processor, LaRoSAConfig(sparsity=0.4), scheme)
    layer = ctx.adapter.decoder_layers()[0]
    lin = ctx.adapter.linears(layer)
    assert report["quant/linears"] == 7 * ctx.adapter.num_layers()
    assert all(isinstance(m, QuantLinear) for m in lin.values())
    down = lin["down"]
    x = torch.randn(5, down.in_features, generator=torch.Generator().manual_seed(2))
    xs = top_k_magnitude(x, down.input_transform.k)
    expected = F.linear(quantize_activation(xs, scheme), down.weight, down.bias)
    torch.testing.assert_close(down(x), expected)
    assert torch.equal(quantize_weight(down.weight.data, scheme), down.weight.data)  # on the 8-bit grid
    # the q weight is the rounded W Q: un-rotating it gives the FP weight up to the rounding error
    Q = layer_sparsifiers(ctx.adapter, layer)["qkv"].Q
    W_fp = ctx.adapter.linears(get_adapter(base).decoder_layers()[0])["q"].weight.detach()
    assert sqnr_db(W_fp, lin["q"].weight.detach() @ Q.T) > 35
    held = prompts(processor, cls, 2, seed=50)
    _, sparse_only = _run(copy.deepcopy(base), cls, processor, LaRoSAConfig(sparsity=0.4))
    ref, h_sparse, h_both = final_hidden(base, held), final_hidden(sparse_only.model, held), final_hidden(model, held)
    # 8 bits on top of 40 % sparsity: a small extra error (either sign on the FP SQNR: the two errors are not
    # additive), but a real one
    assert 25 < sqnr_db(h_sparse, h_both) < 80
    assert abs(sqnr_db(ref, h_both) - sqnr_db(ref, h_sparse)) < 1.0


def test_gptq_weights_compose(compose_cfg, tiny_overrides):
    from masquant.app import pipeline

    m = pipeline.run(compose_cfg(*tiny_overrides, "method=larosa", "quant=w4a8", "quant.w_quantizer=gptq"))
    assert m["run/method_label"] == "larosa(w_quantizer=gptq)" and m["larosa/gptq_s_per_layer"] > 0
    assert 0 < m["fidelity/sqnr/all/e2e"] < 80


def test_pipeline_end_to_end_reports_sparsity_and_per_modality_sqnr(compose_cfg, tiny_overrides):
    from masquant.app import pipeline

    m = pipeline.run(compose_cfg(*tiny_overrides, "method=larosa", "quant=fp16", "method.sparsity=0.25"))
    assert m["run/method_label"] == "larosa(sparsity=0.25)" and m["run/bits"] == m["run/bits"]
    for modality in ("text", "vision"):
        assert 0 < m[f"fidelity/sqnr/{modality}/e2e"] < 80
        assert 0 < m[f"larosa/energy_dropped/{modality}/gate_up/layer_0"] < 1
    assert m["larosa/realised_sparsity/o/layer_1"] == pytest.approx(1 - m["larosa/kept/o"] / 64)
    assert m["fidelity/ppl"] != m["fidelity/ppl_fp"]  # random tiny weights: the direction means nothing here
    teal = pipeline.run(compose_cfg(*tiny_overrides, "method=larosa", "quant=fp16", "method.rotate=false"))
    assert teal["run/method_label"] == "larosa(rotate=False)"


def test_cli_refuses_bad_options_before_loading(compose_cfg, tiny_overrides):
    from masquant.app import pipeline
    from masquant.errors import ConfigError

    with pytest.raises(ConfigError, match="average to 1"):
        pipeline.resolve(compose_cfg(*tiny_overrides, "method=larosa", "method.block_out_scale=1.5"))
    with pytest.raises(ConfigError, match=r"method=larosa: method.sparsity=1.5: must be in \[0, 1\)"):
        pipeline.resolve(compose_cfg(*tiny_overrides, "method=larosa", "method.sparsity=1.5"))
    with pytest.raises(ConfigError, match="position level of 1.02"):
        pipeline.resolve(compose_cfg(*tiny_overrides, "method=larosa", "method.sparsity=0.85"))
    with pytest.raises(ConfigError, match="dynamic"):
        pipeline.resolve(compose_cfg(*tiny_overrides, "method=larosa", "quant=w8a8", "quant.a_dynamic=false",
                                     "quant.a_granularity=tensor"))


@pytest.mark.slow
def test_testbed_text_perplexity_rises_monotonically_with_sparsity(compose_cfg):
    """The testbed's language model on the text corpus (benchmarks/text_ppl.py's setting, fewer samples):
    perplexity grows with the sparsity level; the TEAL-style Top-K without rotation is worse at 40 %."""
    from masquant.app import pipeline

    base = ["modality=text_only", "calib=text", "eval=fidelity", "eval.ppl=true", "quant=fp16", "method=larosa",
            "calib.n_samples=8", "calib.held_out=2", "eval.ppl_sequences=8"]
    ppl = {s: pipeline.run(compose_cfg(*base, f"method.sparsity={s}")) for s in (0.0, 0.25, 0.4, 0.5)}
    curve = [m["fidelity/ppl"] for m in ppl.values()]
    assert curve[0] == pytest.approx(ppl[0.0]["fidelity/ppl_fp"], rel=1e-3)
    assert all(a < b for a, b in zip(curve, curve[1:])), curve
    teal = pipeline.run(compose_cfg(*base, "method.sparsity=0.4", "method.rotate=false"))
    assert teal["fidelity/ppl"] > ppl[0.4]["fidelity/ppl"], (teal["fidelity/ppl"], curve)
    for s, m in ppl.items():
        assert m["larosa/realised_sparsity_macs"] == pytest.approx(m["larosa/sparsity_macs"], abs=0.01), s
